"""The library API. The CLI parses arguments and calls these; scripts and tests can call them directly."""

from __future__ import annotations

from pathlib import Path

from .exporter.source import ModelSource
from .quant.plan import Plan, build_plan


def make_plan(
    variant: str | None = None,
    model_dir: str | Path | None = None,
    quant: str = "q4_k_m",
    overrides: list[str] | None = None,
    ple_type: str | None = None,
    target: str = "gguf",
    group_size: int | None = None,
) -> Plan:
    """The per-tensor plan: from the shipped config for a published variant (no weights needed), from the weights
    for a tiny variant or a --model-dir checkpoint (so the plan lists the file's own tensors)."""
    src = ModelSource.open(variant, model_dir)
    return build_plan(src.arch, src.tensor_specs(), quant, src.name, overrides, ple_type, target, group_size)
