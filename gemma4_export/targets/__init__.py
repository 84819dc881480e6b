"""One module per output format, each registering its Target (registry.py). What they share: tokenizer files and
float encodings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """The checkpoint's tokenizer files that exist, copied into an artifact directory."""
    import shutil

    copied = []
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, dest / f)
            copied.append(f)
    return copied


def bf16_bits(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN kept NaN)."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def encode_float(f32: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values as a float storage type (F32, F16 or BF16)."""
    if type_name == "F32":
        return np.ascontiguousarray(f32, dtype=np.float32)
    if type_name == "F16":
        return f32.astype(np.float16)
    if type_name == "BF16":
        return bf16_bits(f32)
    raise ValueError(f"{type_name} is not a float storage type")
