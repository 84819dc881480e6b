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
from .types import DROP, GGUF_TYPES, MLX_TYPES, ONNX_TYPES, StorageType


@dataclass(frozen=True)
class Preset:
    """The types one preset offers the rules. Slots, not roles: a rule picks the slot that fits a tensor."""

    name: str
    target: str
    base: str  # every matrix not named by another rule
    embed: str  # the token embedding; tied, so it is also the output head
    ple_table: str  # default for the PLE table (override with ple_type)
    high: str  # what "kept high" means in this preset: the PLE gate and projection
    ple_model_proj: str  # the PLE model projection (llama.cpp never quantizes it; others keep it high)
    full: str  # full precision: norms, layer scalars, the MoE router
    more_bits: str | None = None  # K-quant style mixes: values and down projections on the layers given more bits
    description: str = ""

    @property
    def types(self) -> dict[str, StorageType]:
        return TARGET_TYPES[self.target]


TARGET_TYPES: dict[str, dict[str, StorageType]] = {"gguf": GGUF_TYPES, "onnx": ONNX_TYPES, "mlx": MLX_TYPES}


def _gguf(name, base, embed, ple_table, high, ple_proj, more_bits=None, description=""):
    return Preset(name, "gguf", base, embed, ple_table, high, ple_proj, "F32", more_bits, description)


def _onnx(name, base, embed, ple_table, high, ple_proj, full="FP32", description=""):
    return Preset(name, "onnx", base, embed, ple_table, high, ple_proj, full, None, description)


def _mlx(name, bits, embed_bits, high_bits, more_bits=None, group=64, description=""):
    q = lambda b: "BF16" if b is None else f"Q{b}G{group}"  # noqa: E731
    return Preset(name, "mlx", q(bits), q(embed_bits), q(bits), q(high_bits), q(high_bits), "BF16",
                  q(more_bits) if more_bits else None, description)


# GGUF presets, named as llama.cpp users know them. The token embedding of a K-quant or Q4_0 file gets Q6_K, as
# llama.cpp's own quantizer gives the output head (Gemma's embedding is tied, so it is the output head).
_ALL = (
    _gguf("f32", "F32", "F32", "F32", "F32", "F32", description="everything at 32-bit float"),
    _gguf("bf16", "BF16", "BF16", "BF16", "BF16", "BF16", description="bfloat16 matrices, as trained"),
    _gguf("f16", "F16", "F16", "F16", "F16", "F16", description="float16 matrices"),
    _gguf("q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "BF16", description="8-bit blocks of 32"),
    _gguf("q6_k", "Q6_K", "Q6_K", "Q6_K", "Q8_0", "BF16", description="6-bit K-quant"),
    _gguf("q5_k_m", "Q5_K", "Q6_K", "Q5_K", "Q8_0", "BF16", "Q6_K", "5-bit K-quant mix"),
    _gguf("q4_k_m", "Q4_K", "Q6_K", "Q4_K", "Q8_0", "BF16", "Q6_K", "4-bit K-quant mix"),
    _gguf("q4_0", "Q4_0", "Q6_K", "Q4_0", "Q8_0", "BF16", description="4-bit blocks of 32"),
    # ONNX: float weights, or block-wise MatMulNBits / GatherBlockQuantized (blocks of 32) for int8 and int4.
    _onnx("fp32", "FP32", "FP32", "FP32", "FP32", "FP32", description="32-bit float"),
    _onnx("fp16", "FP16", "FP16", "FP16", "FP16", "FP16", description="float16 weights, float32 compute"),
    _onnx("int8", "INT8", "INT8", "INT8", "INT8", "INT8", description="8-bit blocks of 32"),
    _onnx("int4", "INT4", "INT8", "INT4", "INT8", "INT8", description="4-bit blocks of 32, 8-bit head"),
    # MLX affine quantization as mlx-lm names it (group size 64 here; --group-size makes others). The tied
    # embedding / output head stays bf16: measured on tiny-e2b at 8 bits, quantizing it alone raises mean KLD
    # six-fold (0.0038 against 0.00063 with a bf16 head), more than every other module together.
    _mlx("bf16", None, None, None, description="bfloat16, as trained"),
    _mlx("8bit", 8, None, 8, description="8-bit affine, bf16 tied head"),
    _mlx("6bit", 6, None, 8, description="6-bit affine, 8-bit PLE projections, bf16 tied head"),
    _mlx("4bit", 4, None, 8, description="4-bit affine, 8-bit PLE projections, bf16 tied head"),
    _mlx("mixed", 4, None, 8, more_bits=6, description="4-bit with 6-bit values/down projections on the layers "
                                                        "a K-quant mix favours, 8-bit PLE projections, bf16 head"),
)
PRESETS: dict[tuple[str, str], Preset] = {(p.target, p.name): p for p in _ALL}


MLX_GROUP_SIZES = (32, 64, 128)


def get_preset(name: str, target: str = "gguf", group_size: int | None = None) -> Preset:
    key = (target, name.strip().lower())
    if key not in PRESETS:
        names = [n for t, n in PRESETS if t == target]
        raise QuantError(f"unknown {target} preset {name!r}; choose from {', '.join(names)}")
    p = PRESETS[key]
    if group_size is None or group_size == 64:
        return p
    if target != "mlx":
        raise QuantError(f"--group-size applies to MLX presets only ({target} types have fixed blocks)")
    if group_size not in MLX_GROUP_SIZES:
        raise QuantError(f"--group-size {group_size}: MLX affine quantization takes 32, 64 or 128")
    g = lambda t: t.replace("G64", f"G{group_size}") if t else t  # noqa: E731
    return Preset(p.name, p.target, g(p.base), g(p.embed), g(p.ple_table), g(p.high), g(p.ple_model_proj), p.full,
                  g(p.more_bits), p.description)


def presets_of(target: str) -> list[str]:
    return [n for t, n in PRESETS if t == target]


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
    Rule("ple-model-projection", frozenset({Role.PLE_MODEL_PROJ}), lambda c: c.preset.ple_model_proj,
         "PLE model projection: kept at 16 bits or more; it feeds every layer, and llama.cpp never quantizes it"),
    Rule("ple-projection", frozenset({Role.PLE_GATE, Role.PLE_PROJ}), lambda c: c.preset.high,
         "PLE gate/projection: kept high, their output feeds every layer's residual stream"),
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
