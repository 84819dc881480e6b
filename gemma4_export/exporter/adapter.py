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

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from .checkpoint import PICKLE_SUFFIXES, Checkpoint, TensorInfo, to_f32
from .tensors import is_tower
from .lora_config import (ADAPTER_WEIGHTS, LoraModule, _candidates, _public_name, _read_config, _resolve,
                          _WeightsFile, _writable)


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

    def read_into(self, name: str, buf: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
        """As Checkpoint.read_into; a merged tensor is computed into new memory (float32), not into `buf`."""
        if name not in self._merged:
            return self.base.read_into(name, buf, rows)
        return self.raw(name) if rows is None else self._merged_rows(name, *rows)

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
