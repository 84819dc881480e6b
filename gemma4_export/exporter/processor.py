"""The checkpoint's processor settings (processor_config.json, preprocessor_config.json), as the towers' artifacts
need them: the image normalisation llama.cpp's projector records, and the audio features' mel-bin count.

Gemma 4's image processor rescales pixels to [0, 1] and does not normalise (do_normalize false, mean 0, std 1), and
its audio feature extractor takes 128 mel bins: those are the values used where a checkpoint has no processor files
(llama.cpp's own converter stops there with KeyError 'image_mean')."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def processor_config(directory: str | Path) -> dict:
    """processor_config.json over preprocessor_config.json ({} when neither is there)."""
    d = Path(directory)
    out: dict = {}
    for name in PROCESSOR_FILES:
        p = d / name
        if p.is_file():
            try:
                body = json.loads(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{p}: not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise CheckpointError(f"{p}: expected a JSON object")
            out.update(body)
    return out


def image_normalisation(directory: str | Path) -> tuple[list[float], list[float]]:
    """(mean, std) per channel that the image processor applies after rescaling: identity unless it normalises."""
    cfg = processor_config(directory)
    img = {**cfg, **(cfg.get("image_processor") or {})}
    if not img.get("do_normalize", False):
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean, std = img.get("image_mean"), img.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3):
        raise CheckpointError(f"{directory}: the image processor normalises but its image_mean / image_std are not "
                              "three numbers each")
    return [float(x) for x in mean], [float(x) for x in std]


def mel_bins(directory: str | Path, default: int = 128) -> int:
    """The audio feature extractor's mel-bin count (feature_size)."""
    fe = processor_config(directory).get("feature_extractor") or {}
    return int(fe.get("feature_size", default))
