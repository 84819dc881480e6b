"""Merging a PEFT LoRA adapter into a Gemma 4 checkpoint while streaming it, tensor by tensor, block by block.

An adapter is what `peft`'s `save_pretrained` writes: `adapter_config.json` and `adapter_model.safetensors`, whose
keys are the module paths of the model peft wrapped (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`,
`...lora_embedding_A` / `...lora_embedding_B` for embeddings). A LoRA module adds `scale * (B @ A)` to its weight
(`(B @ A)^T` for an embedding), `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern`
and `alpha_pattern` override r and alpha per module with peft's own key rule (`get_pattern_key`).

`AdaptedCheckpoint` wraps a `Checkpoint` and has its interface: tensors the adapter does not touch pass through (same
bytes, same file ranges), merged tensors report dtype F32 with no file range and are computed in float32 a block of
rows at a time, `W[r0:r1] + scale * (B[r0:r1] @ A)`, so peak memory follows the block, never the model.

`apply_to_torch_model` merges the same adapter into a loaded transformers model with torch, independently of the
numpy path, for the validation reference.

Only plain LoRA on the linear layers (and token / per-layer embeddings) of the text decoder is merged; everything
else (DoRA and the other LoRA variants, base-changing initialisations, MoE experts through `target_parameters`,
the vision/audio towers, pickle files) is refused with a CheckpointError naming the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from .checkpoint import DTYPES, FLOAT_DTYPES, PICKLE_SUFFIXES, Checkpoint, TensorInfo, _parse_header, to_f32
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


def _writable(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    return a if a.flags.writeable else a.copy()


def _public_name(s: str) -> str:
    """A base model id for metadata: hub ids as they are, local paths reduced to their last component."""
    if s.startswith(("/", "~", ".", "\\")) or re.match(r"^[A-Za-z]:[\\/]", s) or s.count("/") > 1:
        return Path(s).name
    return s


def _short(items: list[str], n: int = 4) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---- the adapter -----------------------------------------------------------------------------------------------


class Adapter:
    """A parsed, checked PEFT LoRA adapter, resolved against one base checkpoint."""

    def __init__(self, directory: Path, config: dict[str, Any], weights: _WeightsFile, base: Checkpoint,
                 modules: dict[str, LoraModule], replaced: dict[str, str], warnings: list[str]):
        self.dir = directory
        self.config = config
        self.weights = weights
        self.base_dir = base.dir
        self.modules = modules  # base tensor name -> LoRA pair
        self.replaced = replaced  # base tensor name -> adapter key holding a full replacement of it
        self.warnings = warnings
        self.r: int = int(config["r"])
        self.lora_alpha: float = config["lora_alpha"]
        self.use_rslora: bool = bool(config.get("use_rslora", False))
        self.rank_pattern: dict[str, int] = dict(config.get("rank_pattern") or {})
        self.alpha_pattern: dict[str, float] = dict(config.get("alpha_pattern") or {})
        self.target_modules = config.get("target_modules")
        order = {n: i for i, n in enumerate(base.tensors)}
        self.merged_names: list[str] = sorted(set(modules) | set(replaced), key=lambda n: order.get(n, len(order)))

    # ---- loading and checking ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, base: Checkpoint) -> Adapter:
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointNotFoundError(f"{d}: no such adapter directory")
        cfg = _read_config(d)
        wpath = d / ADAPTER_WEIGHTS
        if not wpath.is_file():
            pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{d}: pickle-only adapter ({', '.join(pickles)}); gemma4-export never loads pickle files (they "
                    f"can run code). Save it with peft's save_pretrained(safe_serialization=True) to get "
                    f"{ADAPTER_WEIGHTS}."
                )
            raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS} here")
        weights = _WeightsFile(wpath)
        try:
            modules, replaced, warnings = _resolve(d, cfg, weights, base)
        except BaseException:
            weights.close()
            raise
        return cls(d, cfg, weights, base, modules, replaced, warnings)

    # ---- reading -----------------------------------------------------------------------------------------------
    def factors(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of the LoRA pair that merges into `tensor`, float32."""
        m = self.modules[tensor]
        return self.weights.f32(m.a_key), self.weights.f32(m.b_key)

    def replacement_rows(self, tensor: str, start: int, stop: int) -> np.ndarray:
        return self.weights.rows_f32(self.replaced[tensor], start, stop)

    def describe(self) -> dict[str, Any]:
        """Artifact metadata: what was merged, with no local path in it."""
        base = self.config.get("base_model_name_or_path")
        lora = list(self.modules.values())
        return {
            "adapter": self.dir.name,
            "peft_type": "LORA",
            "base_model": _public_name(base) if isinstance(base, str) and base else None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "scale_rule": "lora_alpha / sqrt(r)" if self.use_rslora else "lora_alpha / r",
            "scale": self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "target_modules": sorted(self.target_modules) if isinstance(self.target_modules, (list, tuple, set))
            else self.target_modules,
            "lora_modules": len(lora),
            "embedding_modules": sum(m.kind == "embedding" for m in lora),
            "replaced_tensors": len(self.replaced),
            "merged_tensors": len(self.merged_names),
            "warnings": list(self.warnings),
        }

    def close(self) -> None:
        self.weights.close()


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
    model.*, and Gemma4Model's language_model.*)."""
    out = [path]
    if path.startswith(TEXT_PREFIX):
        out.append(TEXT_ONLY_PREFIX + path[len(TEXT_PREFIX):])
    elif path.startswith(TEXT_ONLY_PREFIX) and not is_tower(path):
        out.append(TEXT_PREFIX + path[len(TEXT_ONLY_PREFIX):])
    elif path.startswith("language_model."):
        out += [TEXT_PREFIX + path[len("language_model."):], TEXT_ONLY_PREFIX + path[len("language_model."):]]
    return out


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
        for cand in _candidates(path):
            if cand in base.tensors:
                if is_tower(cand):
                    towers.append(path)
                    return None, ""
                return cand, None
        if is_tower(path):
            towers.append(path)
            return None, ""
        mod = path.rsplit(".", 1)[0]
        if path.split(".")[0] == "lm_head" and a.tie_word_embeddings:
            return None, (f"{what} '{path}' targets lm_head, which this checkpoint ties to the token embedding "
                          "(tie_word_embeddings); merge it into embed_tokens instead, or use an untied base")
        if any(c + sfx in base.tensors for c in _candidates(mod) for sfx in (".gate_up_proj", ".down_proj")):
            return None, f"{what} '{path}' targets MoE experts (an nn.Parameter, not a linear layer): not supported"
        return None, f"{what} '{path}' has no tensor in the base checkpoint (looked for {_short(_candidates(path))})"

    modules: dict[str, LoraModule] = {}
    unselected: list[str] = []
    for mod, entry in pairs.items():
        kind = entry["kind"]
        if "A" not in entry or "B" not in entry:
            missing = "lora_A" if "A" not in entry else "lora_B"
            if kind == "embedding":
                missing = missing.replace("lora_", "lora_embedding_")
            problems.append(f"module '{mod}' has no {missing} tensor")
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
        problems.insert(0, f"targets vision/audio tower modules, which are not supported (only the text decoder "
                           f"can be adapted): {_short(sorted(towers), 3)}")
    problems = list(dict.fromkeys(problems))
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise CheckpointError(f"adapter {name}: " + "; ".join(problems[:3]) + more)
    if not modules and not replaced:
        raise CheckpointError(f"adapter {name}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return modules, replaced, warnings


# ---- the merged view -------------------------------------------------------------------------------------------


class AdaptedCheckpoint:
    """A Checkpoint with an adapter merged in on read. Same interface as Checkpoint: untouched tensors come from the
    base unchanged; merged ones are float32 (`dtype="F32"`, `file=None`, `start=-1`), computed a block at a time."""

    def __init__(self, base: Checkpoint, adapter: Adapter):
        if Path(adapter.base_dir).resolve() != Path(base.dir).resolve():
            raise CheckpointError(f"adapter {adapter.dir.name} was resolved against another checkpoint")
        self.base = base
        self.adapter = adapter
        self.dir = base.dir
        self.arch = base.arch
        self.files = base.files
        self.text_prefix = base.text_prefix
        self.expected = base.expected
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        for n in adapter.merged_names:
            b = base.tensors[n]
            numel = b.numel
            self.tensors[n] = TensorInfo(n, "F32", b.shape, None, -1, numel * 4)  # type: ignore[arg-type]
        self.merged_names: list[str] = list(adapter.merged_names)
        self._merged = set(self.merged_names)
        self._cache: tuple[str, np.ndarray, np.ndarray, np.float32, str] | None = None

    # ---- reading -----------------------------------------------------------------------------------------------
    def _factors(self, name: str):
        """(A, B, scale, kind) of one tensor's LoRA, kept for the tensor read last (rows() is called per block).
        Built into a local first, so that two threads reading different tensors never get each other's."""
        c = self._cache
        if c is None or c[0] != name:
            m = self.adapter.modules[name]
            A, B = self.adapter.factors(name)
            if m.kind == "embedding":  # delta rows [r0, r1) = A[:, r0:r1]^T @ B^T
                A, B = np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)
            c = self._cache = (name, A, B, np.float32(m.scale), m.kind)
        return c[1:]

    def _merged_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self.tensors[name]
        n_rows = info.numel // info.shape[-1] if info.shape and info.shape[-1] else 1
        if not 0 <= start <= stop <= n_rows:
            raise CheckpointError(f"{self.dir}: rows [{start}, {stop}) are outside '{name}' ({n_rows} rows)")
        if name in self.adapter.replaced:
            w = self.adapter.replacement_rows(name, start, stop)
        else:
            info = self.base.tensors[name]
            w = _writable(to_f32(self.base.rows(name, start, stop), info.dtype))
        if name in self.adapter.modules:
            A, B, scale, kind = self._factors(name)
            if kind == "linear":
                delta = B[start:stop] @ A  # [k, r] @ [r, in]
            else:
                delta = A[start:stop] @ B  # [k, r] @ [r, dim]
            delta *= scale
            w += delta
        return w

    def raw(self, name: str) -> np.ndarray:
        if name not in self._merged:
            return self.base.raw(name)
        info = self.tensors[name]
        row = info.shape[-1] if info.shape else 1
        out = np.empty((info.numel // row if row else 0, row), dtype=np.float32)
        for r, block in self.iter_rows(name):
            out[r: r + len(block)] = block
        return out.reshape(info.shape)

    def iter_rows(self, name: str, max_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        if name not in self._merged:
            yield from self.base.iter_rows(name, max_bytes)
            return
        info = self.tensors[name]
        row = info.shape[-1] if info.shape else 1
        n_rows = info.numel // row if row else 0
        per = max(1, max_bytes // (row * 4))
        for r in range(0, n_rows, per):
            yield r, self._merged_rows(name, r, min(n_rows, r + per))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._merged:
            return self.base.rows(name, start, stop)
        return self._merged_rows(name, start, stop)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: no tensor '{name}'") from None

    _info = info

    @property
    def tower_tensors(self) -> list[TensorInfo]:
        return [i for n, i in self.tensors.items() if is_tower(n)]

    def describe(self) -> dict[str, Any]:
        return self.adapter.describe()

    def close(self) -> None:
        self._cache = None
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> AdaptedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, item: str):
        if item == "base":  # not set yet: avoid recursing
            raise AttributeError(item)
        return getattr(self.base, item)


# ---- the torch reference ---------------------------------------------------------------------------------------


def apply_to_torch_model(model, adapter: Adapter) -> list[str]:
    """Merge `adapter` into a loaded transformers Gemma 4 model in place, with torch (W += scale * B @ A, computed in
    float32), reading the adapter with safetensors itself: an implementation independent of AdaptedCheckpoint's, so
    each checks the other. Returns the model parameter names it changed."""
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n not in params})

    def find(tensor: str, module_path: str | None) -> tuple[str, Any]:
        tries = ([module_path + ".weight"] if module_path else []) + [tensor]
        tries += [c for t in list(tries) for c in _candidates(t)]
        for t in tries:
            if t in params:
                return t, params[t]
        raise CheckpointError(f"adapter {adapter.dir.name}: the model has no parameter for '{tensor}'")

    changed: list[str] = []
    with safe_open(str(adapter.weights.path), framework="pt") as f, torch.no_grad():
        for tensor in adapter.merged_names:
            m = adapter.modules.get(tensor)
            pname, p = find(tensor, m.module if m else None)
            w = p.data.to(torch.float32)
            if tensor in adapter.replaced:
                w = f.get_tensor(adapter.replaced[tensor]).to(torch.float32).reshape(w.shape).clone()
            if m is not None:
                A = f.get_tensor(m.a_key).to(torch.float32)
                B = f.get_tensor(m.b_key).to(torch.float32)
                delta = B @ A
                if m.kind == "embedding":
                    delta = delta.T
                w += delta * m.scale
            p.data.copy_(w.to(p.dtype))
            changed.append(pname)
    return changed
