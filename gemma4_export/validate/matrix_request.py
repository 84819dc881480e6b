"""What a matrix run is asked for: variants, targets, presets and device, checked before any work.

Every name is checked against the registries (variants, targets, presets) so that a typo fails at once, with the
choices, instead of after an hour of exports.
"""

from __future__ import annotations

from ..errors import Gemma4ExportError
from ..targets.registry import DEVICES, Platform, get_target, target_names


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
    names = [get_target(t).name for t in dict.fromkeys(t.strip().lower() for t in targets if t.strip())]
    if not names:
        raise Gemma4ExportError("the matrix needs at least one target")
    return names


def resolve_quants(targets: list[str], quants: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Every target's presets: those given, or its main preset. Raises on a preset or target that is not known."""
    from ..quant.presets import presets_of

    quants = quants or {}
    for t in quants:
        if t not in target_names():
            raise Gemma4ExportError(f"presets given for unknown target {t!r}; choose from "
                                    f"{', '.join(target_names())}")
        if t not in targets:
            raise Gemma4ExportError(f"presets given for {t}, which is not among the targets ({', '.join(targets)})")
    out: dict[str, list[str]] = {}
    for t in targets:
        names = list(dict.fromkeys(p.strip().lower() for p in quants.get(t, [get_target(t).default_preset])))
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
    from ..quant.presets import presets_of

    targets = resolve_targets(targets)
    out: dict[str, list[str]] = {}
    for spec in specs or []:
        head, sep, tail = spec.partition(":")
        if sep:
            t = head.strip().lower()
            if t not in target_names():
                raise Gemma4ExportError(f"--quants {spec}: unknown target {t!r}; choose from "
                                        f"{', '.join(target_names())}")
            out.setdefault(t, []).extend(_split(tail))
            continue
        for p in _split(spec):
            owners = [t for t in targets if p in presets_of(t)]
            if not owners:
                elsewhere = [t for t in target_names() if p in presets_of(t)]
                hint = (f"it is a {'/'.join(elsewhere)} preset, and the targets are {', '.join(targets)}"
                        if elsewhere else "no target has a preset of that name")
                raise Gemma4ExportError(f"--quants {spec}: unknown preset {p!r} ({hint})")
            for t in owners:
                out.setdefault(t, []).append(p)
    resolve_quants(targets, out)  # raises on anything unknown, before any work
    return out


def check_device(device: str, p: Platform, stored_reference: bool = False) -> None:
    """Raises when the fp32 reference (torch) cannot run on `device` here: then no cell can. With stored references
    the reference does not run here, and only the device's name is checked."""
    if device not in DEVICES:
        raise Gemma4ExportError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if stored_reference:
        return
    if device == "cuda" and not p.torch_cuda:
        raise Gemma4ExportError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False), "
                                "so the fp32 reference cannot run on it; use a CUDA build of torch on a CUDA machine")
    if device == "mps" and not p.torch_mps:
        raise Gemma4ExportError("--device mps: torch sees no Metal device here (torch.backends.mps.is_available() is "
                                "False); mps needs macOS on Apple Silicon")


