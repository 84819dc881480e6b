"""What a PEFT LoRA adapter directory says, checked against a Gemma 4 checkpoint: peft's file and key names, its
rules for which modules a config targets and which rank and alpha each gets (rank_pattern / alpha_pattern), the
LoRA variants and options that cannot be merged as W + scale * B @ A, and the resolution of every adapter tensor to
the base tensor it merges into. adapter.py merges what this resolves.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .checkpoint import BASE_PREFIX, DTYPES, FLOAT_DTYPES, Checkpoint, TensorInfo, _parse_header, to_f32
from .tensors import TEXT_ONLY_PREFIX, TEXT_PREFIX, Tensor, is_tower, parse_hf_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # peft's prefix for every LoRA state-dict key (PeftModel.base_model.model)
ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND

# The nn.Linear modules of the Gemma 4 text decoder (what a LoRA may merge into) and its nn.Embedding modules.
LINEAR_KEYS = frozenset({
    Tensor.ATTN_Q, Tensor.ATTN_K, Tensor.ATTN_V, Tensor.ATTN_OUT,
    Tensor.FFN_GATE, Tensor.FFN_UP, Tensor.FFN_DOWN,
    Tensor.ROUTER, Tensor.PLE_GATE, Tensor.PLE_PROJ, Tensor.PLE_MODEL_PROJ, Tensor.OUTPUT,
})
EMBEDDING_KEYS = frozenset({Tensor.TOKEN_EMBD, Tensor.PLE_TABLE})

# LoraConfig fields that select a LoRA variant (peft: LoraLayer.lora_variants / resolve_lora_variant) or change what
# the weights mean; their merge is not W + scale * B @ A, so they are refused.
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters, e.g. MoE experts)",
    "lora_bias": "a bias on lora_B (lora_bias)",
}
# init_lora_weights values whose adapter is relative to a modified base (PiSSA/OLoRA/CorDA/LoRA-GA/MiCA subtract the
# initial B@A from the base weight; LoftQ pairs with a quantized base), unless peft converted them at save time.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair and the base tensor it merges into."""

    module: str  # the module path in the adapter (peft's key, without base_model.model.)
    tensor: str  # the base checkpoint tensor, e.g. model.language_model.layers.0.self_attn.q_proj.weight
    kind: str  # "linear": W += s * B @ A; "embedding": W += s * (B @ A)^T
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float


# ---- peft's matching rules, mirrored -----------------------------------------------------------------------------


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key: the first rank/alpha pattern that matches the end of the module path on a
    dot boundary (the pattern is a regex), else the module path itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def target_module_selected(cfg: dict[str, Any], key: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists for a module path `key`."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    mts = cfg.get("modules_to_save")
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return False
    target = cfg.get("target_modules")
    if target is None:
        return True  # peft filled in its per-architecture default; the saved keys are the record
    if isinstance(target, str):
        return target == ALL_LINEAR or re.fullmatch(target, key) is not None
    if key in target:
        return True
    found = any(key.endswith(f".{t}") for t in target)
    indexes = cfg.get("layers_to_transform")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using and found:
        pattern = cfg.get("layers_pattern")
        match = None
        if pattern is None or len(pattern) == 0:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


# ---- the adapter's safetensors file, read lazily ---------------------------------------------------------------


def _writable(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    return a if a.flags.writeable else a.copy()


class _WeightsFile:
    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, TensorInfo] = _parse_header(path)
        self._f = None

    def _read(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        np_dtype, size = DTYPES[info.dtype]
        if self._f is None:
            self._f = open(self.path, "rb")
        buf = os.pread(self._f.fileno(), count * size, info.start + first * size)
        if len(buf) != count * size:
            raise CheckpointError(f"{self.path}: short read in tensor '{info.name}' (file changed or truncated)")
        return np.frombuffer(buf, dtype=np_dtype)

    def f32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return _writable(to_f32(self._read(info, 0, info.numel), info.dtype)).reshape(info.shape)

    def rows_f32(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self.tensors[name]
        row = info.shape[-1] if info.shape else 1
        return _writable(to_f32(self._read(info, start * row, (stop - start) * row), info.dtype)).reshape(
            stop - start, row)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _public_name(s: str) -> str:
    """A base model id for metadata: hub ids as they are, local paths reduced to their last component."""
    if s.startswith(("/", "~", ".", "\\")) or re.match(r"^[A-Za-z]:[\\/]", s) or s.count("/") > 1:
        return Path(s).name
    return s


def _short(items: list[str], n: int = 4) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---- the adapter -----------------------------------------------------------------------------------------------


def _read_config(d: Path) -> dict[str, Any]:
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_CONFIG} here (not a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: unreadable adapter config (not a JSON object)")
    pt = cfg.get("peft_type")
    if str(pt).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type is {pt!r}; only LoRA adapters (peft_type LORA) can be merged")
    variants = [why for f, why in _VARIANT_FIELDS.items() if cfg.get(f)]
    if variants:
        dora = " (DoRA is not supported)" if cfg.get("use_dora") else ""
        raise CheckpointError(
            f"{path}: uses {', '.join(variants)}{dora}; only plain LoRA (W + scale * B @ A) can be merged"
        )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} trains against a modified base weight; merging it into the original "
            "base is wrong. Re-save it with peft's path_initial_model_for_weight_conversion (plain LoRA) first"
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise CheckpointError(f"{path}: bias={bias!r} trains bias vectors; only bias='none' adapters can be merged")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(field) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in pat.values()):
            raise CheckpointError(f"{path}: {field} must map module patterns to numbers, got {pat!r}")
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise CheckpointError(f"{path}: {field} key {k!r} is not a valid pattern ({e})") from None
        if field == "rank_pattern" and any(not isinstance(v, int) or v <= 0 for v in pat.values()):
            raise CheckpointError(f"{path}: rank_pattern ranks must be positive integers, got {pat!r}")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise CheckpointError(f"{path}: target_modules {tm!r} is not a valid pattern ({e})") from None
    elif tm is not None and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise CheckpointError(f"{path}: target_modules must be a list of names or a pattern, got {tm!r}")
    return cfg


_LINEAR_A, _LINEAR_B = ".lora_A.weight", ".lora_B.weight"
_EMB_A, _EMB_B = ".lora_embedding_A", ".lora_embedding_B"
_BASE_LAYER = ".base_layer.weight"


def _candidates(path: str) -> list[str]:
    """Checkpoint names a module/tensor path of the adapter may have in the base: itself, then the same text-decoder
    path in the other Gemma 4 layout (Gemma4ForConditionalGeneration's model.language_model.* vs Gemma4ForCausalLM's
    model.*, and the base classes': Gemma4Model's language_model.*, Gemma4TextModel's layers.*, embed_tokens*)."""
    if not path.startswith(BASE_PREFIX):  # a base class's path: the head class adds the prefix (exporter/checkpoint.py)
        return [path] + _candidates(BASE_PREFIX + path)
    out = [path]
    if path.startswith(TEXT_PREFIX):
        out.append(TEXT_ONLY_PREFIX + path[len(TEXT_PREFIX):])
    elif path.startswith(TEXT_ONLY_PREFIX) and not is_tower(path):
        out.append(TEXT_PREFIX + path[len(TEXT_ONLY_PREFIX):])
    return out


def _on_tower(path: str) -> bool:
    return any(is_tower(c) for c in _candidates(path))


def _resolve(d: Path, cfg: dict[str, Any], w: _WeightsFile, base: Checkpoint
             ) -> tuple[dict[str, LoraModule], dict[str, str], list[str]]:
    name = d.name
    problems: list[str] = []
    towers: list[str] = []
    pairs: dict[str, dict[str, str]] = {}  # module path -> {"A"/"B"/"kind"}
    full: dict[str, str] = {}  # adapter tensor path (no prefix) -> adapter key, for replacements
    for key in w.tensors:
        if not key.startswith(KEY_PREFIX):
            problems.append(f"tensor '{key}' is not a PEFT LoRA key (no '{KEY_PREFIX}' prefix)")
            continue
        rest = key[len(KEY_PREFIX):]
        for suffix, kind, side in ((_LINEAR_A, "linear", "A"), (_LINEAR_B, "linear", "B"),
                                   (_EMB_A, "embedding", "A"), (_EMB_B, "embedding", "B")):
            if rest.endswith(suffix):
                mod = rest[: -len(suffix)]
                entry = pairs.setdefault(mod, {})
                if entry.setdefault("kind", kind) != kind:
                    problems.append(f"module '{mod}' has both linear and embedding LoRA weights")
                entry[side] = key
                break
        else:
            if rest.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in rest:
                problems.append(f"'{key}' is a DoRA magnitude vector (DoRA is not supported)")
            elif rest.endswith(".lora_B.bias"):
                problems.append(f"'{key}' is a lora_B bias (lora_bias is not supported)")
            elif ".lora_" in rest:
                problems.append(f"'{key}' is not a LoRA tensor gemma4-export knows how to merge")
            elif rest.endswith(_BASE_LAYER):
                full[rest[: -len(_BASE_LAYER)] + ".weight"] = key  # an embedding layer peft saved beside its LoRA
            else:
                full[rest] = key  # modules_to_save, or a resized embedding peft saved whole

    a = base.arch
    warnings: list[str] = []

    def locate(path: str, what: str) -> tuple[str | None, str | None]:
        """(base tensor, problem) for an adapter tensor path."""
        if _on_tower(path):
            towers.append(path)
            return None, ""
        for cand in _candidates(path):
            if cand in base.tensors:
                return cand, None
        mod = path.rsplit(".", 1)[0]
        if path.split(".")[0] == "lm_head" and a.tie_word_embeddings:
            return None, (f"{what} '{path}' targets lm_head, which this checkpoint ties to the token embedding "
                          "(tie_word_embeddings); merge it into embed_tokens instead, or use an untied base")
        if any(c + sfx in base.tensors for c in _candidates(mod) for sfx in (".gate_up_proj", ".down_proj")):
            return None, f"{what} '{path}' targets MoE experts (an nn.Parameter, not a linear layer): not supported"
        return None, f"{what} '{path}' has no tensor in the base checkpoint (looked for {_short(_candidates(path))})"

    modules: dict[str, LoraModule] = {}
    unselected: list[str] = []
    untrained_towers: list[str] = []
    for mod, entry in pairs.items():
        kind = entry["kind"]
        if "A" not in entry or "B" not in entry:
            missing = "lora_A" if "A" not in entry else "lora_B"
            if kind == "embedding":
                missing = missing.replace("lora_", "lora_embedding_")
            problems.append(f"module '{mod}' has no {missing} tensor")
            continue
        if kind == "linear" and _on_tower(mod) and w.tensors[entry["B"]].dtype in FLOAT_DTYPES \
                and not np.any(w.f32(entry["B"])):
            # peft starts lora_B at zero and a text-only fine-tune never moves a tower's (target_modules
            # "all-linear" wraps them too): B @ A is zero, the merge changes nothing, so there is nothing to refuse
            untrained_towers.append(mod)
            continue
        tensor, problem = locate(mod + ".weight", "LoRA module")
        if tensor is None:
            if problem:
                problems.append(problem)
            continue
        parsed = parse_hf_name(tensor, base.text_prefix)
        allowed = EMBEDDING_KEYS if kind == "embedding" else LINEAR_KEYS
        if parsed is None or parsed[0] not in allowed:
            what, which = (("an embedding", "the token and per-layer embeddings") if kind == "embedding" else
                           ("a linear layer", "attention, MLP, router, per-layer-input and untied head projections"))
            problems.append(
                f"LoRA module '{mod}' ({tensor}) is not {what} of the Gemma 4 text decoder that gemma4-export can "
                f"merge (it merges LoRA on {which})"
            )
            continue
        if not target_module_selected(cfg, mod):
            unselected.append(mod)
            continue
        info = base.tensors[tensor]
        ai, bi = w.tensors[entry["A"]], w.tensors[entry["B"]]
        if ai.dtype not in FLOAT_DTYPES or bi.dtype not in FLOAT_DTYPES:
            problems.append(f"LoRA module '{mod}' has non-float weights ({ai.dtype}, {bi.dtype})")
            continue
        r_key = get_pattern_key(list((cfg.get("rank_pattern") or {}).keys()), mod)
        alpha_key = get_pattern_key(list((cfg.get("alpha_pattern") or {}).keys()), mod)
        r = int((cfg.get("rank_pattern") or {}).get(r_key, cfg["r"]))
        alpha = (cfg.get("alpha_pattern") or {}).get(alpha_key, cfg["lora_alpha"])
        if kind == "linear":  # nn.Linear: A [r, in], B [out, r], W [out, in]; peft forces fan_in_fan_out off
            ok = (len(info.shape) == 2 and len(ai.shape) == 2 and len(bi.shape) == 2 and ai.shape[0] == bi.shape[1]
                  and ai.shape[1] == info.shape[1] and bi.shape[0] == info.shape[0])
            want = "lora_A [r, in], lora_B [out, r]"
        else:  # nn.Embedding: A [r, num_embeddings], B [dim, r], W [num_embeddings, dim]
            ok = (len(info.shape) == 2 and len(ai.shape) == 2 and len(bi.shape) == 2 and ai.shape[0] == bi.shape[1]
                  and ai.shape[1] == info.shape[0] and bi.shape[0] == info.shape[1])
            want = "lora_embedding_A [r, rows], lora_embedding_B [cols, r]"
        if not ok:
            problems.append(
                f"LoRA shapes do not fit '{tensor}' {list(info.shape)}: A {list(ai.shape)}, B {list(bi.shape)} "
                f"(expected {want})"
            )
            continue
        if ai.shape[0] != r:
            problems.append(
                f"LoRA module '{mod}' has rank {ai.shape[0]} but adapter_config.json gives r={r} for it "
                "(r / rank_pattern), so its scale would be wrong"
            )
            continue
        if tensor in modules:
            problems.append(f"two LoRA modules merge into '{tensor}' ('{modules[tensor].module}' and '{mod}')")
            continue
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[tensor] = LoraModule(mod, tensor, kind, entry["A"], entry["B"], r, alpha, scale)
        if kind == "embedding" and parsed[0] is Tensor.TOKEN_EMBD and a.tie_word_embeddings:
            warnings.append(
                "LoRA on the tied token embedding: merged like peft's merge_and_unload, so the output head changes "
                "too (the unmerged peft model applied it to the input embedding only; peft issue #2777)"
            )
    if unselected:
        problems.append(
            f"adapter_model.safetensors has LoRA weights for {_short(unselected)}, which adapter_config.json's "
            f"target_modules {cfg.get('target_modules')!r} does not select (config and weights disagree)"
        )

    replaced: dict[str, str] = {}
    for path, key in full.items():
        tensor, problem = locate(path, "full tensor")
        if tensor is None:
            if problem:
                problems.append(problem)
            continue
        info, ri = base.tensors[tensor], w.tensors[key]
        if ri.shape != info.shape:
            problems.append(
                f"'{key}' replaces '{tensor}' but has shape {list(ri.shape)}, the base has {list(info.shape)} "
                "(a resized vocabulary is not supported)"
            )
            continue
        if ri.dtype not in FLOAT_DTYPES or info.dtype not in FLOAT_DTYPES:
            problems.append(f"'{key}' replaces '{tensor}' with non-float dtype {ri.dtype}")
            continue
        if tensor in replaced:
            problems.append(f"'{tensor}' is replaced twice ('{replaced[tensor]}' and '{key}')")
            continue
        is_lora_layer = key.endswith(_BASE_LAYER) and tensor in modules
        parsed = parse_hf_name(tensor, base.text_prefix)
        if (not is_lora_layer and a.tie_word_embeddings and parsed is not None
                and parsed[0] in (Tensor.TOKEN_EMBD, Tensor.OUTPUT)):
            problems.append(
                f"'{key}' replaces the token embedding of a checkpoint that ties it to the output head; peft trained "
                "them untied (modules_to_save), which a tied export cannot represent"
            )
            continue
        if not is_lora_layer and not cfg.get("modules_to_save") and not (
                parsed is not None and parsed[0] in (Tensor.TOKEN_EMBD, Tensor.OUTPUT)):
            problems.append(
                f"adapter_model.safetensors holds the full tensor '{key}', but adapter_config.json lists no "
                "modules_to_save"
            )
            continue
        replaced[tensor] = key
    if towers:
        problems.insert(0, f"trains vision/audio tower modules, which are not supported (only the text decoder "
                           f"can be adapted; tower modules whose lora_B is still zero are skipped): "
                           f"{_short(sorted(towers), 3)}")
    if untrained_towers:
        warnings.append(f"{len(untrained_towers)} LoRA modules on the vision/audio towers were never trained (lora_B "
                        "all zero, as peft starts them): nothing to merge there, skipped")
    problems = list(dict.fromkeys(problems))
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise CheckpointError(f"adapter {name}: " + "; ".join(problems[:3]) + more)
    if not modules and not replaced:
        raise CheckpointError(f"adapter {name}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return modules, replaced, warnings


# ---- the merged view -------------------------------------------------------------------------------------------
