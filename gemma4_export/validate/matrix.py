"""The validation matrix: export variants x targets x presets, validate every artifact in its own runtime against one
shared fp32 reference per variant, and write a table, a JSON record, a KLD-against-size plot and a manifest.

Which cells run is decided before any work, from facts about this machine (`probe_platform`) through pure
functions (`check_device`, `skip_reason`), so the decisions are testable without the hardware. A cell that cannot
run here is skipped with its reason; an export or validation that raises is an error; one that misses a threshold
is a failure; the run goes on past all of them.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..errors import Gemma4ExportError
from ..progress import Reporter, Silent
from .onnxrt import PROVIDERS as ONNX_PROVIDERS

MAIN_PRESETS: dict[str, str] = {"gguf": "q4_k_m", "mlx": "4bit", "onnx": "int4"}
TARGETS: tuple[str, ...] = tuple(MAIN_PRESETS)
DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")
OUTPUTS = {"table": "matrix.md", "record": "matrix.json", "plot": "matrix-kld-vs-size.svg",
           "manifest": "manifest.json"}
ARTIFACT_DIR = "artifacts"
DIR_DIGEST = "sha256 over the lines '<relative path>\\t<sha256 of the file>\\n' of every file, sorted by path"


# ---- what is asked for -----------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [s.strip().lower() for s in text.split(",") if s.strip()]


def resolve_variants(variants: list[str]) -> list[str]:
    """Registered variant names (hub ids accepted), in order, without repeats; raises on an unknown one."""
    from ..exporter.variants import get_variant

    names = [get_variant(v).name for v in variants]
    if not names:
        raise Gemma4ExportError("the matrix needs at least one variant")
    return list(dict.fromkeys(names))


def resolve_targets(targets: list[str]) -> list[str]:
    names = list(dict.fromkeys(t.strip().lower() for t in targets if t.strip()))
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise Gemma4ExportError(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if not names:
        raise Gemma4ExportError("the matrix needs at least one target")
    return names


def resolve_quants(targets: list[str], quants: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Every target's presets: those given, or its main preset. Raises on a preset or target that is not known."""
    from ..quant.rules import presets_of

    quants = quants or {}
    for t in quants:
        if t not in TARGETS:
            raise Gemma4ExportError(f"presets given for unknown target {t!r}; choose from {', '.join(TARGETS)}")
        if t not in targets:
            raise Gemma4ExportError(f"presets given for {t}, which is not among the targets ({', '.join(targets)})")
    out: dict[str, list[str]] = {}
    for t in targets:
        names = list(dict.fromkeys(p.strip().lower() for p in quants.get(t, [MAIN_PRESETS[t]])))
        if not names:
            raise Gemma4ExportError(f"no presets given for {t}")
        for p in names:
            if p not in presets_of(t):
                raise Gemma4ExportError(f"unknown {t} preset {p!r}; choose from {', '.join(presets_of(t))}")
        out[t] = names
    return out


def check_new_tokens(quants: dict[str, list[str]], new_tokens: int) -> None:
    """Raises when a preset's greedy first-divergence threshold (in tokens) exceeds `new_tokens`: such a cell could
    never pass. Presets without thresholds are left to fail in their own cell."""
    from .thresholds import thresholds_for

    for t, presets in quants.items():
        for p in presets:
            try:
                need = thresholds_for(t, p).gen_first_div
            except Gemma4ExportError:
                continue
            if need > new_tokens:
                raise Gemma4ExportError(f"new_tokens={new_tokens} is below the {need:g}-token mean first-divergence "
                                        f"threshold of {t} {p}: no generation could pass; use at least {need:g}")


def parse_quants(specs: list[str] | None, targets: list[str]) -> dict[str, list[str]]:
    """CLI `--quants` values to target -> presets: 'gguf:q4_k_m,q8_0' names its target; a bare 'q4_k_m' goes to
    every selected target that has a preset of that name (bf16 is both a GGUF and an MLX preset)."""
    from ..quant.rules import presets_of

    targets = resolve_targets(targets)
    out: dict[str, list[str]] = {}
    for spec in specs or []:
        head, sep, tail = spec.partition(":")
        if sep:
            t = head.strip().lower()
            if t not in TARGETS:
                raise Gemma4ExportError(f"--quants {spec}: unknown target {t!r}; choose from {', '.join(TARGETS)}")
            out.setdefault(t, []).extend(_split(tail))
            continue
        for p in _split(spec):
            owners = [t for t in targets if p in presets_of(t)]
            if not owners:
                elsewhere = [t for t in TARGETS if p in presets_of(t)]
                hint = (f"it is a {'/'.join(elsewhere)} preset, and the targets are {', '.join(targets)}"
                        if elsewhere else "no target has a preset of that name")
                raise Gemma4ExportError(f"--quants {spec}: unknown preset {p!r} ({hint})")
            for t in owners:
                out.setdefault(t, []).append(p)
    resolve_quants(targets, out)  # raises on anything unknown, before any work
    return out


# ---- what this machine can run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """Facts about this machine that decide which cells run."""

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, ...
    torch_cuda: bool = False
    torch_mps: bool = False
    llama_cpp: bool = False  # llama-cpp-python importable
    llama_gpu_offload: bool = False
    mlx: bool = False  # mlx and mlx-lm importable
    mlx_metal: bool = False
    onnx_providers: tuple[str, ...] | None = None  # None: onnxruntime not importable

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")


def probe_platform(targets: list[str] | tuple[str, ...] = TARGETS) -> Platform:
    """Look at this machine: torch's devices, and each target's runtime (imported only when that target is asked)."""
    import torch

    facts: dict[str, Any] = {
        "system": _platform.system(), "machine": _platform.machine(),
        "torch_cuda": bool(torch.cuda.is_available()),
        "torch_mps": _mps_works(torch),
    }
    if "gguf" in targets:
        try:
            import llama_cpp

            facts.update(llama_cpp=True, llama_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()))
        except Exception:  # not installed, or a build that cannot load here
            pass
    if "mlx" in targets:
        try:
            import mlx.core as mx
            import mlx_lm  # noqa: F401

            facts.update(mlx=True, mlx_metal=bool(mx.metal.is_available()))
        except Exception:
            pass
    if "onnx" in targets:
        try:
            import onnxruntime

            facts["onnx_providers"] = tuple(onnxruntime.get_available_providers())
        except Exception:
            pass
    return Platform(**facts)


def _mps_works(torch) -> bool:
    """torch.backends.mps.is_available(), and a tensor can really be made there (virtual Macs, such as hosted CI
    runners, report MPS available but fail every allocation)."""
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return False
    try:
        return float((torch.ones(4, device="mps") * 2).sum().item()) == 8.0
    except Exception:
        return False


def check_device(device: str, p: Platform) -> None:
    """Raises when the fp32 reference (torch) cannot run on `device` here: then no cell can."""
    if device not in DEVICES:
        raise Gemma4ExportError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device == "cuda" and not p.torch_cuda:
        raise Gemma4ExportError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False), "
                                "so the fp32 reference cannot run on it; use a CUDA build of torch on a CUDA machine")
    if device == "mps" and not p.torch_mps:
        raise Gemma4ExportError("--device mps: torch sees no Metal device here (torch.backends.mps.is_available() is "
                                "False); mps needs macOS on Apple Silicon")


def skip_reason(target: str, device: str, p: Platform) -> str | None:
    """Why `target` cannot be validated on `device` here, or None when it can."""
    if target == "gguf":
        if not p.llama_cpp:
            return "llama-cpp-python is not installed (pip install 'gemma4-export[gguf]')"
        if device != "cpu" and not p.llama_gpu_offload:
            flag = "-DGGML_CUDA=on" if device == "cuda" else "-DGGML_METAL=on"
            return f"this llama-cpp-python build has no GPU offload (rebuild it with CMAKE_ARGS={flag})"
        return None
    if target == "mlx":
        if device == "cuda":
            return "MLX's GPU runs on Apple Silicon only"
        if not p.mlx:
            return "mlx and mlx-lm are not installed (pip install 'gemma4-export[mlx]')"
        if device == "mps" and not p.apple_silicon:
            return f"MLX's Metal GPU needs macOS on Apple Silicon, not {p.system} {p.machine}"
        if device == "mps" and not p.mlx_metal:
            return "MLX sees no Metal device here"
        return None
    if target == "onnx":
        if p.onnx_providers is None:
            return "onnxruntime is not installed (pip install 'gemma4-export[onnx]')"
        want = ONNX_PROVIDERS[device]
        if want not in p.onnx_providers:
            return f"onnxruntime here has no {want} (it has {', '.join(p.onnx_providers) or 'none'})"
        return None
    raise Gemma4ExportError(f"unknown target {target!r}")


def backend_for(target: str, device: str) -> str:
    """What runs a target's artifact on a device, in words (the report records what actually ran)."""
    if target == "gguf":
        return "llama.cpp, CPU" if device == "cpu" else f"llama.cpp, all layers offloaded ({device})"
    if target == "mlx":
        return "mlx-lm, mlx cpu" if device == "cpu" else "mlx-lm, mlx gpu (Metal)"
    return f"onnxruntime, {ONNX_PROVIDERS[device]}"


# ---- cells -------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    variant: str
    target: str
    preset: str
    device: str  # as requested
    backend: str  # what should run it (backend_for)
    result: str = "pending"  # pass, fail, error or skip
    reason: str | None = None  # why skipped, or the error
    failures: list[str] = field(default_factory=list)
    artifact: str | None = None  # relative to the output directory
    bytes: int | None = None
    bits_per_weight: float | None = None
    kld_mean: float | None = None
    kld_p999: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    gen_exact: float | None = None
    runtime: dict | None = None  # what the report says ran the artifact
    reference: dict | None = None  # and the reference
    digest: dict | None = None  # sha256 of the artifact (artifact_digest)
    plan_file: str | None = None
    report_files: dict[str, str] = field(default_factory=dict)
    report: dict | None = None  # the full validation report
    seconds: dict[str, float] = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    traceback: str | None = None

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.target}/{self.preset}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def take_report(self, rep) -> None:
        """Metrics and result from a harness.Report."""
        lg, gm = rep.logits, rep.generation
        self.bits_per_weight, self.bytes = rep.bits_per_weight, rep.artifact_bytes
        if lg:
            self.kld_mean, self.kld_p999, self.top1, self.ppl_ratio = (lg.kld_mean, lg.kld_p999, lg.top1_agreement,
                                                                       lg.ppl_ratio)
        if gm:
            self.gen_exact = gm.exact_match_rate
        self.runtime, self.reference = rep.runtime, rep.reference
        self.failures = list(rep.failures)
        self.report = rep.to_json()
        self.result = "pass" if rep.passed else "fail"


def plan_cells(variants: list[str], quants: dict[str, list[str]], device: str, p: Platform) -> list[Cell]:
    """Every cell, in order (variant, target, preset), with skipped ones already decided."""
    cells = []
    for v in variants:
        for t, presets in quants.items():
            why = skip_reason(t, device, p)
            for q in presets:
                c = Cell(v, t, q, device, backend_for(t, device))
                if why:
                    c.result, c.reason = "skip", why
                cells.append(c)
    return cells


@dataclass
class MatrixResult:
    cells: list[Cell]
    out_dir: Path
    device: str
    platform: Platform
    settings: dict[str, Any]
    started: str
    finished: str | None = None

    @property
    def passed(self) -> bool:
        """False when any cell failed or errored; skipped cells do not fail the run."""
        return not any(c.result in ("fail", "error") for c in self.cells)

    def counts(self) -> dict[str, int]:
        return {r: sum(c.result == r for c in self.cells) for r in ("pass", "fail", "error", "skip", "pending")}

    def path(self, what: str) -> Path:
        return self.out_dir / OUTPUTS[what]


# ---- running -----------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def export(target: str, variant: str, preset: str, out_dir: Path, force: bool, reporter: Reporter):
    """One export through the target's own exporter (imported only when needed); an ExportResult."""
    if target == "gguf":
        from ..targets.gguf import export_gguf

        return export_gguf(variant, None, preset, out_dir, None, None, force, reporter)
    if target == "mlx":
        from ..targets.mlx import export_mlx

        return export_mlx(variant, None, preset, None, out_dir, None, None, force, reporter)
    if target == "onnx":
        from ..targets.onnx import export_onnx

        return export_onnx(variant, None, preset, out_dir, None, None, force, reporter)
    raise Gemma4ExportError(f"unknown target {target!r}")


class _References:
    """One fp32 reference per variant, made when its first cell validates and shared by its other cells."""

    def __init__(self, device: str):
        self.device = device
        self._ref: dict[str, Any] = {}
        self._err: dict[str, Exception] = {}

    def get(self, variant: str):
        if variant in self._err:
            raise self._err[variant]
        if variant not in self._ref:
            from ..exporter.source import ModelSource
            from .reference import Reference

            try:
                src = ModelSource.open(variant, None, need_weights=True)
                self._ref[variant] = Reference(src.directory, self.device)
            except Exception as e:
                self._err[variant] = e
                raise
        return self._ref[variant]

    def drop(self, variant: str) -> None:
        self._ref.pop(variant, None)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def run_cell(cell: Cell, refs: _References, out_dir: Path, force: bool, reporter: Reporter,
             windows: int | None, prompts: int | None, new_tokens: int) -> None:
    """Export and validate one cell, recording its result; never raises an Exception."""
    from .harness import validate_artifact

    cell.started = _now()
    t0 = time.perf_counter()
    try:
        r = export(cell.target, cell.variant, cell.preset, out_dir / ARTIFACT_DIR, force, reporter)
        cell.seconds["export"] = time.perf_counter() - t0
        cell.artifact, cell.plan_file = _rel(r.path, out_dir), _rel(write_plan(r.path, r.plan), out_dir)
        cell.digest = artifact_digest(r.path)
        cell.bytes = cell.digest["bytes"]
        t1 = time.perf_counter()
        rep = validate_artifact(r.path, cell.variant, None, cell.device, reporter, windows, prompts, new_tokens,
                                write=True, reference=refs.get(cell.variant))
        cell.seconds["validate"] = time.perf_counter() - t1
        cell.take_report(rep)
        cell.report_files = {k: _rel(p, out_dir) for k, p in report_paths(r.path).items() if p.is_file()}
    except Exception as e:
        cell.result, cell.reason = "error", str(e) if isinstance(e, Gemma4ExportError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, Gemma4ExportError):
            cell.traceback = traceback.format_exc()
    cell.seconds["total"] = time.perf_counter() - t0
    cell.finished = _now()


def run_matrix(
    variants: list[str],
    targets: list[str],
    quants: dict[str, list[str]] | None = None,
    device: str = "cpu",
    out_dir: Path = Path("matrix-out"),
    reporter: Reporter | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    windows: int | None = None,
    prompts: int | None = None,
    new_tokens: int = 64,
    force: bool = True,
) -> MatrixResult:
    """Run every cell of variants x targets x presets on `device`; outputs are rewritten after each cell."""
    names = resolve_variants(variants)
    tq = resolve_quants(resolve_targets(targets), quants)
    check_new_tokens(tq, new_tokens)
    device = device.strip().lower()
    facts = probe_platform(list(tq))
    check_device(device, facts)
    cells = plan_cells(names, tq, device, facts)

    out_dir = Path(out_dir)
    (out_dir / ARTIFACT_DIR).mkdir(parents=True, exist_ok=True)
    settings = {"variants": names, "targets": list(tq), "quants": tq, "windows": windows, "prompts": prompts,
                "new_tokens": new_tokens, "force": force}
    res = MatrixResult(cells, out_dir, device, facts, settings, _now())
    reporter = reporter or Silent()
    refs = _References(device)
    for v in names:
        for cell in (c for c in cells if c.variant == v):
            if cell.result == "pending":
                run_cell(cell, refs, out_dir, force, reporter, windows, prompts, new_tokens)
            write_outputs(res)
            if on_cell:
                on_cell(cell)
        refs.drop(v)  # free the fp32 model before the next variant's
    res.finished = _now()
    write_outputs(res)
    return res


# ---- files -------------------------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Atomically: a temporary file beside it, fsynced, renamed over it."""
    with atomic_file(path, force=True) as st:
        st.path.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_plan(artifact: Path, plan) -> Path:
    p = artifact.parent / f"{artifact.name}.plan.json"
    write_json(p, plan.to_json())
    return p


def report_paths(artifact: Path) -> dict[str, Path]:
    """Where validate_artifact writes its report: beside the artifact (harness.Report.write)."""
    return {"json": artifact.parent / f"{artifact.name}.validation.json",
            "md": artifact.parent / f"{artifact.name}.validation.md"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def artifact_digest(path: Path) -> dict[str, Any]:
    """sha256 of a file; for a directory, every file's and a combined digest (DIR_DIGEST)."""
    path = Path(path)
    if path.is_file():
        return {"kind": "file", "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    rows = [{"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in files]
    combined = hashlib.sha256("".join(f"{r['path']}\t{r['sha256']}\n" for r in rows).encode("utf-8")).hexdigest()
    return {"kind": "directory", "bytes": sum(r["bytes"] for r in rows), "sha256": combined, "files": rows}


def write_outputs(res: MatrixResult) -> None:
    from .svgplot import kld_vs_size_svg

    write_text(res.path("table"), matrix_markdown(res))
    write_json(res.path("record"), matrix_json(res))
    write_text(res.path("plot"), kld_vs_size_svg(plot_points(res.cells), f"Mean KLD against size ({res.device})"))
    write_json(res.path("manifest"), manifest_json(res))


# ---- the table, the record, the plot's points, the manifest -----------------------------------------------------

COLUMNS = ("variant", "target", "preset", "size", "bits per weight", "mean KLD", "p99.9 KLD", "top-1", "PPL ratio",
           "generation match", "result", "seconds")


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table_row(c: Cell) -> list[str]:
    from ..report import human_bytes

    return [c.variant, c.target, c.preset, "—" if c.bytes is None else human_bytes(c.bytes),
            _f(c.bits_per_weight, ".2f"), _f(c.kld_mean, ".2e"), _f(c.kld_p999, ".2e"), _f(c.top1, ".4f"),
            _f(c.ppl_ratio, ".5f"), _f(c.gen_exact, ".3f"), c.result, _f(c.seconds.get("total"), ".1f")]


def matrix_markdown(res: MatrixResult) -> str:
    n = res.counts()
    lines = ["# Validation matrix", "",
             f"Device `{res.device}`; started {res.started}" + (f", finished {res.finished}" if res.finished else
                                                                 " (running)")
             + f". {n['pass']} pass, {n['fail']} fail, {n['error']} error, {n['skip']} skipped"
             + (f", {n['pending']} to run" if n["pending"] else "") + ".", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(c)) + " |" for c in res.cells]
    lines += ["", "Generation match is the greedy exact-match rate; seconds are export plus validation."]
    notes = [f"- {c.name}: {c.result}: {c.reason or '; '.join(c.failures)}" for c in res.cells
             if c.result in ("fail", "error", "skip")]
    ran = [f"- {c.name}: {_describe(c.runtime)} (reference: {_describe(c.reference)})" for c in res.cells
           if c.runtime]
    if notes:
        lines += ["", "## Not passed", ""] + notes
    if ran:
        lines += ["", "## What ran", ""] + ran
    return "\n".join(lines) + "\n"


def _describe(d: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (d or {}).items())


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("gemma4-export", "torch", "transformers", "numpy", "llama-cpp-python", "mlx", "mlx-lm", "onnx",
                "onnxruntime", "onnxruntime-gpu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(res: MatrixResult) -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"requested": res.device, "platform": _platform.platform(),
                            "processor": _platform.processor(), "cpus": os.cpu_count(), **asdict(res.platform)}
    if res.device == "cuda":
        import torch

        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def matrix_json(res: MatrixResult) -> dict[str, Any]:
    return {"started": res.started, "finished": res.finished, "passed": res.passed, "counts": res.counts(),
            "device": device_info(res), "versions": versions(), "settings": res.settings,
            "outputs": dict(OUTPUTS), "cells": [c.to_json() for c in res.cells]}


def plot_points(cells: list[Cell]):
    from .svgplot import Point

    return [Point(c.target, f"{c.variant}/{c.preset}", c.bytes / 1e6, c.kld_mean) for c in cells
            if c.kld_mean is not None and c.bytes is not None]


def manifest_json(res: MatrixResult) -> dict[str, Any]:
    rows = []
    for c in res.cells:
        if c.artifact is None or c.digest is None:
            continue
        rows.append({"path": c.artifact, "target": c.target, "variant": c.variant, "preset": c.preset,
                     **c.digest, "plan": c.plan_file, "validation": c.report_files, "result": c.result})
    return {"created": _now(), "directory_digest": DIR_DIGEST, "artifacts": rows}


def cell_line(c: Cell) -> str:
    """One line per finished cell, for a live summary."""
    head = f"{c.variant} {c.target} {c.preset} {c.result.upper()}"
    if c.result in ("skip", "error"):
        return f"{head}: {c.reason}"
    row = dict(zip(COLUMNS, table_row(c)))
    return (f"{head}  KLD {row['mean KLD']}  top-1 {row['top-1']}  {row['size']}  {row['seconds']}s"
            + (f"  ({'; '.join(c.failures)})" if c.failures else ""))
