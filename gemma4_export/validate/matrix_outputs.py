"""The matrix's outputs: a Markdown table, a JSON record, a KLD-against-size plot and a manifest of the artifacts,
each rewritten atomically after every cell."""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_text

if TYPE_CHECKING:
    from .matrix import Cell, MatrixResult

OUTPUTS = {"table": "matrix.md", "record": "matrix.json", "plot": "matrix-kld-vs-size.svg",
           "manifest": "manifest.json"}
DIR_DIGEST = "sha256 over the lines '<relative path>\\t<sha256 of the file>\\n' of every file, sorted by path"


# ---- files -------------------------------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
    from ..targets.registry import targets
    from .svgplot import kld_vs_size_svg

    write_text(res.path("table"), matrix_markdown(res))
    write_json(res.path("record"), matrix_json(res))
    colors = {n: t.color for n, t in targets().items()}
    write_text(res.path("plot"), kld_vs_size_svg(plot_points(res.cells), f"Mean KLD against size ({res.device})",
                                                 colors=colors))
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
    seen: set[str] = set()
    for c in res.cells:
        if c.artifact is None or c.digest is None:
            continue
        rows.append({"path": c.artifact, "target": c.target, "variant": c.variant, "preset": c.preset,
                     **c.digest, "plan": c.plan_file, "validation": c.report_files, "result": c.result})
        if c.towers is not None and c.towers_digest is not None and c.towers not in seen:
            # one projector per checkpoint, shared by its quants' cells (each validates it with its text GGUF)
            seen.add(c.towers)
            rows.append({"path": c.towers, "target": c.target, "variant": c.variant, "role": "towers",
                         **c.towers_digest, "plan": f"{c.towers}.plan.json",
                         "used_by": [d.artifact for d in res.cells if d.towers == c.towers]})
    return {"created": now(), "directory_digest": DIR_DIGEST, "artifacts": rows}


def cell_line(c: Cell) -> str:
    """One line per finished cell, for a live summary."""
    head = f"{c.variant} {c.target} {c.preset} {c.result.upper()}"
    if c.result in ("skip", "error"):
        return f"{head}: {c.reason}"
    row = dict(zip(COLUMNS, table_row(c)))
    return (f"{head}  KLD {row['mean KLD']}  top-1 {row['top-1']}  {row['size']}  {row['seconds']}s"
            + (f"  ({'; '.join(c.failures)})" if c.failures else ""))
