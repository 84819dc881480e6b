"""Gemma 4 quantization rules: one ordered table, read by every target, first match wins.

A preset (quant/presets.py) names the few types a rule can pick from (the base matrix type, the type for the tied
embedding, the type that "high" means, the K-quant mix's extra-bits type, ...). A rule decides, from the tensor's role and layer, which
of the preset's slots applies, and says why. Targets add presets, never rules of their own, so a Gemma 4 decision
(router at full precision, PLE projections high, the PLE table explicit) holds for GGUF, MLX and ONNX alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import QuantError
from ..exporter.arch import Gemma4Arch
from ..exporter.tensors import Role, TensorSpec
from ..exporter.tower_names import tower_kind
from .presets import PRESETS, Preset, presets_of
from .types import DROP


def get_preset(name: str, target: str = "gguf", group_size: int | None = None) -> Preset:
    """A target's preset by name; `group_size` remakes a grouped preset (MLX) with another group."""
    from ..targets.registry import get_target

    t = get_target(target)
    key = (t.name, name.strip().lower())
    if key not in PRESETS:
        raise QuantError(f"unknown {t.name} preset {name!r}; choose from {', '.join(presets_of(t.name))}")
    p = PRESETS[key]
    if group_size is None or group_size == t.default_group_size:
        return p
    if not t.group_sizes:
        raise QuantError(f"--group-size does not apply to {t.name} (its types have fixed blocks)")
    if group_size not in t.group_sizes:
        sizes = [str(g) for g in t.group_sizes]
        raise QuantError(f"--group-size {group_size}: {t.name} quantization takes "
                         f"{', '.join(sizes[:-1])} or {sizes[-1]}")
    g = f"G{t.default_group_size}"
    return replace(p, **{k: v.replace(g, f"G{group_size}") for k, v in p.slots.items() if v})


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


def _value_index(c: Ctx) -> int:
    """The position of this layer among the layers that own value weights (llama.cpp's i_attention_wv: KV-shared
    layers have none)."""
    return sum(1 for j in range(c.spec.layer or 0) if not c.arch.is_kv_shared(j))


def _more_bits(c: Ctx) -> str | None:
    """llama.cpp's per-ftype mixes (llama-quant.cpp, llama_tensor_get_type), for the tensors they favour: values,
    down projections (dense and expert) and, in the 2- and 3-bit mixes, the attention output."""
    s, p, n = c.spec, c.preset, c.arch.num_layers
    if not p.mix or s.layer is None:
        return None
    values, down = _carries_values(c), s.role in (Role.MLP_DOWN, Role.EXPERT_DOWN)
    out = s.role == Role.ATTN_O
    i = s.layer
    if p.mix == "k_m":  # Q4_K_M, Q5_K_M (and MLX's mixed): the first and last eighth and every third layer
        return p.more_bits if (values or down) and use_more_bits(i, n) else None
    if p.mix == "k_s":  # Q4_K_S: values of the first four layers, down projections of the first eighth
        return "Q5_K" if (values and _value_index(c) < 4) or (down and i < n // 8) else None
    if p.mix == "q3_k_m":
        if values:
            return "Q5_K" if _value_index(c) < 2 else "Q4_K"
        if down:
            return "Q5_K" if i < n // 16 else ("Q4_K" if use_more_bits(i, n) else None)
        return "Q4_K" if out else None
    if p.mix == "q2_k":
        gqa = c.arch.num_heads // max(1, c.arch.layer_kv_heads(i))
        if values:
            return "Q4_K" if gqa >= 4 else "Q3_K"
        return "Q3_K" if down or out else None
    if p.mix == "iq4_xs":  # values with 4+ query heads per KV head
        return "Q5_K" if values and c.arch.num_heads // max(1, c.arch.layer_kv_heads(i)) >= 4 else None
    raise QuantError(f"preset {p.name}: unknown mix {p.mix!r}")


RULES: tuple[Rule, ...] = (
    Rule("tower", frozenset({Role.TOWER}), lambda c: DROP,
         "vision/audio tower: not in the text decoder artifact; the towers' own artifact (the mmproj GGUF, the MLX "
         "directory's towers, the ONNX encoders) takes them by the tower rules (`plan --towers`)"),
    Rule("kv-shared", frozenset({Role.KV_SHARED_UNUSED}), lambda c: DROP,
         "KV-shared layer: reads its donor layer's cache, so its own k/v weights are never used"),
    Rule("router", frozenset({Role.ROUTER_PROJ, Role.ROUTER_SCALE, Role.ROUTER_EXPERT_SCALE}), lambda c: c.preset.full,
         "MoE router: expert choice is discrete, a small error flips experts; kept at full precision"),
    Rule("norm", frozenset({Role.NORM}), lambda c: c.preset.full, "norm weight: full precision"),
    Rule("layer-scalar", frozenset({Role.LAYER_SCALAR}), lambda c: c.preset.full, "layer scalar: full precision"),
    Rule("ple-table", frozenset({Role.PLE_TABLE}), lambda c: c.ple_type or c.preset.ple_table,
         "PLE table: explicit setting (--ple-type); default follows the preset's base type, since it is the largest "
         "tensor (about half of E2B's text weights) and is read by row lookup, not accumulated in a matmul; "
         "--target-bpw / --max-size choose it by its measured KLD instead (no imatrix covers a lookup table)"),
    Rule("ple-model-projection", frozenset({Role.PLE_MODEL_PROJ}), lambda c: c.preset.ple_model_proj,
         "PLE model projection: it feeds every layer, so it gets the preset's own slot for it: 16 bits in GGUF "
         "(llama.cpp never quantizes it), the preset's high type in MLX and ONNX"),
    Rule("ple-projection", frozenset({Role.PLE_GATE, Role.PLE_PROJ}), lambda c: c.preset.high,
         "PLE gate/projection: kept high, their output feeds every layer's residual stream"),
    Rule("token-embedding", frozenset({Role.TOKEN_EMBD}), lambda c: c.preset.embed,
         "token embedding: tied in Gemma 4's published models, so it is also the output head; given the output "
         "head's type (quantized with the head's imatrix vector); --target-bpw / --max-size choose it by its "
         "measured KLD instead"),
    Rule("output-head", frozenset({Role.OUTPUT}), lambda c: c.preset.embed,
         "untied output head (a fine-tune saved with tie_word_embeddings false): the preset's output-head type, "
         "as the tied embedding gets"),
    Rule("more-bits", frozenset({Role.ATTN_V, Role.ATTN_K, Role.MLP_DOWN, Role.EXPERT_DOWN, Role.ATTN_O}), _more_bits,
         "K-quant mix (llama.cpp's for this file type): values (attn_v, or attn_k where K==V), down projections and, "
         "at 2-3 bits, the attention output get more bits on this layer"),
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


# ---- the towers -------------------------------------------------------------------------------------------------
#
# The vision and audio towers go into their own artifact (llama.cpp's mmproj GGUF, the towers of an mlx-vlm
# directory, the ONNX encoder graphs) and get their types from this table, read by every target the same way: what
# each runtime computes with must stay F32 (the clippable linears' limits, which llama.cpp reads as 1-element F32
# scalars; norms; biases; position tables; the audio convolutions, which llama.cpp's converter also keeps F32), and
# the matrices take the tower type the user chose (GGUF --mmproj f16|q8_0|f32|bf16; MLX keeps the checkpoint's
# bf16, as mlx-vlm's own convert leaves the towers; ONNX the encoder preset's float type).

@dataclass(frozen=True)
class TowerPolicy:
    """The types a target's tower artifact offers the tower rules."""

    name: str  # what the plan calls it: "mmproj-f16", "towers-bf16", "encoders-fp32"
    matrix: str  # attention, MLP and projection matrices
    full: str  # scalars, norms, biases, position tables, audio convolutions
    patch: str  # the patch embedding (a convolution kernel in llama.cpp)


@dataclass(frozen=True)
class TowerRule:
    name: str
    kinds: frozenset[str]
    pick: Callable[[TowerPolicy], str]
    reason: str


TOWER_RULES: tuple[TowerRule, ...] = (
    TowerRule("tower-scalar", frozenset({"scalar"}), lambda p: p.full,
              "tower scalar (a clippable linear's input/output limit, a layer scalar, the standardisation, the "
              "attention's per-dimension scale): full precision; llama.cpp reads the limits as 1-element F32"),
    TowerRule("tower-norm", frozenset({"norm", "bias"}), lambda p: p.full, "tower norm or bias: full precision"),
    TowerRule("tower-position", frozenset({"position"}), lambda p: p.full,
              "tower position table (looked up; llama.cpp's converter keeps it F32) or the audio attention's "
              "projection of its fixed relative-position encodings: full precision"),
    TowerRule("tower-conv", frozenset({"conv"}), lambda p: p.full,
              "audio convolution: full precision (llama.cpp's converter keeps the audio convolutions F32)"),
    TowerRule("tower-patch", frozenset({"patch"}), lambda p: p.patch,
              "patch embedding: the policy's patch type (a convolution kernel in llama.cpp, which takes F16 or F32: "
              "F16 in an f16 projector, F32 otherwise)"),
    TowerRule("tower-matrix", frozenset({"matrix"}), lambda p: p.matrix,
              "tower matrix (attention, MLP, the embedder's projection into the text width): the tower type"),
)


def decide_tower(name: str, shape: tuple[int, ...], policy: TowerPolicy) -> tuple[str, str, str]:
    """(type, rule name, reason) for one tower tensor."""
    kind = tower_kind(name, shape)
    for rule in TOWER_RULES:
        if kind in rule.kinds:
            return rule.pick(policy), rule.name, rule.reason
    raise QuantError(f"no tower rule covers '{name}' ({kind})")
