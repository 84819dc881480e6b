"""The variant registry: every published Gemma 4 model and the shipped tiny checkpoints built like them.

Published configs ship inside the package (exporter/configs/*.json, hub form), so anything that needs only shapes
(the plan, metadata checks) works offline with no weights. Tiny variants ship their weights
(tiny/checkpoints/<name>/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import UnknownVariantError
from .arch import Gemma4Arch, parse_config

_CONFIG_DIR = Path(__file__).parent / "configs"
TINY_DIR = Path(__file__).resolve().parent.parent / "tiny" / "checkpoints"


@dataclass(frozen=True)
class Variant:
    name: str  # registry key, e.g. "e2b", "e2b-it", "tiny-e2b"
    hub_id: str | None  # None for tiny variants (they ship with the package)
    base: str  # the published config it is built from / named after
    instruction_tuned: bool = False
    tiny: bool = False
    # Published parameter count with towers (facts file); None for tiny variants.
    published_parameters: int | None = None

    @property
    def config_path(self) -> Path:
        return TINY_DIR / self.name / "config.json" if self.tiny else _CONFIG_DIR / f"{self.base}.json"

    @property
    def local_dir(self) -> Path | None:
        """Where the weights are without any download: the package itself for tiny variants."""
        return TINY_DIR / self.name if self.tiny else None

    def config(self) -> dict[str, Any]:
        return _load_json(self.config_path)

    def arch(self) -> Gemma4Arch:
        return _arch(self.config_path)

    @property
    def model_class(self) -> str:
        return self.arch().architecture


@cache
def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def _arch(path: Path) -> Gemma4Arch:
    return parse_config(_load_json(path), source=str(path))


_PUBLISHED = {
    # name: (hub id, parameters with towers)
    "e2b": ("google/gemma-4-E2B", 5_123_178_051),
    "e4b": ("google/gemma-4-E4B", 7_996_156_490),
    "12b": ("google/gemma-4-12B", 11_959_730_224),
    "26b-a4b": ("google/gemma-4-26B-A4B", 25_805_936_206),
    "31b": ("google/gemma-4-31B", 31_273_088_876),
}
# Tiny checkpoints: trained, small, and built with the same layout and features as the variant they are named after.
TINY = ("tiny-e2b", "tiny-12b", "tiny-26b-a4b", "tiny-31b")
# A fine-tune of tiny-e2b in the layout transformers' save_pretrained writes (no k/v weights on the KV-shared layers,
# transformers' config form), trained further with tokens added to its vocabulary: the form users' own checkpoints
# come in (scripts/build_tiny.py --finetune). Not in TINY, so the default matrix stays one model per architecture.
TINY_FINETUNES = ("tiny-e2b-ft",)
# Quantization-aware-trained tiny checkpoints, built as Google's `-qat-q4_0-unquantized` releases are: every decoder
# weight matrix trained with fake quantization on a 4-bit lattice (groups of 32, learned steps) and saved as the
# lattice values in bf16 (scripts/build_tiny.py --qat). Not in TINY either.
TINY_QAT = ("tiny-e2b-qat", "tiny-26b-a4b-qat")


def _build() -> dict[str, Variant]:
    reg: dict[str, Variant] = {}
    for name, (hub, params) in _PUBLISHED.items():
        reg[name] = Variant(name, hub, name, published_parameters=params)
        reg[f"{name}-it"] = Variant(f"{name}-it", f"{hub}-it", name, instruction_tuned=True, published_parameters=params)
    for name in TINY:
        reg[name] = Variant(name, None, name.removeprefix("tiny-"), tiny=True)
    for name in TINY_FINETUNES:
        reg[name] = Variant(name, None, name.removeprefix("tiny-").removesuffix("-ft"), tiny=True)
    for name in TINY_QAT:
        reg[name] = Variant(name, None, name.removeprefix("tiny-").removesuffix("-qat"), tiny=True)
    return reg


VARIANTS: dict[str, Variant] = _build()


def get_variant(name: str) -> Variant:
    key = name.strip().lower()
    if key in VARIANTS:
        return VARIANTS[key]
    # Accept hub ids too: "google/gemma-4-E2B-it" -> "e2b-it".
    for v in VARIANTS.values():
        if v.hub_id and v.hub_id.lower() == key:
            return v
    raise UnknownVariantError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
