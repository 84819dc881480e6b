"""Pass/fail thresholds: what a validation report is held to. Each preset declares its own (quant/presets.py says
how they were chosen)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import Gemma4ExportError


@dataclass(frozen=True)
class Thresholds:
    kld_mean: float  # mean KL(P_ref || Q) over scored tokens, at most
    kld_p999: float  # 99.9th percentile, at most
    top1: float  # top-1 agreement, at least
    ppl_ratio: float  # PPL(artifact) / PPL(reference), at most
    gen_exact: float  # share of prompts whose greedy continuation is identical, at least
    gen_first_div: float = 0.0  # mean first-divergence position (tokens), at least
    max_logit_diff: float | None = None  # float exports: max |logit difference|, at most

    def to_json(self) -> dict:
        return asdict(self)


def thresholds_for(target: str, preset: str) -> Thresholds:
    """The thresholds a preset declares (quant/presets.py, where each preset has all of its facts)."""
    from ..quant.presets import PRESETS

    try:
        return PRESETS[(target, preset)].thresholds
    except KeyError:
        raise Gemma4ExportError(f"no validation thresholds for {target} preset {preset!r}") from None
