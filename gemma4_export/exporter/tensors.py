"""The tensors a Gemma 4 checkpoint holds, with their shapes and roles, derived from the typed config alone.

Every text tensor has one canonical key (`Tensor`, in the spirit of gguf-py's MODEL_TENSOR: a name with a `{bid}`
slot for the layer). The Hugging Face spelling of each key lives here and nowhere else (`HF_NAMES`); every target
maps from the key through its own table, so a renamed checkpoint tensor is one line in this file.

The expected list is what the reader checks a checkpoint against and what the quantization plan is built from, so
that `plan --variant 31b` works with no weights and `plan --model-dir` shows the same rows as the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from ..errors import CheckpointError
from .arch import Gemma4Arch

# Multimodal checkpoints (every published one) keep the text decoder under this prefix; text-only saves use "model.".
TEXT_PREFIX = "model.language_model."
TEXT_ONLY_PREFIX = "model."
# Tower prefixes. The 12B unified model's vision embedder appears under both names in the wild.
TOWER_PREFIXES = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
    "model.vision_embedder.",
    "model.audio_embedder.",
)


class Role(str, Enum):
    """What a tensor does, as the quantization rules see it."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"  # an untied output head
    PLE_TABLE = "ple_table"
    PLE_MODEL_PROJ = "ple_model_proj"
    PLE_GATE = "ple_gate"
    PLE_PROJ = "ple_proj"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    EXPERT_GATE_UP = "expert_gate_up"
    EXPERT_DOWN = "expert_down"
    ROUTER_PROJ = "router_proj"
    ROUTER_SCALE = "router_scale"
    ROUTER_EXPERT_SCALE = "router_expert_scale"
    NORM = "norm"
    LAYER_SCALAR = "layer_scalar"
    KV_SHARED_UNUSED = "kv_shared_unused"  # k/v/k_norm that KV-shared layers carry but never use
    TOWER = "tower"


class Tensor(str, Enum):
    """Canonical keys of the Gemma 4 text tensors. `{bid}` is the layer."""

    TOKEN_EMBD = "token_embd"
    PLE_TABLE = "per_layer_token_embd"
    PLE_MODEL_PROJ = "per_layer_model_proj"
    PLE_PROJ_NORM = "per_layer_proj_norm"
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"  # an untied head
    ATTN_NORM = "blk.{bid}.attn_norm"
    ATTN_POST_NORM = "blk.{bid}.post_attention_norm"
    FFN_PRE_NORM = "blk.{bid}.ffn_norm"
    FFN_POST_NORM = "blk.{bid}.post_ffw_norm"
    FFN_PRE_NORM_2 = "blk.{bid}.pre_ffw_norm_2"
    FFN_POST_NORM_1 = "blk.{bid}.post_ffw_norm_1"
    FFN_POST_NORM_2 = "blk.{bid}.post_ffw_norm_2"
    ATTN_Q = "blk.{bid}.attn_q"
    ATTN_K = "blk.{bid}.attn_k"
    ATTN_V = "blk.{bid}.attn_v"
    ATTN_OUT = "blk.{bid}.attn_output"
    ATTN_Q_NORM = "blk.{bid}.attn_q_norm"
    ATTN_K_NORM = "blk.{bid}.attn_k_norm"
    FFN_GATE = "blk.{bid}.ffn_gate"
    FFN_UP = "blk.{bid}.ffn_up"
    FFN_DOWN = "blk.{bid}.ffn_down"
    ROUTER = "blk.{bid}.ffn_gate_inp"
    ROUTER_SCALE = "blk.{bid}.ffn_gate_inp.scale"
    ROUTER_EXPERT_SCALE = "blk.{bid}.ffn_down_exps.scale"
    EXPERTS_GATE_UP = "blk.{bid}.ffn_gate_up_exps"
    EXPERTS_DOWN = "blk.{bid}.ffn_down_exps"
    PLE_GATE = "blk.{bid}.inp_gate"
    PLE_PROJ = "blk.{bid}.proj"
    PLE_POST_NORM = "blk.{bid}.post_norm"
    LAYER_SCALAR = "blk.{bid}.layer_output_scale"

    @property
    def per_layer(self) -> bool:
        return "{bid}" in self.value


# The Hugging Face spelling of every key, under the text prefix: the only place it is written.
HF_NAMES: dict[Tensor, str] = {
    Tensor.TOKEN_EMBD: "embed_tokens.weight",
    Tensor.PLE_TABLE: "embed_tokens_per_layer.weight",
    Tensor.PLE_MODEL_PROJ: "per_layer_model_projection.weight",
    Tensor.PLE_PROJ_NORM: "per_layer_projection_norm.weight",
    Tensor.OUTPUT_NORM: "norm.weight",
    Tensor.ATTN_NORM: "layers.{bid}.input_layernorm.weight",
    Tensor.ATTN_POST_NORM: "layers.{bid}.post_attention_layernorm.weight",
    Tensor.FFN_PRE_NORM: "layers.{bid}.pre_feedforward_layernorm.weight",
    Tensor.FFN_POST_NORM: "layers.{bid}.post_feedforward_layernorm.weight",
    Tensor.FFN_PRE_NORM_2: "layers.{bid}.pre_feedforward_layernorm_2.weight",
    Tensor.FFN_POST_NORM_1: "layers.{bid}.post_feedforward_layernorm_1.weight",
    Tensor.FFN_POST_NORM_2: "layers.{bid}.post_feedforward_layernorm_2.weight",
    Tensor.ATTN_Q: "layers.{bid}.self_attn.q_proj.weight",
    Tensor.ATTN_K: "layers.{bid}.self_attn.k_proj.weight",
    Tensor.ATTN_V: "layers.{bid}.self_attn.v_proj.weight",
    Tensor.ATTN_OUT: "layers.{bid}.self_attn.o_proj.weight",
    Tensor.ATTN_Q_NORM: "layers.{bid}.self_attn.q_norm.weight",
    Tensor.ATTN_K_NORM: "layers.{bid}.self_attn.k_norm.weight",
    Tensor.FFN_GATE: "layers.{bid}.mlp.gate_proj.weight",
    Tensor.FFN_UP: "layers.{bid}.mlp.up_proj.weight",
    Tensor.FFN_DOWN: "layers.{bid}.mlp.down_proj.weight",
    Tensor.ROUTER: "layers.{bid}.router.proj.weight",
    Tensor.ROUTER_SCALE: "layers.{bid}.router.scale",
    Tensor.ROUTER_EXPERT_SCALE: "layers.{bid}.router.per_expert_scale",
    Tensor.EXPERTS_GATE_UP: "layers.{bid}.experts.gate_up_proj",
    Tensor.EXPERTS_DOWN: "layers.{bid}.experts.down_proj",
    Tensor.PLE_GATE: "layers.{bid}.per_layer_input_gate.weight",
    Tensor.PLE_PROJ: "layers.{bid}.per_layer_projection.weight",
    Tensor.PLE_POST_NORM: "layers.{bid}.post_per_layer_input_norm.weight",
    Tensor.LAYER_SCALAR: "layers.{bid}.layer_scalar",
}
# The untied output head sits beside the decoder, not under its prefix ("lm_head.weight" in every class).
HF_HEAD = "lm_head.weight"

ROLES: dict[Tensor, Role] = {
    Tensor.TOKEN_EMBD: Role.TOKEN_EMBD, Tensor.OUTPUT: Role.OUTPUT, Tensor.PLE_TABLE: Role.PLE_TABLE,
    Tensor.PLE_MODEL_PROJ: Role.PLE_MODEL_PROJ, Tensor.PLE_GATE: Role.PLE_GATE, Tensor.PLE_PROJ: Role.PLE_PROJ,
    Tensor.ATTN_Q: Role.ATTN_Q, Tensor.ATTN_K: Role.ATTN_K, Tensor.ATTN_V: Role.ATTN_V, Tensor.ATTN_OUT: Role.ATTN_O,
    Tensor.FFN_GATE: Role.MLP_GATE, Tensor.FFN_UP: Role.MLP_UP, Tensor.FFN_DOWN: Role.MLP_DOWN,
    Tensor.EXPERTS_GATE_UP: Role.EXPERT_GATE_UP, Tensor.EXPERTS_DOWN: Role.EXPERT_DOWN,
    Tensor.ROUTER: Role.ROUTER_PROJ, Tensor.ROUTER_SCALE: Role.ROUTER_SCALE,
    Tensor.ROUTER_EXPERT_SCALE: Role.ROUTER_EXPERT_SCALE, Tensor.LAYER_SCALAR: Role.LAYER_SCALAR,
}  # every other key is a norm weight

_HF_PATTERNS = tuple((re.compile(re.escape(v).replace(r"\{bid\}", r"(\d+)") + "$"), k) for k, v in HF_NAMES.items())


def hf_name(key: Tensor, bid: int | None = None, prefix: str = TEXT_PREFIX) -> str:
    """The checkpoint name of a key (layer `bid`) under the text prefix."""
    if key is Tensor.OUTPUT:
        return HF_HEAD
    return prefix + HF_NAMES[key].format(bid=bid)


def parse_hf_name(name: str, prefix: str = TEXT_PREFIX) -> tuple[Tensor, int | None] | None:
    """(key, layer) of a checkpoint text tensor name, or None when it is not one."""
    if name == HF_HEAD:
        return Tensor.OUTPUT, None
    if not name.startswith(prefix):
        return None
    rel = name[len(prefix):]
    for rx, key in _HF_PATTERNS:
        m = rx.match(rel)
        if m:
            return key, int(m.group(1)) if m.groups() else None
    return None


# Roles whose tensors are matrices that a quantizer may touch (everything else stays float or is dropped).
MATRIX_ROLES = frozenset(
    {
        Role.TOKEN_EMBD,
        Role.OUTPUT,
        Role.PLE_TABLE,
        Role.PLE_MODEL_PROJ,
        Role.PLE_GATE,
        Role.PLE_PROJ,
        Role.ATTN_Q,
        Role.ATTN_K,
        Role.ATTN_V,
        Role.ATTN_O,
        Role.MLP_GATE,
        Role.MLP_UP,
        Role.MLP_DOWN,
        Role.EXPERT_GATE_UP,
        Role.EXPERT_DOWN,
        Role.ROUTER_PROJ,
    }
)


@dataclass(frozen=True)
class TensorSpec:
    name: str  # full checkpoint name, e.g. model.language_model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]
    role: Role
    layer: int | None = None
    key: Tensor | None = None  # None for tower tensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        """Elements per row as a quantizer sees it: the last (input) dimension."""
        return self.shape[-1]


def _spec(key: Tensor, shape: tuple[int, ...], prefix: str, bid: int | None = None, role: Role | None = None
          ) -> TensorSpec:
    return TensorSpec(hf_name(key, bid, prefix), shape, role or ROLES.get(key, Role.NORM), bid, key)


def expected_text_tensors(arch: Gemma4Arch, prefix: str = TEXT_PREFIX) -> list[TensorSpec]:
    """Every text tensor the checkpoint of `arch` holds, in a stable order (globals first, then layer by layer)."""
    h, p = arch.hidden_size, prefix
    out = [_spec(Tensor.TOKEN_EMBD, (arch.vocab_size, h), p)]
    if arch.has_ple:
        width = arch.num_layers * arch.ple_dim
        out += [
            _spec(Tensor.PLE_TABLE, (arch.vocab_size_per_layer_input, width), p),
            _spec(Tensor.PLE_MODEL_PROJ, (width, h), p),
            _spec(Tensor.PLE_PROJ_NORM, (arch.ple_dim,), p),
        ]
    out.append(_spec(Tensor.OUTPUT_NORM, (h,), p))
    if not arch.tie_word_embeddings:
        out.append(_spec(Tensor.OUTPUT, (arch.vocab_size, h), p))
    for i in range(arch.num_layers):
        out += _layer_tensors(arch, i, p)
    return out


def _layer_tensors(arch: Gemma4Arch, i: int, p: str) -> list[TensorSpec]:
    h, hd, kvh = arch.hidden_size, arch.layer_head_dim(i), arch.layer_kv_heads(i)
    unused = Role.KV_SHARED_UNUSED if arch.is_kv_shared(i) else None
    T = Tensor
    s = lambda key, shape, role=None: _spec(key, shape, p, i, role)  # noqa: E731
    t = [s(T.ATTN_NORM, (h,)), s(T.ATTN_POST_NORM, (h,)), s(T.FFN_PRE_NORM, (h,)), s(T.FFN_POST_NORM, (h,)),
         s(T.ATTN_Q, (arch.num_heads * hd, h)), s(T.ATTN_K, (kvh * hd, h), unused)]
    if arch.has_v_proj(i):
        t.append(s(T.ATTN_V, (kvh * hd, h), unused))
    t += [s(T.ATTN_OUT, (h, arch.num_heads * hd)), s(T.ATTN_Q_NORM, (hd,)), s(T.ATTN_K_NORM, (hd,), unused)]
    w = arch.mlp_width(i)
    t += [s(T.FFN_GATE, (w, h)), s(T.FFN_UP, (w, h)), s(T.FFN_DOWN, (h, w))]
    if arch.moe:
        m = arch.moe
        t += [s(T.ROUTER, (m.num_experts, h)), s(T.ROUTER_SCALE, (h,)), s(T.ROUTER_EXPERT_SCALE, (m.num_experts,)),
              s(T.EXPERTS_GATE_UP, (m.num_experts, 2 * m.intermediate_size, h)),
              s(T.EXPERTS_DOWN, (m.num_experts, h, m.intermediate_size)),
              s(T.FFN_PRE_NORM_2, (h,)), s(T.FFN_POST_NORM_1, (h,)), s(T.FFN_POST_NORM_2, (h,))]
    if arch.has_ple:
        t += [s(T.PLE_GATE, (arch.ple_dim, h)), s(T.PLE_PROJ, (h, arch.ple_dim)), s(T.PLE_POST_NORM, (h,))]
    t.append(s(T.LAYER_SCALAR, (1,)))
    return t


def is_tower(name: str) -> bool:
    return name.startswith(TOWER_PREFIXES)


def detect_text_prefix(names: list[str] | set[str]) -> str:
    """The text decoder's prefix in a checkpoint: the multimodal layout or a text-only save."""
    if any(n.startswith(TEXT_PREFIX) for n in names):
        return TEXT_PREFIX
    if any(n.startswith(TEXT_ONLY_PREFIX + "layers.") for n in names):
        return TEXT_ONLY_PREFIX
    raise CheckpointError(
        "no Gemma 4 text decoder in this checkpoint: expected tensors under "
        f"'{TEXT_PREFIX}' (multimodal layout) or '{TEXT_ONLY_PREFIX}layers.' (text-only)"
    )

