"""What a command works on: a registered variant (shipped config, weights optional) or a checkpoint directory.

`tensor_specs()` lists every tensor with its role: from the checkpoint when weights are at hand (so the plan shows
the file's own rows), else from the shipped config alone (towers listed by building the multimodal class on
PyTorch's meta device, which allocates nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Gemma4ExportError
from .arch import Gemma4Arch, head_architecture, load_config, parse_config
from .checkpoint import Checkpoint, resolve_checkpoint
from .tensors import Role, TensorSpec, expected_text_tensors, is_tower
from .variants import Variant, get_variant


@dataclass
class ModelSource:
    name: str
    config: dict[str, Any]
    arch: Gemma4Arch
    variant: Variant | None = None
    directory: Path | None = None  # local checkpoint directory, when weights are used
    adapter: Path | None = None  # a PEFT LoRA adapter merged into the weights as they are read
    base_name: str | None = None  # with an adapter: the base checkpoint's name (`name` is base-adapter)

    @classmethod
    def open(cls, variant: str | None = None, model_dir: str | Path | None = None, need_weights: bool = False,
             download: bool = True, adapter: str | Path | None = None) -> ModelSource:
        if variant is None and model_dir is None:
            raise Gemma4ExportError("give --variant NAME or --model-dir PATH")
        var = get_variant(variant) if variant else None
        if adapter is not None:
            src = cls.open(variant, model_dir, True, download)
            src.adapter = Path(adapter)
            src.checkpoint  # noqa: B018 - loads and checks the adapter against the base now, before any work
            src.base_name = src.name
            src.name = f"{src.name}-{src.adapter.resolve().name}"
            return src
        if model_dir is not None or (var is not None and (var.tiny or need_weights)):
            d = resolve_checkpoint(var, model_dir, download=download)
            cfg = load_config(d)
            name = var.name if var else (hub_id_of(d) or d.resolve().name).rsplit("/", 1)[-1]
            return cls(name, cfg, parse_config(cfg, str(d / "config.json")), var, d)
        return cls(var.name, var.config(), var.arch(), var, None)

    @property
    def hub_id(self) -> str | None:
        """The hub repository the checkpoint came from: a registered variant's, or read off a Hugging Face cache
        path (.../models--ORG--NAME/snapshots/REV)."""
        if self.variant is not None and self.variant.hub_id:
            return self.variant.hub_id
        return hub_id_of(self.directory) if self.directory is not None else None

    def provenance(self) -> dict[str, str]:
        """What an artifact records about its source: the name, and the hub id when there is one. Never a local
        path: a shipped artifact must not reveal the exporting machine's directory layout, and the same checkpoint
        exported from two directories gives identical artifacts."""
        out = {"name": self.name}
        if self.hub_id:
            out["hub_id"] = self.hub_id
        if self.adapter is not None:
            out["base"] = self.base_name or ""
            out["adapter"] = self.adapter.resolve().name
        if self.directory is not None:
            out["source_digest"] = self.digest
        return out

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the weights (config, index, shards; an adapter's files too): what a stored reference is
        matched against (exporter/digest.py)."""
        from .digest import checkpoint_digest

        return checkpoint_digest(self.checkpoint.dir, list(self.checkpoint.files), self.adapter)

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """The weights, read lazily; with an adapter, an AdaptedCheckpoint that merges it in as tensors are read."""
        if self.directory is None:
            d = resolve_checkpoint(self.variant)
            self.directory = d
        ck = Checkpoint(self.directory)
        if self.adapter is None:
            return ck
        from .adapter import AdaptedCheckpoint, Adapter

        try:
            return AdaptedCheckpoint(ck, Adapter.load(self.adapter, ck))
        except BaseException:
            ck.close()
            raise

    def tensor_specs(self) -> list[TensorSpec]:
        if self.directory is not None:
            ck = self.checkpoint
            text = list(ck.expected)
            towers = [TensorSpec(i.name, i.shape, Role.TOWER) for i in ck.tower_tensors]
            return text + sorted(towers, key=lambda s: s.name)
        return expected_text_tensors(self.arch) + config_tower_specs(self.config)


def hub_id_of(directory: Path) -> str | None:
    """ORG/NAME for a directory inside the Hugging Face cache (models--ORG--NAME/snapshots/REV), else None."""
    for part in reversed(Path(directory).resolve().parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def config_tower_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """The tower tensors of a multimodal config, named and shaped as transformers builds them (meta device)."""
    if not any(config.get(k) for k in ("vision_config", "audio_config")):
        return []
    return list(_tower_specs(json.dumps(config, sort_keys=True)))


@cache
def _tower_specs(config_json: str) -> tuple[TensorSpec, ...]:
    config = json.loads(config_json)
    import torch
    import transformers

    arch_name = head_architecture(config) or (config.get("architectures") or [""])[0]
    cls = getattr(transformers, arch_name, None)
    if cls is None:
        raise ConfigError(f"transformers {transformers.__version__} has no class {arch_name}")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as e:
        raise ConfigError(f"cannot build {arch_name} from its config to list tower tensors: {e}") from None
    return tuple(sorted(
        (TensorSpec(n, tuple(t.shape), Role.TOWER) for n, t in model.state_dict().items() if is_tower(n)),
        key=lambda s: s.name,
    ))
