"""The validation matrix: export variants x targets x presets, validate every artifact in its own runtime against one
shared fp32 reference per variant, and write a table, a JSON record, a KLD-against-size plot and a manifest.

Which cells run is decided before any work, from facts about this machine (`registry.probe_platform`) through pure
functions (`check_device`, each target's `skip_reason`), so the decisions are testable without the hardware. A cell
that cannot run here is skipped with its reason; an export or validation that raises is an error; one that misses a
threshold is a failure; the run goes on past all of them. What is asked for is checked in matrix_request.py; the
files are written by matrix_outputs.py.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Gemma4ExportError
from ..progress import Reporter, Silent
from ..targets.registry import Platform, get_target, probe_platform
from .matrix_outputs import OUTPUTS, artifact_digest, now, report_paths, write_outputs
from .matrix_request import check_device, check_new_tokens, resolve_quants, resolve_targets, resolve_variants

ARTIFACT_DIR = "artifacts"


# ---- cells -------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    variant: str
    target: str
    preset: str
    device: str  # as requested
    backend: str  # what should run it (Target.backend)
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
    towers: str | None = None  # the companion tower artifact (GGUF's projector), relative to the output directory
    towers_digest: dict | None = None

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
            tgt = get_target(t)
            why = tgt.skip_reason(device, p)
            for q in presets:
                c = Cell(v, t, q, device, tgt.backend(device))
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


class _References:
    """One set of reference results per variant: read from a stored reference directory when one is given (a
    directory per variant under it, or one reference), else computed by the streamed fp32 model when the variant's
    first cell validates, and shared by its other cells."""

    def __init__(self, device: str, adapter: str | Path | None = None, stored: str | Path | None = None,
                 reporter: Reporter | None = None):
        self.device = device
        self.adapter = adapter
        self.stored = Path(stored) if stored is not None else None
        self.reporter = reporter
        self._ref: dict[str, Any] = {}
        self._err: dict[str, Exception] = {}

    def get(self, variant: str, windows: int | None, prompts: int | None, new_tokens: int):
        if variant in self._err:
            raise self._err[variant]
        if variant not in self._ref:
            from ..exporter.source import ModelSource
            from .harness import EvalSpec
            from .refdata import ReferenceData

            try:
                if self.stored is not None:
                    self._ref[variant] = ReferenceData.load(stored_reference(self.stored, variant))
                else:
                    src = ModelSource.open(variant, None, need_weights=True, adapter=self.adapter)
                    spec = EvalSpec.for_arch(src.arch, windows, prompts, new_tokens)
                    self._ref[variant] = ReferenceData.compute(src, spec, self.device, self.reporter)
            except Exception as e:
                self._err[variant] = e
                raise
        return self._ref[variant]

    def drop(self, variant: str) -> None:
        self._ref.pop(variant, None)


def stored_reference(root: Path, variant: str) -> Path:
    """The reference directory of `variant` under `root`: root/<variant>, or root itself when it is one."""
    from .refdata import JSON_FILE

    if (root / variant / JSON_FILE).is_file():
        return root / variant
    if (root / JSON_FILE).is_file():
        return root
    raise Gemma4ExportError(f"{root}: no stored reference for {variant} (expected {root / variant / JSON_FILE}); "
                            f"make one with `gemma4-export reference --variant {variant} --out {root / variant}`")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def run_cell(cell: Cell, refs: _References, out_dir: Path, force: bool, reporter: Reporter,
             windows: int | None, prompts: int | None, new_tokens: int) -> None:
    """Export and validate one cell, recording its result; never raises an Exception."""
    from ..api import export
    from .harness import validate_artifact

    cell.started = now()
    t0 = time.perf_counter()
    try:
        r = export(cell.target, cell.variant, cell.preset, out_dir / ARTIFACT_DIR, force=force, reporter=reporter,
                   adapter=refs.adapter)
        cell.seconds["export"] = time.perf_counter() - t0
        cell.artifact, cell.plan_file = _rel(r.path, out_dir), _rel(r.plan_file, out_dir)
        cell.digest = artifact_digest(r.path)
        cell.bytes = cell.digest["bytes"]
        if r.towers is not None:
            cell.towers, cell.towers_digest = _rel(r.towers, out_dir), artifact_digest(r.towers)
        t1 = time.perf_counter()
        rep = validate_artifact(r.path, cell.variant, None, cell.device, reporter, windows, prompts, new_tokens,
                                write=True, reference=refs.get(cell.variant, windows, prompts, new_tokens),
                                adapter=refs.adapter)
        cell.seconds["validate"] = time.perf_counter() - t1
        cell.take_report(rep)
        cell.report_files = {k: _rel(p, out_dir) for k, p in report_paths(r.path).items() if p.is_file()}
    except Exception as e:
        cell.result, cell.reason = "error", str(e) if isinstance(e, Gemma4ExportError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, Gemma4ExportError):
            cell.traceback = traceback.format_exc()
    cell.seconds["total"] = time.perf_counter() - t0
    cell.finished = now()


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
    adapter: str | Path | None = None,
    reference: str | Path | None = None,
) -> MatrixResult:
    """Run every cell of variants x targets x presets on `device`; outputs are rewritten after each cell. With
    `adapter`, every variant is the base it is merged into (it must fit each of them)."""
    names = resolve_variants(variants)
    tq = resolve_quants(resolve_targets(targets), quants)
    check_new_tokens(tq, new_tokens)
    device = device.strip().lower()
    facts = probe_platform(list(tq))
    check_device(device, facts, stored_reference=reference is not None)
    cells = plan_cells(names, tq, device, facts)

    out_dir = Path(out_dir)
    (out_dir / ARTIFACT_DIR).mkdir(parents=True, exist_ok=True)
    settings = {"variants": names, "targets": list(tq), "quants": tq, "windows": windows, "prompts": prompts,
                "adapter": Path(adapter).resolve().name if adapter else None,
                "reference": str(reference) if reference else None,
                "new_tokens": new_tokens, "force": force}
    res = MatrixResult(cells, out_dir, device, facts, settings, now())
    reporter = reporter or Silent()
    refs = _References(device, adapter, reference, reporter)
    for v in names:
        for cell in (c for c in cells if c.variant == v):
            if cell.result == "pending":
                run_cell(cell, refs, out_dir, force, reporter, windows, prompts, new_tokens)
            write_outputs(res)
            if on_cell:
                on_cell(cell)
        refs.drop(v)  # free this variant's reference results before the next variant's
    res.finished = now()
    write_outputs(res)
    return res


