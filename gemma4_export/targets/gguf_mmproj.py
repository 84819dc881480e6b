"""The projector GGUF (mmproj) that llama.cpp's mtmd reads beside the text GGUF: both towers in one file.

Vision is projector type `gemma4v`, audio `gemma4a` (llama.cpp's clip.cpp builds their graphs); the unified 12B's
encoder-free embedders are `gemma4uv` and `gemma4ua`. The file holds what
llama.cpp's own `convert_hf_to_gguf.py --mmproj` writes for Gemma 4, from our own name table:
- the tensor names clip.cpp looks up (`v.blk.N.attn_q.weight`, `a.blk.N.conv_pw1.weight`, `mm.input_projection`,
  ...), each clippable linear's limits beside its weight as 1-element F32 tensors (`v.blk.N.attn_q.input_max`);
- the layouts clip.cpp computes with: the patch embedding as a [D, 3, p, p] convolution kernel (transformers
  stores it flattened in (y, x, channel) order), the audio depthwise kernel as [C, K], the attention's
  per-dimension scale passed through softplus (clip.cpp multiplies by it as stored);
- the `clip.*` metadata clip.cpp requires (sizes, heads, layers, projection width, image mean/std, mel bins).

Every tensor's type comes from the tower rules (quant/rules.py, TOWER_RULES) under the `--mmproj` choice, and each
tensor is read, converted and written one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from .. import __version__
from ..errors import Gemma4ExportError
from ..exporter.checkpoint import Checkpoint, to_f32
from ..exporter.processor import image_normalisation, mel_bins
from ..exporter.tower_names import mmproj_tensor
from ..progress import Reporter
from ..quant.plan import Plan, PlanEntry
from ..quant.rules import TowerPolicy
from . import encode_float
from .gguf_file import GGUFWriter

MMPROJ_TYPES = ("f16", "q8_0", "f32")
# llama.cpp's converter writes 224 and marks it unused: gemma4v images keep their own size.
IMAGE_SIZE_KEY_VALUE = 224
LAYER_NORM_EPS = 1e-6  # clip.cpp forces 1e-6 for gemma4a; the vision towers use it too


class MMProjError(Gemma4ExportError):
    pass


def mmproj_policy(choice: str) -> TowerPolicy:
    """The tower policy of `--mmproj f16|q8_0|f32`."""
    c = choice.lower()
    if c == "f16":
        return TowerPolicy("mmproj-f16", "F16", "F32", "F16")
    if c == "q8_0":
        return TowerPolicy("mmproj-q8_0", "Q8_0", "F32", "F32")
    if c == "f32":
        return TowerPolicy("mmproj-f32", "F32", "F32", "F32")
    raise MMProjError(f"--mmproj {choice!r}: choose {', '.join(MMPROJ_TYPES)} or none")


def mmproj_name(source: str, choice: str) -> str:
    return f"mmproj-{source}-{choice.lower()}.gguf"


def _out_shape(shape: tuple[int, ...], transform: str, patch: int) -> tuple[int, ...]:
    if transform == "patch":
        return (shape[0], 3, patch, patch)
    if transform == "depthwise":
        return (shape[0], shape[-1])
    if transform == "swap01":
        return (shape[1], shape[0], *shape[2:])
    return shape or (1,)


def _hwc_to_chw(n: int) -> np.ndarray:
    """For a patch of n = p*p*3 values flattened (y, x, c): the source index of each (c, y, x) position."""
    p = int(round((n // 3) ** 0.5))
    return np.arange(n).reshape(p, p, 3).transpose(2, 0, 1).reshape(-1)


def _convert(a: np.ndarray, transform: str, patch: int) -> np.ndarray:
    if transform == "patch":  # [D, p*p*3] in (y, x, c) order -> conv kernel [D, 3, p, p]
        return a.reshape(a.shape[0], patch, patch, 3).transpose(0, 3, 1, 2)
    if transform == "depthwise":  # [C, 1, K] -> [C, K]
        return a.reshape(a.shape[0], a.shape[-1])
    if transform == "softplus":
        return np.logaddexp(0, a.astype(np.float64)).astype(np.float32)
    if transform == "hwc_columns":  # [D, p*p*3]: columns from (y, x, c) to (c, y, x) order
        return a[:, _hwc_to_chw(a.shape[1])]
    if transform == "hwc_vector":
        return a[_hwc_to_chw(a.shape[0])]
    if transform == "swap01":
        return a.transpose(1, 0, *range(2, a.ndim))
    return a.reshape(a.shape or (1,))


def find_mmproj(text_gguf: Path) -> Path | None:
    """The projector written beside a text GGUF of the same weights (`mmproj-<name>-<type>.gguf`), or None."""
    from .gguf_file import read_gguf

    try:
        meta = read_gguf(text_gguf, arrays=False).metadata
    except Gemma4ExportError:
        return None
    name, digest = meta.get("general.name"), meta.get("gemma4_export.source_digest")
    for p in sorted(Path(text_gguf).parent.glob(f"mmproj-{name}-*.gguf")):
        try:
            m = read_gguf(p, arrays=False).metadata
        except Gemma4ExportError:
            continue
        if m.get("general.type") == "mmproj" and (digest is None or m.get("gemma4_export.source_digest") == digest):
            return p
    return None


def mmproj_digest(path: Path) -> str | None:
    from .gguf_file import read_gguf

    return read_gguf(path, arrays=False).metadata.get("gemma4_export.source_digest")


def unified(config: dict) -> bool:
    arch = (config.get("architectures") or [""])[0]
    return config.get("model_type") == "gemma4_unified" or arch.startswith("Gemma4Unified")


def check_towers(config: dict) -> None:
    """The projector holds Gemma4ForConditionalGeneration's towers or the unified model's embedders; a checkpoint
    without either gets a clear error."""
    if not (config.get("vision_config") or config.get("audio_config")):
        raise MMProjError("this checkpoint has no vision or audio tower (a text-only save): there is no projector "
                          "to write; use --mmproj none")


def write_metadata(w: GGUFWriter, config: dict, directory: Path, name: str, policy: TowerPolicy,
                   has: set[str]) -> None:
    """The clip.* keys clip.cpp requires, from the checkpoint's config and processor files."""
    text = config.get("text_config") or {}
    width = int(text["hidden_size"])
    w.string("general.architecture", "clip")
    w.string("general.type", "mmproj")
    w.string("general.name", name)
    w.string("general.quantized_by", f"gemma4-export {__version__}")
    w.u32("general.file_type", {"F32": 0, "F16": 1, "Q8_0": 7}[policy.matrix])
    v, a = config.get("vision_config"), config.get("audio_config")
    if unified(config):  # encoder-free: widths only, no blocks (as llama.cpp's converter writes them)
        v = v and {"patch_size": v.get("patch_size", 16), "hidden_size": v["mm_embed_dim"], "intermediate_size": 0,
                   "num_hidden_layers": 0, "num_attention_heads": 0}
        a = a and {"hidden_size": a["audio_embed_dim"], "num_hidden_layers": 0, "num_attention_heads": 0,
                   "_mel": a["audio_embed_dim"]}
    w.boolean("clip.has_vision_encoder", "vision" in has)
    w.boolean("clip.has_audio_encoder", "audio" in has)
    if "vision" in has:
        mean, std = image_normalisation(directory)
        w.u32("clip.vision.projection_dim", width)
        w.u32("clip.vision.image_size", IMAGE_SIZE_KEY_VALUE)
        w.u32("clip.vision.patch_size", int(v["patch_size"]))
        w.u32("clip.vision.embedding_length", int(v["hidden_size"]))
        w.u32("clip.vision.feed_forward_length", int(v["intermediate_size"]))
        w.u32("clip.vision.block_count", int(v["num_hidden_layers"]))
        w.u32("clip.vision.attention.head_count", int(v["num_attention_heads"]))
        w.f32("clip.vision.attention.layer_norm_epsilon", LAYER_NORM_EPS)
        w.array("clip.vision.image_mean", mean, GGUFValueType.FLOAT32)
        w.array("clip.vision.image_std", std, GGUFValueType.FLOAT32)
        w.string("clip.vision.projector_type", "gemma4uv" if unified(config) else "gemma4v")
        if int(v.get("pooling_kernel_size", 3)) != 3:
            w.u32("clip.vision.projector.scale_factor", int(v["pooling_kernel_size"]))
    if "audio" in has:
        hidden = int(a["hidden_size"])
        w.u32("clip.audio.projection_dim", width)
        w.u32("clip.audio.embedding_length", hidden)
        w.u32("clip.audio.feed_forward_length", 0 if "_mel" in a else 4 * hidden)
        w.u32("clip.audio.block_count", int(a["num_hidden_layers"]))
        w.u32("clip.audio.attention.head_count", int(a["num_attention_heads"]))
        w.f32("clip.audio.attention.layer_norm_epsilon", LAYER_NORM_EPS)
        if "_mel" in a:  # raw waveform frames of audio_embed_dim samples (llama.cpp's gemma4ua takes 640)
            w.u32("clip.audio.num_mel_bins", a["_mel"])
        else:
            w.u32("clip.audio.num_mel_bins", mel_bins(directory, int((a.get("subsampling_conv_channels") or [128])[0])))
        w.string("clip.audio.projector_type", "gemma4ua" if "_mel" in a else "gemma4a")


def write_mmproj(ck: Checkpoint, config: dict, plan: Plan, out: Path, name: str, policy: TowerPolicy,
                 reporter: Reporter, threads: int | None = None, digest: str | None = None) -> dict[str, str]:
    """Write the projector to `out` (a staging path: the caller renames it); returns {GGUF name: type}."""
    check_towers(config)
    patch = int((config.get("vision_config") or {}).get("patch_size", 16))
    w = GGUFWriter()
    rows: dict[str, tuple[PlanEntry, str]] = {}
    has = set()
    uni = unified(config)
    for e in plan.kept:
        gname, transform = mmproj_tensor(e.name, uni)
        has.add("audio" if gname.startswith(("a.", "mm.a.")) else "vision")
        w.add_tensor(gname, _out_shape(e.shape, transform, patch), e.type)
        rows[gname] = (e, transform)
    write_metadata(w, config, ck.dir, name, policy, has)
    if digest:  # the weights it came from, as the text GGUF records them
        w.string("gemma4_export.source_digest", digest)
    quantizer = None
    if any(e.type == "Q8_0" for e, _ in rows.values()):
        from .ggml_quant import Quantizer

        quantizer = Quantizer(threads)

    def blocks_for(entry) -> Iterator[np.ndarray]:
        e, transform = rows[entry.name]
        info = ck.info(e.name)
        a = _convert(np.asarray(to_f32(ck.raw(e.name), info.dtype), dtype=np.float32).reshape(info.shape),
                     transform, patch)
        if entry.type == "Q8_0":
            out_bytes = quantizer.quantize("Q8_0", np.ascontiguousarray(a.reshape(-1, a.shape[-1])))
        else:
            out_bytes = encode_float(np.ascontiguousarray(a, dtype=np.float32), entry.type)
        task.advance(entry.nbytes)
        yield out_bytes

    try:
        with reporter.task(f"projector {plan.preset}", sum(t.nbytes for t in w.tensors)) as task, \
                open(out, "wb", buffering=0) as f:
            w.write(f, blocks_for)
    finally:
        if quantizer is not None:
            quantizer.close()
    return {t.name: t.type for t in w.tensors}
