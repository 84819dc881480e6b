"""The tensors a Gemma 4 checkpoint holds, with their shapes and roles, derived from the typed config alone.

The expected list is what the reader checks a checkpoint against and what the quantization plan is built from, so
that `plan --variant 31b` works with no weights and `plan --model-dir` shows the same rows as the file.
"""

from __future__ import annotations

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
    TOKEN_EMBD = "token_embd"
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


# Roles whose tensors are matrices that a quantizer may touch (everything else stays float or is dropped).
MATRIX_ROLES = frozenset(
    {
        Role.TOKEN_EMBD,
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

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_length(self) -> int:
        """Elements per row as a quantizer sees it: the last (input) dimension."""
        return self.shape[-1]


def expected_text_tensors(arch: Gemma4Arch, prefix: str = TEXT_PREFIX) -> list[TensorSpec]:
    """Every text tensor the checkpoint of `arch` holds, in a stable order (globals first, then layer by layer)."""
    h, p = arch.hidden_size, prefix
    out = [TensorSpec(f"{p}embed_tokens.weight", (arch.vocab_size, h), Role.TOKEN_EMBD)]
    if arch.has_ple:
        width = arch.num_layers * arch.ple_dim
        out += [
            TensorSpec(f"{p}embed_tokens_per_layer.weight", (arch.vocab_size_per_layer_input, width), Role.PLE_TABLE),
            TensorSpec(f"{p}per_layer_model_projection.weight", (width, h), Role.PLE_MODEL_PROJ),
            TensorSpec(f"{p}per_layer_projection_norm.weight", (arch.ple_dim,), Role.NORM),
        ]
    out.append(TensorSpec(f"{p}norm.weight", (h,), Role.NORM))
    for i in range(arch.num_layers):
        out += _layer_tensors(arch, i, f"{p}layers.{i}.")
    return out


def _layer_tensors(arch: Gemma4Arch, i: int, lp: str) -> list[TensorSpec]:
    h, hd, kvh = arch.hidden_size, arch.layer_head_dim(i), arch.layer_kv_heads(i)
    shared = arch.is_kv_shared(i)
    kv_role = (lambda r: Role.KV_SHARED_UNUSED) if shared else (lambda r: r)
    t = [
        TensorSpec(f"{lp}input_layernorm.weight", (h,), Role.NORM, i),
        TensorSpec(f"{lp}post_attention_layernorm.weight", (h,), Role.NORM, i),
        TensorSpec(f"{lp}pre_feedforward_layernorm.weight", (h,), Role.NORM, i),
        TensorSpec(f"{lp}post_feedforward_layernorm.weight", (h,), Role.NORM, i),
        TensorSpec(f"{lp}self_attn.q_proj.weight", (arch.num_heads * hd, h), Role.ATTN_Q, i),
        TensorSpec(f"{lp}self_attn.k_proj.weight", (kvh * hd, h), kv_role(Role.ATTN_K), i),
    ]
    if arch.has_v_proj(i):
        t.append(TensorSpec(f"{lp}self_attn.v_proj.weight", (kvh * hd, h), kv_role(Role.ATTN_V), i))
    t += [
        TensorSpec(f"{lp}self_attn.o_proj.weight", (h, arch.num_heads * hd), Role.ATTN_O, i),
        TensorSpec(f"{lp}self_attn.q_norm.weight", (hd,), Role.NORM, i),
        TensorSpec(f"{lp}self_attn.k_norm.weight", (hd,), kv_role(Role.NORM), i),
    ]
    w = arch.mlp_width(i)
    t += [
        TensorSpec(f"{lp}mlp.gate_proj.weight", (w, h), Role.MLP_GATE, i),
        TensorSpec(f"{lp}mlp.up_proj.weight", (w, h), Role.MLP_UP, i),
        TensorSpec(f"{lp}mlp.down_proj.weight", (h, w), Role.MLP_DOWN, i),
    ]
    if arch.moe:
        m = arch.moe
        t += [
            TensorSpec(f"{lp}router.proj.weight", (m.num_experts, h), Role.ROUTER_PROJ, i),
            TensorSpec(f"{lp}router.scale", (h,), Role.ROUTER_SCALE, i),
            TensorSpec(f"{lp}router.per_expert_scale", (m.num_experts,), Role.ROUTER_EXPERT_SCALE, i),
            TensorSpec(f"{lp}experts.gate_up_proj", (m.num_experts, 2 * m.intermediate_size, h), Role.EXPERT_GATE_UP, i),
            TensorSpec(f"{lp}experts.down_proj", (m.num_experts, h, m.intermediate_size), Role.EXPERT_DOWN, i),
            TensorSpec(f"{lp}pre_feedforward_layernorm_2.weight", (h,), Role.NORM, i),
            TensorSpec(f"{lp}post_feedforward_layernorm_1.weight", (h,), Role.NORM, i),
            TensorSpec(f"{lp}post_feedforward_layernorm_2.weight", (h,), Role.NORM, i),
        ]
    if arch.has_ple:
        t += [
            TensorSpec(f"{lp}per_layer_input_gate.weight", (arch.ple_dim, h), Role.PLE_GATE, i),
            TensorSpec(f"{lp}per_layer_projection.weight", (h, arch.ple_dim), Role.PLE_PROJ, i),
            TensorSpec(f"{lp}post_per_layer_input_norm.weight", (h,), Role.NORM, i),
        ]
    t.append(TensorSpec(f"{lp}layer_scalar", (1,), Role.LAYER_SCALAR, i))
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

