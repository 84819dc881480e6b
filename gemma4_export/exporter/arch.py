"""One typed description of a Gemma 4 text decoder, normalised from either serialised form of config.json.

Hub configs carry `global_head_dim` and `num_global_key_value_heads` at the top of `text_config`; configs re-saved by
transformers >= 5.2x move them into `text_config.per_layer_config` ({layer index: {head_dim, num_key_value_heads}}).
Everything downstream (tensor lists, the quantization plan, every target's metadata) reads this class only, never the
raw dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# The architectures this tool knows, and the text family each one belongs to. A new class is added here (one line),
# never detected by sniffing attributes.
ARCHITECTURES: dict[str, str] = {
    "Gemma4ForConditionalGeneration": "gemma4",
    "Gemma4ForCausalLM": "gemma4",
    "Gemma4UnifiedForConditionalGeneration": "gemma4_unified",
    "Gemma4UnifiedForCausalLM": "gemma4_unified",
}
# transformers' base classes (what AutoModel builds: no output head) and the class whose from_pretrained loads
# what they save; their checkpoints name the decoder without the head class's "model." prefix (exporter/checkpoint.py)
BASE_CLASSES: dict[str, str] = {
    "Gemma4Model": "Gemma4ForConditionalGeneration",
    "Gemma4TextModel": "Gemma4ForCausalLM",
    "Gemma4UnifiedModel": "Gemma4UnifiedForConditionalGeneration",
    "Gemma4UnifiedTextModel": "Gemma4UnifiedForCausalLM",
}
_TEXT_MODEL_TYPES = {"gemma4_text": "gemma4", "gemma4_unified_text": "gemma4_unified"}
_TOP_MODEL_TYPES = {"gemma4": "gemma4", "gemma4_unified": "gemma4_unified"}

# Tower sub-configs present in the multimodal checkpoints, by config key.
_TOWER_KEYS = ("vision_config", "audio_config")


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    intermediate_size: int


@dataclass(frozen=True)
class Rope:
    theta: float
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class Gemma4Arch:
    """The text decoder of a Gemma 4 checkpoint. Per-layer facts are methods, derived from the few fields."""

    family: str  # "gemma4" or "gemma4_unified"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    global_head_dim: int
    num_global_kv_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    max_position_embeddings: int
    num_kv_shared_layers: int
    double_wide_mlp: bool
    ple_dim: int  # hidden_size_per_layer_input; 0 = no per-layer embeddings
    vocab_size_per_layer_input: int
    k_eq_v: bool
    moe: MoE | None
    final_logit_softcapping: float | None
    rms_norm_eps: float
    rope_sliding: Rope
    rope_full: Rope
    tie_word_embeddings: bool
    hidden_activation: str
    bos_token_id: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    towers: tuple[str, ...] = ()
    # Which fields were inferred (not in the config) so reports can say so.
    inferred: tuple[str, ...] = field(default=(), compare=False)

    # ---- per-layer facts -------------------------------------------------------------------------------------
    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == FULL

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.is_full(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_global_kv_heads if self.is_full(layer) else self.num_kv_heads

    def has_v_proj(self, layer: int) -> bool:
        """K==V models have no v_proj on full-attention layers: the key projection is reused as the value."""
        return not (self.k_eq_v and self.is_full(layer))

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def is_kv_shared(self, layer: int) -> bool:
        return self.num_kv_shared_layers > 0 and layer >= self.first_kv_shared_layer

    def kv_donor(self, layer: int) -> int:
        """The layer whose KV cache a KV-shared layer reads: the last non-shared layer of the same attention type."""
        if not self.is_kv_shared(layer):
            return layer
        for j in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[j] == self.layer_types[layer]:
                return j
        raise ConfigError(f"layer {layer} shares KV but no earlier {self.layer_types[layer]} layer owns a cache")

    def mlp_width(self, layer: int) -> int:
        """Double-wide MLP: the KV-shared layers of E2B use twice the intermediate size."""
        return self.intermediate_size * (2 if self.double_wide_mlp and self.is_kv_shared(layer) else 1)

    # ---- whole-model facts -----------------------------------------------------------------------------------
    @property
    def has_ple(self) -> bool:
        return self.ple_dim > 0

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def sliding_pattern(self) -> tuple[bool, ...]:
        """True for sliding-window layers, in layer order (what llama.cpp calls the SWA pattern)."""
        return tuple(t == SLIDING for t in self.layer_types)

    def features(self) -> list[str]:
        out = []
        if self.has_ple:
            out.append("PLE")
        if self.num_kv_shared_layers:
            out.append("KV sharing")
        if self.double_wide_mlp:
            out.append("double-wide MLP")
        if self.is_moe:
            out.append("MoE")
        if self.k_eq_v:
            out.append("K==V")
        if self.family == "gemma4_unified":
            out.append("unified")
        return out


# ---- parsing ---------------------------------------------------------------------------------------------------


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return d[key]


def _rope(params: Any, layer_type: str, where: str) -> Rope:
    if not isinstance(params, dict) or layer_type not in params or not isinstance(params[layer_type], dict):
        raise ConfigError(f"{where}: rope_parameters has no '{layer_type}' entry")
    p = params[layer_type]
    return Rope(
        theta=float(_req(p, "rope_theta", f"{where}.rope_parameters.{layer_type}")),
        rope_type=str(p.get("rope_type", "default")),
        partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
    )


def _global_attention(text: dict[str, Any], layer_types: list[str], where: str) -> tuple[int, int | None, bool]:
    """(global_head_dim, num_global_kv_heads or None, came_from_per_layer_config)."""
    plc = text.get("per_layer_config")
    if plc:
        if not isinstance(plc, dict):
            raise ConfigError(f"{where}: per_layer_config must be an object keyed by layer index")
        head_dims, kv_heads = set(), set()
        for key, override in plc.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= idx < len(layer_types):
                raise ConfigError(f"{where}: per_layer_config names layer {idx}, but there are {len(layer_types)}")
            if layer_types[idx] != FULL:
                raise ConfigError(f"{where}: per_layer_config overrides sliding layer {idx}; only full layers differ")
            if "head_dim" in override:
                head_dims.add(int(override["head_dim"]))
            if override.get("num_key_value_heads") is not None:
                kv_heads.add(int(override["num_key_value_heads"]))
        if len(head_dims) > 1 or len(kv_heads) > 1:
            raise ConfigError(f"{where}: full-attention layers disagree in per_layer_config ({plc})")
        gdim = head_dims.pop() if head_dims else int(text.get("global_head_dim") or text["head_dim"])
        return gdim, (kv_heads.pop() if kv_heads else None), True
    gdim = text.get("global_head_dim")
    if gdim is None:
        raise ConfigError(f"{where}: neither global_head_dim nor per_layer_config gives the full-attention head dim")
    return int(gdim), text.get("num_global_key_value_heads"), False


def head_architecture(cfg: dict[str, Any]) -> str | None:
    """The transformers class with an output head that loads this checkpoint: its `architectures` entry, a base
    class's head class (BASE_CLASSES), or, without a known entry, the class its model_type implies; None when the
    config is not Gemma 4's."""
    for a in cfg.get("architectures") or []:
        a = BASE_CLASSES.get(a, a)
        if a in ARCHITECTURES:
            return a
    model_type = cfg.get("model_type")
    if model_type in _TOP_MODEL_TYPES:
        return "Gemma4ForConditionalGeneration" if _TOP_MODEL_TYPES[model_type] == "gemma4" \
            else "Gemma4UnifiedForConditionalGeneration"
    if model_type in _TEXT_MODEL_TYPES:
        return "Gemma4ForCausalLM" if _TEXT_MODEL_TYPES[model_type] == "gemma4" else "Gemma4UnifiedForCausalLM"
    return None


def parse_config(cfg: dict[str, Any], source: str = "config.json") -> Gemma4Arch:
    """Normalise a Gemma 4 config (multimodal with text_config, or a text-only config) to a Gemma4Arch."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: not a JSON object")
    architecture = head_architecture(cfg)
    if architecture is None:
        raise ConfigError(
            f"{source}: not a Gemma 4 checkpoint (architectures={cfg.get('architectures') or None}, "
            f"model_type={cfg.get('model_type')!r}); supported: {', '.join(sorted(ARCHITECTURES))} "
            f"and the base classes {', '.join(sorted(BASE_CLASSES))}"
        )
    family = ARCHITECTURES[architecture]

    text = cfg.get("text_config", cfg)
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config is not an object")
    where = f"{source}:text_config" if "text_config" in cfg else source
    num_layers = int(_req(text, "num_hidden_layers", where))
    layer_types = text.get("layer_types")
    inferred: list[str] = []
    if layer_types is None:
        # transformers' default: every 6th layer is full attention.
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
        inferred.append("layer_types")
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    bad = sorted(set(layer_types) - {SLIDING, FULL})
    if bad:
        raise ConfigError(f"{where}: unknown layer types {bad}")

    gdim, gkv, _ = _global_attention(text, layer_types, where)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    num_kv_heads = int(_req(text, "num_key_value_heads", where))
    # transformers applies num_global_key_value_heads only to K==V models; others keep num_key_value_heads.
    num_global_kv = int(gkv) if (gkv is not None and k_eq_v) else num_kv_heads

    moe = None
    if text.get("enable_moe_block"):
        moe = MoE(
            num_experts=int(_req(text, "num_experts", where)),
            top_k=int(_req(text, "top_k_experts", where)),
            intermediate_size=int(_req(text, "moe_intermediate_size", where)),
        )
        if not 0 < moe.top_k <= moe.num_experts:
            raise ConfigError(f"{where}: top_k_experts={moe.top_k} with num_experts={moe.num_experts}")

    rope = text.get("rope_parameters")
    if rope is None:
        rope = {
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        }
        inferred.append("rope_parameters")

    eos = text.get("eos_token_id", cfg.get("eos_token_id", 1))
    eos_t = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    ple_dim = int(text.get("hidden_size_per_layer_input") or 0) if family == "gemma4" else 0
    num_kv_shared = int(text.get("num_kv_shared_layers") or 0)

    arch = Gemma4Arch(
        family=family,
        architecture=architecture,
        vocab_size=int(_req(text, "vocab_size", where)),
        hidden_size=int(_req(text, "hidden_size", where)),
        intermediate_size=int(_req(text, "intermediate_size", where)),
        num_layers=num_layers,
        num_heads=int(_req(text, "num_attention_heads", where)),
        num_kv_heads=num_kv_heads,
        head_dim=int(_req(text, "head_dim", where)),
        global_head_dim=gdim,
        num_global_kv_heads=num_global_kv,
        layer_types=tuple(layer_types),
        sliding_window=int(_req(text, "sliding_window", where)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        num_kv_shared_layers=num_kv_shared,
        double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        ple_dim=ple_dim,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or text["vocab_size"]),
        k_eq_v=k_eq_v,
        moe=moe,
        final_logit_softcapping=(
            float(text["final_logit_softcapping"]) if text.get("final_logit_softcapping") is not None else None
        ),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_sliding=_rope(rope, SLIDING, where),
        rope_full=_rope(rope, FULL, where),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        hidden_activation=str(text.get("hidden_activation", "gelu_pytorch_tanh")),
        bos_token_id=int(text.get("bos_token_id", cfg.get("bos_token_id", 2))),
        eos_token_id=eos_t,
        pad_token_id=int(text.get("pad_token_id", cfg.get("pad_token_id", 0)) or 0),
        towers=tuple(k.removesuffix("_config") for k in _TOWER_KEYS if cfg.get(k)),
        inferred=tuple(inferred),
    )
    _check(arch, where)
    return arch


def _check(a: Gemma4Arch, where: str) -> None:
    if a.num_layers <= 0 or a.hidden_size <= 0 or a.vocab_size <= 0:
        raise ConfigError(f"{where}: layer count, hidden size and vocab size must be positive")
    if a.num_heads % a.num_kv_heads or a.num_heads % a.num_global_kv_heads:
        raise ConfigError(f"{where}: {a.num_heads} heads are not divisible by the KV head counts")
    if a.layer_types[-1] != FULL:
        raise ConfigError(f"{where}: the last layer must be full attention (got {a.layer_types[-1]})")
    if not 0 <= a.num_kv_shared_layers < a.num_layers:
        raise ConfigError(f"{where}: num_kv_shared_layers={a.num_kv_shared_layers} for {a.num_layers} layers")
    for layer in range(a.first_kv_shared_layer, a.num_layers):
        a.kv_donor(layer)  # raises if a shared layer has no donor of its type


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no config.json here")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None


def read_arch(path: str | Path) -> Gemma4Arch:
    p = Path(path)
    return parse_config(load_config(p), source=str(p / "config.json" if p.is_dir() else p))
