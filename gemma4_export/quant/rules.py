"""Gemma 4 quantization rules: one ordered table, read by every target, first match wins.

A preset names the few types a rule can pick from (the base matrix type, the type for the tied embedding, the type
that "high" means, the K-quant mix's extra-bits type, ...). A rule decides, from the tensor's role and layer, which
of the preset's slots applies, and says why. Targets add presets, never rules of their own, so a Gemma 4 decision
(router at full precision, PLE projections high, the PLE table explicit) holds for GGUF, MLX and ONNX alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import QuantError
from ..exporter.arch import Gemma4Arch
from ..exporter.tensors import Role, TensorSpec
from .types import DROP, GGUF_TYPES, StorageType


@dataclass(frozen=True)
class Preset:
    name: str
    target: str
    base: str  # every matrix not named by another rule
    embed: str  # the token embedding; tied, so it is also the output head
    ple_table: str  # default for the PLE table (override with ple_type)
    high: str  # what "kept high" means in this preset: PLE projections
    full: str  # full precision: norms, layer scalars, router
    more_bits: str | None = None  # K-quant mixes: attn_v / ffn_down on the layers llama.cpp gives more bits
    description: str = ""

    @property
    def types(self) -> dict[str, StorageType]:
        return TARGET_TYPES[self.target]


TARGET_TYPES: dict[str, dict[str, StorageType]] = {"gguf": GGUF_TYPES}

# GGUF presets, named as llama.cpp users know them. The token embedding of a K-quant or Q4_0 file gets Q6_K, as
# llama.cpp's own quantizer gives the output head (Gemma's embedding is tied, so it is the output head).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("f32", "gguf", "F32", "F32", "F32", "F32", "F32", description="everything at 32-bit float"),
        Preset("bf16", "gguf", "BF16", "BF16", "BF16", "BF16", "F32", description="bfloat16 matrices, as trained"),
        Preset("f16", "gguf", "F16", "F16", "F16", "F16", "F32", description="float16 matrices"),
        Preset("q8_0", "gguf", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "F32", description="8-bit blocks of 32"),
        Preset("q6_k", "gguf", "Q6_K", "Q6_K", "Q6_K", "Q8_0", "F32", description="6-bit K-quant"),
        Preset("q5_k_m", "gguf", "Q5_K", "Q6_K", "Q5_K", "Q8_0", "F32", "Q6_K", "5-bit K-quant mix"),
        Preset("q4_k_m", "gguf", "Q4_K", "Q6_K", "Q4_K", "Q8_0", "F32", "Q6_K", "4-bit K-quant mix"),
        Preset("q4_0", "gguf", "Q4_0", "Q6_K", "Q4_0", "Q8_0", "F32", description="4-bit blocks of 32"),
    )
}


def get_preset(name: str, target: str | None = None) -> Preset:
    key = name.strip().lower()
    if key not in PRESETS or (target and PRESETS[key].target != target):
        names = [p for p, v in PRESETS.items() if target is None or v.target == target]
        raise QuantError(f"unknown {target or ''} preset {name!r}".replace("  ", " ") + f"; choose from {', '.join(names)}")
    return PRESETS[key]


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get extra bits in the K-quant mixes: the first and last eighth, and every
    third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Ctx:
    spec: TensorSpec
    arch: Gemma4Arch
    preset: Preset
    ple_type: str | None


@dataclass(frozen=True)
class Rule:
    name: str
    roles: frozenset[Role]
    pick: Callable[[Ctx], str | None]  # a type name, DROP, or None when the rule does not apply
    reason: str


def _carries_values(c: Ctx) -> bool:
    """attn_v, or attn_k on a K==V full layer, where the key projection is also the value projection."""
    s = c.spec
    return s.role == Role.ATTN_V or (s.role == Role.ATTN_K and s.layer is not None and not c.arch.has_v_proj(s.layer))


def _more_bits(c: Ctx) -> str | None:
    s = c.spec
    if c.preset.more_bits is None or s.layer is None or not use_more_bits(s.layer, c.arch.num_layers):
        return None
    if s.role in (Role.MLP_DOWN, Role.EXPERT_DOWN) or _carries_values(c):
        return c.preset.more_bits
    return None


RULES: tuple[Rule, ...] = (
    Rule("tower", frozenset({Role.TOWER}), lambda c: DROP,
         "vision/audio tower: not part of the text decoder artifact"),
    Rule("kv-shared", frozenset({Role.KV_SHARED_UNUSED}), lambda c: DROP,
         "KV-shared layer: reads its donor layer's cache, so its own k/v weights are never used"),
    Rule("router", frozenset({Role.ROUTER_PROJ, Role.ROUTER_SCALE, Role.ROUTER_EXPERT_SCALE}), lambda c: c.preset.full,
         "MoE router: expert choice is discrete, a small error flips experts; kept at full precision"),
    Rule("norm", frozenset({Role.NORM}), lambda c: c.preset.full, "norm weight: full precision"),
    Rule("layer-scalar", frozenset({Role.LAYER_SCALAR}), lambda c: c.preset.full, "layer scalar: full precision"),
    Rule("ple-table", frozenset({Role.PLE_TABLE}), lambda c: c.ple_type or c.preset.ple_table,
         "PLE table: explicit setting (--ple-type); default follows the preset's base type, since it is the largest "
         "tensor (46% of E2B) and is read by row lookup, not accumulated in a matmul"),
    Rule("ple-projection", frozenset({Role.PLE_MODEL_PROJ, Role.PLE_GATE, Role.PLE_PROJ}), lambda c: c.preset.high,
         "PLE projection: kept high, its output feeds every layer's residual stream"),
    Rule("token-embedding", frozenset({Role.TOKEN_EMBD}), lambda c: c.preset.embed,
         "token embedding: tied, so it is also the output head; given the output head's type"),
    Rule("more-bits", frozenset({Role.ATTN_V, Role.ATTN_K, Role.MLP_DOWN, Role.EXPERT_DOWN}), _more_bits,
         "K-quant mix: values (attn_v, or attn_k where K==V) and down projections get more bits on this layer"),
    Rule("matrix", frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.MLP_GATE, Role.MLP_UP,
                              Role.MLP_DOWN, Role.EXPERT_GATE_UP, Role.EXPERT_DOWN}), lambda c: c.preset.base,
         "weight matrix: the preset's base type"),
)


def decide(ctx: Ctx) -> tuple[str, str, str]:
    """(type name or DROP, rule name, reason) for one tensor: the first rule that applies."""
    for rule in RULES:
        if ctx.spec.role in rule.roles:
            t = rule.pick(ctx)
            if t is not None:
                return t, rule.name, rule.reason
    raise QuantError(f"no quantization rule covers '{ctx.spec.name}' (role {ctx.spec.role.value})")
