"""MLX target: a directory that `mlx_lm.load` reads with no patching.

Weights are named as mlx-lm's Gemma 4 model holds them after its own `sanitize` (`language_model.model.*`, the MoE
experts split into `switch_glu.{gate,up,down}_proj`), quantized as the plan says into mlx's affine groups (MLX's
own `mx.quantize`, or with calibration each group's scale and bias chosen to minimise the importance-weighted error,
quant/weighted.py: the same tensors, which mlx-lm reads unchanged), and streamed: the safetensors header is computed from the plan first, then each tensor is quantized
in blocks of rows and written at its offset. config.json names the type of every quantizable module in its
`quantization` section (mlx-lm's per-module overrides), so `mlx_lm.load` builds exactly the plan.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import __version__
from ..errors import Gemma4ExportError
from ..exporter.arch import head_architecture
from ..exporter.checkpoint import Checkpoint, to_f32
from ..exporter.tensors import Tensor, hf_name, parse_hf_name
from ..progress import Reporter
from ..quant.plan import Plan, PlanEntry
from ..quant.presets import Preset
from ..quant.types import MLX_TYPES
from . import copy_tokenizer_files, encode_float
from .registry import Platform, Target, register

MAX_SHARD_BYTES = 5 * 10**9  # mlx-lm's shard size


class MLXExportError(Gemma4ExportError):
    pass


def _bits_group(type_name: str) -> tuple[int, int] | None:
    """("Q4G64") -> (4, 64); None for float types."""
    if MLX_TYPES[type_name].is_float:
        return None
    b, g = type_name[1:].split("G")
    return int(b), int(g)


@dataclass
class _Out:
    """One tensor of the output files."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # inside its shard's data section


@dataclass
class _Job:
    """How one output module is produced from the checkpoint: which source rows, and into which outputs."""

    entry: PlanEntry
    path: str  # mlx module/parameter path without the .weight suffix
    source_rows: list[tuple[int, int]]  # row ranges of the flattened source tensor, in output order
    shape: tuple[int, ...]  # output (float) shape
    outs: list[_Out] = field(default_factory=list)


# mlx-lm's Gemma 4 model keeps transformers' module names under `language_model.model.` (its sanitize only moves the
# prefix), except the fused experts, which it splits for SwitchGLU. So a key maps to its checkpoint name under that
# prefix, and the two expert keys to their SwitchGLU parameters.
MLX_PREFIX = "language_model.model."
MLX_HEAD = "language_model.lm_head.weight"  # an untied head sits beside the decoder, as in transformers
MLX_EXPERTS = {
    Tensor.EXPERTS_GATE_UP: ("layers.{bid}.experts.switch_glu.gate_proj.weight",
                             "layers.{bid}.experts.switch_glu.up_proj.weight"),
    Tensor.EXPERTS_DOWN: ("layers.{bid}.experts.switch_glu.down_proj.weight",),
}


def mlx_paths(entry: PlanEntry, prefix: str) -> list[tuple[str, list[tuple[int, int]], tuple[int, ...]]]:
    """(mlx parameter path, source row ranges, output shape) for one planned text tensor. The fused expert gate_up
    [E, 2I, H] becomes gate and up [E, I, H] (mlx-lm's SwitchGLU)."""
    parsed = parse_hf_name(entry.name, prefix)
    if parsed is None:
        raise MLXExportError(f"no MLX name for tensor '{entry.name}': it is not a known Gemma 4 text tensor")
    key, bid = parsed
    if key is Tensor.EXPERTS_GATE_UP:
        e, two_i, h = entry.shape
        i = two_i // 2
        gate = [(x * two_i, x * two_i + i) for x in range(e)]
        up = [(x * two_i + i, (x + 1) * two_i) for x in range(e)]
        g, u = (MLX_PREFIX + t.format(bid=bid) for t in MLX_EXPERTS[key])
        return [(g, gate, (e, i, h)), (u, up, (e, i, h))]
    if key is Tensor.EXPERTS_DOWN:
        e, h, i = entry.shape
        return [(MLX_PREFIX + MLX_EXPERTS[key][0].format(bid=bid), [(0, e * h)], (e, h, i))]
    rows = int(np.prod(entry.shape[:-1])) if len(entry.shape) > 1 else 1
    name = MLX_HEAD if key is Tensor.OUTPUT else hf_name(key, bid, MLX_PREFIX)
    return [(name, [(0, rows)], entry.shape)]


def _outputs(path: str, shape: tuple[int, ...], type_name: str) -> list[_Out]:
    bg = _bits_group(type_name)
    if bg is None:
        size = {"BF16": 2, "F16": 2, "F32": 4}[type_name]
        return [_Out(path, type_name, shape, int(np.prod(shape)) * size)]
    bits, group = bg
    stem = path.removesuffix(".weight")
    lead, cols = shape[:-1], shape[-1]
    n = int(np.prod(lead))
    return [
        _Out(f"{stem}.weight", "U32", (*lead, cols * bits // 32), n * cols * bits // 8),
        _Out(f"{stem}.scales", "BF16", (*lead, cols // group), n * cols // group * 2),
        _Out(f"{stem}.biases", "BF16", (*lead, cols // group), n * cols // group * 2),
    ]


def mlx_config(src_config: dict[str, Any], arch, plan: Plan, quant_paths: dict[str, Any],
               source=None) -> dict[str, Any]:
    """config.json that current mlx-lm reads fully: every field it defaults to E2B's values is written explicitly,
    and global head dim / global KV heads sit at the top level even when the source used per_layer_config."""
    cfg = copy.deepcopy(src_config)
    if "text_config" not in cfg:
        # A text-only checkpoint (Gemma4ForCausalLM, model_type gemma4_text): mlx-lm's gemma4_text model names its
        # weights `model.*`, its gemma4 model `language_model.model.*`. The weights here are always named the second
        # way, so the config takes the multimodal form, with the text config nested and no towers.
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype")}
        text["model_type"] = "gemma4_text"
        cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
               "tie_word_embeddings": arch.tie_word_embeddings, "dtype": cfg.get("dtype")}
    cfg["architectures"] = [head_architecture(cfg) or "Gemma4ForConditionalGeneration"]  # a base class's save too
    tc = cfg["text_config"]
    tc.pop("per_layer_config", None)
    tc.update(
        global_head_dim=arch.global_head_dim,
        num_global_key_value_heads=arch.num_global_kv_heads if arch.k_eq_v else None,
        num_kv_shared_layers=arch.num_kv_shared_layers,
        use_double_wide_mlp=arch.double_wide_mlp,
        hidden_size_per_layer_input=arch.ple_dim,
        vocab_size_per_layer_input=arch.vocab_size_per_layer_input,
        final_logit_softcapping=arch.final_logit_softcapping,
        layer_types=list(arch.layer_types),
        attention_k_eq_v=arch.k_eq_v,
        enable_moe_block=arch.is_moe,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    if arch.moe:
        tc.update(num_experts=arch.moe.num_experts, top_k_experts=arch.moe.top_k,
                  moe_intermediate_size=arch.moe.intermediate_size)
    cfg["vocab_size"] = arch.vocab_size
    for k in ("vision_config", "audio_config"):
        cfg.pop(k, None)  # text-only artifact: the towers are not in it
    if quant_paths:
        from collections import Counter

        # the top-level default is the most common quantized type; every module is also named explicitly
        common = Counter(e.type for e in plan.kept if _bits_group(e.type)).most_common(1)[0][0]
        base = _bits_group(common)
        q = {"group_size": base[1], "bits": base[0], "mode": "affine", **quant_paths}
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    cfg["gemma4_export"] = {"version": __version__, "preset": plan.preset, "target": "mlx",
                            "source": plan.variant, "ple_type": plan.ple_type, "overrides": plan.overrides}
    if source is not None:  # name, hub id, base and adapter; never a local path (ModelSource.provenance)
        cfg["gemma4_export"].update({k: v for k, v in source.provenance().items() if k != "name"})
    return cfg


def _header(outs: list[_Out]) -> bytes:
    h: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    for o in outs:
        h[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [o.offset, o.offset + o.nbytes]}
    b = json.dumps(h, separators=(",", ":")).encode()
    b += b" " * (-len(b) % 8)
    return len(b).to_bytes(8, "little") + b


def _blocks(ck: Checkpoint, job: _Job, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first source row, float32 block) over the source rows in output order, blocks of at most ~block_bytes."""
    info = ck.info(job.entry.name)
    row = info.shape[-1] if info.shape else 1
    per = max(1, block_bytes // (row * 2))
    for start, stop in job.source_rows:
        for r in range(start, stop, per):
            yield r, to_f32(ck.rows(job.entry.name, r, min(stop, r + per)), info.dtype)


def _row_importance(imat: np.ndarray | None, entry: PlanEntry, first: int, n: int) -> np.ndarray | None:
    """The importance of source rows first..first+n: the matrix's vector, or for an expert tensor [E, R, C] each
    row's own expert's vector."""
    if imat is None or imat.shape[0] == 1:
        return None if imat is None else imat[0]
    return imat[_row_matrices(entry, first, n)]


def _row_matrices(entry: PlanEntry, first: int, n: int) -> np.ndarray:
    """Each source row's matrix (its expert; 0 for a 2-D tensor), for rows first..first+n."""
    return np.arange(first, first + n) // entry.shape[-2]


def _write(tmp: Path, ck: Checkpoint, jobs: list[_Job], outs: list[_Out], names: list[str], total: int,
           reporter: Reporter, plan: Plan, mx, importance=None) -> None:
    """Quantized modules go through `mx.quantize` (min/max affine groups), or, when calibrating, through
    quant.weighted.mlx_affine: the same affine layout, with each group's scale and bias chosen to minimise the
    importance-weighted error (evenly weighted for a lookup table, which no imatrix covers), group after group with
    GPTQ's error feedback where the calibration has the inputs' second moments."""
    from ..quant.lattice import mlx_lattice
    from ..quant.weighted import mlx_affine

    fds, bases = [], []
    try:
        for i, fname in enumerate(names):
            head = _header([o for o in outs if o.shard == i])
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.write(fd, head)
            bases.append(len(head))
        with reporter.task(f"quantize {plan.preset} (mlx)", total) as task:
            for job in jobs:
                bg = _bits_group(job.entry.type)
                written = [0] * len(job.outs)
                imat = importance.for_tensor(job.entry.name, ck.text_prefix) if importance and bg else None
                hess = importance.hessian_for(job.entry.name, ck.text_prefix) if importance and bg else None
                for r0, block in _blocks(ck, job, 32 << 20):
                    if bg is None:
                        parts = [encode_float(block, job.entry.type).tobytes()]
                    elif job.entry.method == "lattice":  # a QAT tensor: its trained steps and integers
                        if bg != (4, 32):
                            raise MLXExportError(f"{job.entry.name}: the lattice is written as Q4G32, the plan says "
                                                 f"{job.entry.type}")
                        wq, scales, biases = mlx_lattice(block)
                        parts = [wq.tobytes(), scales.tobytes(), biases.tobytes()]
                    elif importance is not None:  # a lookup table has no statistics: the search, evenly weighted
                        wq, scales, biases = mlx_affine(block, _row_importance(imat, job.entry, r0, len(block)),
                                                        bg[0], bg[1], hess, _row_matrices(job.entry, r0, len(block)))
                        parts = [wq.tobytes(), scales.tobytes(), biases.tobytes()]
                    else:
                        w = mx.array(block).astype(mx.bfloat16)
                        wq, scales, biases = mx.quantize(w, group_size=bg[1], bits=bg[0])
                        parts = [np.array(wq).tobytes(), np.array(scales.view(mx.uint16)).tobytes(),
                                 np.array(biases.view(mx.uint16)).tobytes()]
                    for k, (o, data) in enumerate(zip(job.outs, parts)):
                        os.pwrite(fds[o.shard], data, bases[o.shard] + o.offset + written[k])
                        written[k] += len(data)
                        task.advance(len(data))
                for o, n in zip(job.outs, written):
                    if n != o.nbytes:
                        raise MLXExportError(f"{o.name}: wrote {n} bytes, planned {o.nbytes}")
    finally:
        for fd in fds:
            os.close(fd)


@register
class MLXTarget(Target):
    name = "mlx"
    description = "a directory that mlx_lm.load reads"
    runtime_name = "mlx and mlx-lm"
    extra = "mlx"
    types = MLX_TYPES
    default_preset = "4bit"
    artifact_kind = "directory"
    color = "#d62728"
    # Metal allocates each tensor as one buffer, and a buffer cannot exceed 4 GB: E2B/E4B's PLE table in bf16
    # (4.7 / 5.6 GB) must be quantized to load on Apple GPUs.
    max_tensor_bytes = 4 * 2**30
    max_tensor_reason = "Metal's 4 GiB buffer"
    group_sizes = (32, 64, 128)
    default_group_size = 64
    devices_help = "cpu, or gpu (Metal)"
    lattice_type = "Q4G32"
    lattice_form = "affine groups of 32: scale = step, bias = -8 step"

    def small_type(self, preset: Preset):
        """What a tensor over the size limit becomes: the preset's "high" type, or 8 bits in its group."""
        high = self.types[preset.high]
        return high if not high.is_float else self.types[f"Q8G{self._group(preset)}"]

    def _group(self, preset: Preset) -> int:
        for v in preset.slots.values():
            if v and not self.types[v].is_float:
                return self.types[v].block
        return self.default_group_size

    def require(self) -> None:
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            raise MLXExportError("the MLX target needs mlx: pip install 'gemma4-export[mlx]'") from None

    def artifact_name(self, source: str, preset: Preset, group_size: int | None = None) -> str:
        suffix = preset.name if not group_size or group_size == self.default_group_size else \
            f"{preset.name}-g{group_size}"
        return f"{source}-mlx-{suffix}"

    def need_bytes(self, job) -> int:
        return sum(o.nbytes for j in _jobs(job.plan, job.checkpoint)[0] for o in j.outs) + (64 << 20)

    def write(self, job) -> None:
        import mlx.core as mx

        ck, plan, tmp = job.checkpoint, job.plan, job.path
        jobs, quant_paths = _jobs(plan, ck)
        # deterministic order: by name; shards of at most 5 GB, whole modules per shard
        outs = sorted((o for j in jobs for o in j.outs), key=lambda o: o.name)
        shard, used = 0, 0
        for o in outs:
            if used and used + o.nbytes > MAX_SHARD_BYTES:
                shard, used = shard + 1, 0
            o.shard, o.offset = shard, used
            used += o.nbytes
        n_shards = shard + 1
        names = ["model.safetensors"] if n_shards == 1 else [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
                                                             for i in range(n_shards)]
        total = sum(o.nbytes for o in outs)
        _write(tmp, ck, jobs, outs, names, total, job.reporter, plan, mx, job.importance)
        index = {"metadata": {"total_size": total}, "weight_map": {o.name: names[o.shard] for o in outs}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg = mlx_config(job.source.config, job.source.arch, plan, quant_paths, job.source)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copy_tokenizer_files(ck.dir, tmp)
        if job.tower_plan is not None:
            from .mlx_towers import add_towers

            add_towers(ck.dir, tmp, types={e.name: e.type for e in job.tower_plan.kept})

    towers_kind = "inside"

    def tower_policy(self, choice: str | None, preset: Preset | None = None):
        from ..quant.rules import TowerPolicy

        if choice is not None:
            raise MLXExportError("the MLX towers are written in bf16, unquantized, as mlx-vlm's own convert leaves "
                                 "them: there is no tower type to choose")
        return TowerPolicy("towers-bf16", "BF16", "BF16", "BF16")

    def check_towers(self, config: dict) -> None:
        if config.get("model_type") == "gemma4_unified":
            raise MLXExportError("mlx-vlm has no model for the unified 12B's encoder-free embedders")
        if not config.get("vision_config"):
            raise MLXExportError("mlx-vlm's Gemma 4 model needs a vision tower, and this checkpoint has none")

    def tower_runner(self, artifact: Path, towers: Path | None, device: str, src):
        from .registry import TowersNotChecked

        cfg = json.loads((artifact / "config.json").read_text(encoding="utf-8"))
        if not (cfg.get("gemma4_export") or {}).get("towers"):
            return None
        try:
            import mlx_vlm  # noqa: F401
        except ImportError:
            raise TowersNotChecked("mlx-vlm is not installed (see the README's set-up)") from None
        from .mlx_towers import VLMTowerRunner

        return VLMTowerRunner(artifact, src.checkpoint.dir, device)

    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))

    def artifact_info(self, path: Path):
        from ..validate.mlxrt import artifact_info

        return artifact_info(path)

    def make_runner(self, path: Path, spec, device: str, preset: str, accumulate: str = "native"):
        from ..validate.mlxrt import MLXRunner

        return MLXRunner(path, device, accumulate)

    def probe(self) -> dict | None:
        import mlx.core as mx
        import mlx_lm  # noqa: F401

        return {"metal": bool(mx.metal.is_available())}

    def skip_reason(self, device: str, platform: Platform) -> str | None:
        facts = platform.runtime(self.name)
        if device == "cuda":
            return "MLX's GPU runs on Apple Silicon only"
        if facts is None:
            return self.not_installed()
        if device == "mps" and not platform.apple_silicon:
            return f"MLX's Metal GPU needs macOS on Apple Silicon, not {platform.system} {platform.machine}"
        if device == "mps" and not facts.get("metal"):
            return "MLX sees no Metal device here"
        return None

    def backend(self, device: str) -> str:
        return "mlx-lm, mlx cpu" if device == "cpu" else "mlx-lm, mlx gpu (Metal)"


def _jobs(plan: Plan, ck: Checkpoint) -> tuple[list[_Job], dict[str, Any]]:
    """Every output module, and config.json's per-module quantization section."""
    jobs: list[_Job] = []
    quant_paths: dict[str, Any] = {}
    for e in plan.kept:
        for path, rows, shape in mlx_paths(e, ck.text_prefix):
            jobs.append(_Job(e, path, rows, shape, _outputs(path, shape, e.type)))
            module = path.removesuffix(".weight")
            if path.endswith(".weight") and len(shape) >= 2:
                bg = _bits_group(e.type)
                quant_paths[module] = {"group_size": bg[1], "bits": bg[0]} if bg else False
    if not any(v for v in quant_paths.values()):
        quant_paths = {}
    return jobs, quant_paths
