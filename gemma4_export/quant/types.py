"""Storage types the targets can write, with their block geometry (elements per block, bytes per block).

GGUF types are named as ggml names them. A type with a block size above 1 needs rows whose length is a multiple
of it; the plan checks this for every tensor instead of letting a runtime fall back silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QuantError


@dataclass(frozen=True)
class StorageType:
    name: str
    block: int  # elements per block
    block_bytes: int  # bytes per block
    is_float: bool

    def nbytes(self, numel: int) -> int:
        return numel // self.block * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block

    def holds_rows(self, row_length: int) -> bool:
        return row_length % self.block == 0


GGUF_TYPES: dict[str, StorageType] = {
    t.name: t
    for t in (
        StorageType("F32", 1, 4, True),
        StorageType("F16", 1, 2, True),
        StorageType("BF16", 1, 2, True),
        StorageType("Q8_0", 32, 34, False),
        StorageType("Q6_K", 256, 210, False),
        StorageType("Q5_K", 256, 176, False),
        StorageType("Q4_K", 256, 144, False),
        StorageType("Q5_0", 32, 22, False),
        StorageType("Q5_1", 32, 24, False),
        StorageType("Q4_0", 32, 18, False),
        StorageType("Q3_K", 256, 110, False),
        StorageType("Q2_K", 256, 84, False),
        StorageType("IQ4_XS", 256, 136, False),
        StorageType("IQ4_NL", 32, 18, False),
    )
}
ONNX_TYPES: dict[str, StorageType] = {
    t.name: t
    for t in (
        StorageType("FP32", 1, 4, True),
        StorageType("FP16", 1, 2, True),
        # MatMulNBits / GatherBlockQuantized, blocks of 32 along the input dimension, symmetric, float32 scales.
        StorageType("INT8", 32, 32 + 4, False),
        StorageType("INT4", 32, 16 + 4, False),
    )
}
# MLX affine quantization: `bits` per weight plus a bf16 scale and bias per group. Every width mx.quantize's affine
# mode packs (codes as a little-endian bit stream in uint32 words; 3, 5 and 6 bits straddle words) and mlx-lm's
# loader builds from config.json's per-module bits.
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (32, 64, 128)
MLX_TYPES: dict[str, StorageType] = {
    "F32": StorageType("F32", 1, 4, True),
    "BF16": StorageType("BF16", 1, 2, True),
    "F16": StorageType("F16", 1, 2, True),
    **{f"Q{b}G{g}": StorageType(f"Q{b}G{g}", g, g * b // 8 + 4, False) for b in MLX_BITS for g in MLX_GROUPS},
}
DROP = "DROP"

# What a type becomes when a tensor's rows are not a multiple of its block: the 32-block type of about the same
# bits, as llama.cpp's quantizer does (llama-quant.cpp, tensor_type_fallback); F16 when even that does not fit.
FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


def storage_type(name: str, table: dict[str, StorageType] = GGUF_TYPES) -> StorageType:
    key = name.strip().upper()
    if key not in table:
        raise QuantError(f"unknown tensor type {name!r}; known types: {', '.join(table)}")
    return table[key]
