"""The vision and audio towers beside an MLX text directory, so that mlx-vlm loads it whole while mlx-lm still loads
its text.

`gemma4-export mlx` writes what `mlx_lm.load` reads: the text decoder under `language_model.model.*`, quantized as
the plan says, and a config.json without `vision_config` / `audio_config`. `add_towers` adds to that directory:

* one more safetensors shard, `towers.safetensors`, holding the towers and their embedders as mlx-vlm's Gemma 4
  model holds them after its own `sanitize`: `vision_tower.*`, `embed_vision.*`, `audio_tower.*`, `embed_audio.*`
  (the checkpoint's `model.` prefix dropped), convolution weights already in MLX's channels-last layout, unquantized,
  in the checkpoint's own dtype (bf16 for every published checkpoint), as mlx-vlm's own convert leaves them;
* their names in `model.safetensors.index.json` (mlx-vlm reads its shards from the index);
* the checkpoint's `vision_config` / `audio_config` (and media token ids) back in config.json;
* the checkpoint's processor files (processor_config.json, ...), which mlx-vlm's processor reads.

Both runtimes accept the same directory, with no key in a form only one of them reads:

* mlx-lm globs `model*.safetensors`, so it never opens `towers.safetensors` (nor downloads it from a hub: its
  allow-list is `model*.safetensors` too), and its Gemma 4 `sanitize` drops every vision_tower / audio_tower /
  embed_vision / embed_audio key anyway; its ModelArgs ignore `vision_config` / `audio_config`.
* mlx-vlm quantizes a module only when config.json's `quantization` section names it or its `.scales` tensor exists:
  the section names text modules only and the towers have no scales, so they load unquantized.
* Without an audio tower, config.json says `"audio_config": null` (as transformers writes it): mlx-vlm then builds
  none, where an absent key would make it build a default one and discard it with a warning.

mlx-vlm's Gemma 4 audio tower (0.7.x) is built for 128 mel bins, as every published checkpoint has; a checkpoint
whose tower takes another width (the tiny test checkpoints: 16) gets no audio tower by default (`audio`).

The tensors are streamed, one at a time (the largest, the vision position table, is ~50 MB in the 31B), into a file
whose header is computed first. Each output file is written under a temporary name and renamed over its final one,
in the order shard, processor files, index, config.json: an interrupted run leaves mlx-lm's text intact, and running
it again completes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..atomic import atomic_file, write_text
from ..errors import Gemma4ExportError
from ..exporter.checkpoint import DTYPES, Checkpoint, to_f32
from . import encode_float

TOWERS_SHARD = "towers.safetensors"
INDEX = "model.safetensors.index.json"
# what mlx-vlm's Gemma 4 processor reads (the tokenizer files are already there: the MLX target copies them)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# the modules of mlx-vlm's Gemma 4 Model that hold the towers, named as in transformers' Gemma4Model
VISION_MODULES = ("vision_tower", "embed_vision")
AUDIO_MODULES = ("audio_tower", "embed_audio")
# top-level config keys that mlx-vlm reads to place the soft tokens (kept by the MLX target's config; restored here
# when missing)
MEDIA_KEYS = ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id", "eoi_token_id", "boa_token_id",
              "eoa_token_id", "eoa_token_index", "vision_soft_tokens_per_image", "audio_ms_per_token")
MLX_VLM_MEL_BINS = 128  # the audio input width mlx-vlm's Gemma 4 tower is built for
CLIP_SUFFIXES = (".input_min", ".input_max", ".output_min", ".output_max")
# tensors of 3 or more dimensions that are not convolutions, which both runtimes store alike
PLAIN_ND = ("vision_tower.patch_embedder.position_embedding_table",)


class MLXTowersError(Gemma4ExportError):
    pass


# ---- names and layouts -------------------------------------------------------------------------------------------


def _clipped(cfg: dict[str, Any] | None, default: bool) -> bool:
    v = (cfg or {}).get("use_clipped_linears")
    return default if v is None else bool(v)


def tower_layout(name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> tuple[int, ...] | None:
    """The axis permutation from transformers' layout to MLX's for one tower tensor (by its mlx-vlm name), or None
    when the layouts are the same. Conv2d [out, in, kH, kW] -> [out, kH, kW, in]; Conv1d [out, in, k] -> [out, k, in].
    A tensor of 3 or more dimensions that is neither a known convolution nor a known table is refused: its layout
    would be a guess."""
    if len(shape) <= 2 or name in PLAIN_ND:
        return None
    if name.startswith("audio_tower.subsample_conv_projection.") and name.endswith(".conv.weight") and len(shape) == 4:
        # the input channels must be what mlx-vlm's sanitize expects, or it would transpose the MLX layout again
        audio = cfg.get("audio_config") or {}
        channels = list(audio.get("subsampling_conv_channels") or (128, 32))
        layer = name.split(".subsample_conv_projection.")[1].split(".")[0]
        want = {"layer0": 1, "layer1": channels[0]}.get(layer)
        if want is not None and shape[1] != want:
            raise MLXTowersError(f"{name}: {list(shape)} has {shape[1]} input channels, the audio config implies "
                                 f"{want}")
        return (0, 2, 3, 1)
    if name.endswith("depthwise_conv1d.weight") and len(shape) == 3:
        return (0, 2, 1)
    raise MLXTowersError(f"{name}: no known MLX layout for a {len(shape)}-dimensional tower tensor {list(shape)}")


def tower_name(hf: str, cfg: dict[str, Any]) -> str | None:
    """mlx-vlm's name for a checkpoint tower tensor, or None for one its Gemma 4 `sanitize` discards (rotary buffers;
    clip bounds of a tower built without clipped linears; audio tensors when there is no audio config)."""
    if not hf.startswith("model."):
        raise MLXTowersError(f"'{hf}': not a Gemma 4 tower tensor")
    name = hf[len("model."):]
    module = name.split(".", 1)[0]
    if module not in VISION_MODULES + AUDIO_MODULES:
        raise MLXTowersError(f"'{hf}': mlx-vlm's Gemma 4 model has no module '{module}' (only "
                             f"{', '.join(VISION_MODULES + AUDIO_MODULES)})")
    if "rotary_emb" in name:
        return None
    audio = module in AUDIO_MODULES
    if audio and not cfg.get("audio_config"):
        return None
    if name.endswith(CLIP_SUFFIXES):
        # transformers' defaults: clipped linears in the audio tower, none in the vision tower
        if not _clipped(cfg.get("audio_config" if audio else "vision_config"), default=audio):
            return None
    return name


# ---- writing -----------------------------------------------------------------------------------------------------


def _header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, list[int]]:
    h: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offsets, at = [], 0
    for name, dtype, shape, nbytes in entries:
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
        offsets.append(at)
        at += nbytes
    b = json.dumps(h, separators=(",", ":")).encode()
    b += b" " * (-len(b) % 8)
    return len(b).to_bytes(8, "little") + b, offsets


@contextmanager
def _atomic(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`; on success fsynced and renamed over it, on failure removed."""
    with atomic_file(final, force=True) as st:
        yield st.path


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _shard_bytes(path: Path) -> int:
    """The tensor bytes of one safetensors file, from its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def audio_incompatibility(cfg: dict[str, Any], proj_in: int | None) -> str | None:
    """Why mlx-vlm cannot build this checkpoint's audio tower, or None. mlx-vlm's Gemma 4 audio tower (0.7.x) takes
    a fixed 128 mel bins (SubSampleConvProjection.INPUT_FEAT_SIZE): its input projection is sized for 128 bins
    through two stride-2 convolutions, where transformers sizes it from the first convolution's width (128 in every
    published checkpoint). `proj_in` is the checkpoint's input projection width."""
    channels = list((cfg.get("audio_config") or {}).get("subsampling_conv_channels") or (128, 32))
    freq = MLX_VLM_MEL_BINS
    for _ in range(2):
        freq = (freq + 2 - 3) // 2 + 1
    want = freq * channels[-1]
    if proj_in is not None and proj_in != want:
        return (f"mlx-vlm's audio tower takes {MLX_VLM_MEL_BINS} mel bins (an input projection {want} wide); this "
                f"checkpoint's is {proj_in} wide ({channels[0]} bins)")
    return None


def add_towers(checkpoint_dir: str | Path, mlx_dir: str | Path, audio: bool | None = None,
               types: dict[str, str] | None = None) -> dict[str, Any]:
    """Add the checkpoint's vision and audio towers to an MLX directory written by `gemma4-export mlx` from the same
    checkpoint (see the module docstring). Running it again rewrites the same files. Returns what was written.

    audio: None (the default) adds the audio tower when the checkpoint has one that mlx-vlm can build (see
    `audio_incompatibility`; the result's `audio_skipped` says why not otherwise); True adds it regardless, False
    never. A directory without the audio tower has no `audio_config` and loads in mlx-vlm for images and text.

    types: {checkpoint tensor name: "BF16" | "F16" | "F32"}, the towers' plan (quant/rules.py, TOWER_RULES); a tensor
    stored in another float type is converted. Without it, every tensor keeps its stored dtype."""
    mlx_dir = Path(mlx_dir)
    cfg_path, index_path = mlx_dir / "config.json", mlx_dir / INDEX
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLXTowersError(f"{mlx_dir}: not an MLX directory written by gemma4-export ({e})") from None
    meta = cfg.get("gemma4_export") or {}
    if meta.get("target") != "mlx" or "weight_map" not in index:
        raise MLXTowersError(f"{mlx_dir}: not an MLX directory written by gemma4-export")

    with Checkpoint(checkpoint_dir) as ck:
        src = json.loads((ck.dir / "config.json").read_text(encoding="utf-8"))
        if not src.get("vision_config"):
            raise MLXTowersError(f"{ck.dir}: the checkpoint has no vision tower (mlx-vlm's Gemma 4 model needs one); "
                                 "the MLX directory stays text-only")
        if src.get("vision_config", {}).get("model_type") not in (None, "gemma4_vision"):
            raise MLXTowersError(f"{ck.dir}: vision model_type {src['vision_config']['model_type']!r} is not "
                                 "mlx-vlm's gemma4 vision tower")
        text_cfg, have = src.get("text_config") or {}, cfg.get("text_config") or {}
        for k in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if k in text_cfg and k in have and text_cfg[k] != have[k]:
                raise MLXTowersError(f"{mlx_dir}: text_config.{k} is {have[k]}, the checkpoint's is {text_cfg[k]}: "
                                     "not exported from this checkpoint")
        audio_skipped = None
        if src.get("audio_config"):
            proj = ck.tensors.get("model.audio_tower.subsample_conv_projection.input_proj_linear.weight")
            why = audio_incompatibility(src, proj.shape[-1] if proj is not None else None)
            if audio is False:
                audio_skipped = "not asked for"
            elif audio is None and why:
                audio_skipped = why
            if audio_skipped:
                src = {k: v for k, v in src.items() if k != "audio_config"}  # the towers' names then drop audio
        # the output tensors: (mlx name, dtype, output shape, bytes, checkpoint name, permutation)
        jobs, dropped = [], []
        for hf in sorted(ck.tensors):
            if not hf.startswith(tuple(f"model.{m}." for m in VISION_MODULES + AUDIO_MODULES)):
                if hf.startswith(("model.vision_embedder.", "model.audio_embedder.")):
                    raise MLXTowersError(f"{ck.dir}: '{hf}' belongs to a tower layout mlx-vlm's gemma4 model lacks")
                continue
            info = ck.info(hf)
            name = tower_name(hf, src)
            if name is None:
                if not (audio_skipped and hf.startswith(("model.audio_tower.", "model.embed_audio."))):
                    dropped.append(hf)
                continue
            if info.dtype not in ("BF16", "F16", "F32"):
                raise MLXTowersError(f"{ck.dir}: tower tensor '{hf}' has dtype {info.dtype}, not a float")
            perm = tower_layout(name, info.shape, src)
            shape = tuple(info.shape[p] for p in perm) if perm else info.shape
            dtype = (types or {}).get(hf, info.dtype)
            if dtype not in ("BF16", "F16", "F32"):
                raise MLXTowersError(f"{hf}: the towers are written in a float type, not {dtype}")
            jobs.append((name, dtype, shape, info.numel * DTYPES[dtype][1], hf, perm))
        if not any(j[0].startswith("vision_tower.") for j in jobs):
            raise MLXTowersError(f"{ck.dir}: config.json has a vision_config but no vision_tower tensors")
        clash = [j[0] for j in jobs if index["weight_map"].get(j[0], TOWERS_SHARD) != TOWERS_SHARD]
        if clash:
            raise MLXTowersError(f"{mlx_dir}: {clash[0]} is already in {index['weight_map'][clash[0]]}")

        head, offsets = _header([(n, d, s, b) for n, d, s, b, _, _ in jobs])
        total = sum(j[3] for j in jobs)
        shard = mlx_dir / TOWERS_SHARD
        with _atomic(shard) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, head)
                for (name, dtype, shape, nbytes, hf, perm), off in zip(jobs, offsets):
                    a = ck.raw(hf)  # stored elements: bf16 as its uint16 bit patterns, moved as they are
                    stored = ck.info(hf).dtype
                    if dtype != stored:
                        a = encode_float(np.asarray(to_f32(a, stored), dtype=np.float32).reshape(a.shape), dtype)
                    if perm:
                        a = a.transpose(perm)
                    data = np.ascontiguousarray(a, dtype=DTYPES[dtype][0]).tobytes()
                    if len(data) != nbytes:
                        raise MLXTowersError(f"{hf}: {len(data)} bytes, planned {nbytes}")
                    os.pwrite(fd, data, len(head) + off)
            finally:
                os.close(fd)

        # the processor files beside the tokenizer files the MLX target copied
        copied = []
        for f in PROCESSOR_FILES:
            if (ck.dir / f).is_file():
                with _atomic(mlx_dir / f) as tmp:
                    shutil.copyfile(ck.dir / f, tmp)
                copied.append(f)

    # index: the text shards' entries as they were, the towers' (this run's only) in their shard
    wm = {k: v for k, v in index["weight_map"].items() if v != TOWERS_SHARD}
    wm.update({j[0]: TOWERS_SHARD for j in jobs})
    shards = sorted(set(wm.values()))
    index = {**index, "metadata": {**index.get("metadata", {}),
                                   "total_size": sum(_shard_bytes(mlx_dir / s) for s in shards)},
             "weight_map": dict(sorted(wm.items()))}
    _write_json(index_path, index)

    # config: the towers' configs as the checkpoint has them (mlx-vlm reads them as transformers writes them), and
    # the media token ids
    modules = sorted({j[0].split(".", 1)[0] for j in jobs})
    cfg["vision_config"] = src["vision_config"]
    # no audio tower: an explicit null (as transformers writes it), which mlx-vlm reads as "build none"; absent, it
    # would build a default 1024-wide tower and then discard it for want of weights, with a warning
    cfg["audio_config"] = src["audio_config"] if src.get("audio_config") and "audio_tower" in modules else None
    for k in MEDIA_KEYS:
        if k in src:
            cfg[k] = src[k]
    summary = {"shard": TOWERS_SHARD, "modules": modules, "tensors": len(jobs),
               "parameters": int(sum(int(np.prod(j[2], dtype=np.int64)) for j in jobs)), "bytes": total,
               "dtypes": sorted({j[1] for j in jobs}), "audio_skipped": audio_skipped}
    cfg["gemma4_export"] = {**meta, "towers": summary}
    _write_json(cfg_path, cfg)
    return {**summary, "transposed": [j[0] for j in jobs if j[5]], "dropped": dropped,
            "processor_files": copied, "path": str(mlx_dir)}


# ---- mlx-vlm as the runtime: the towers' features ---------------------------------------------------------------


def load_vlm(mlx_dir: str | Path):
    """mlx-vlm's model for the directory, by `mlx_vlm.utils.load_model` (strict: every parameter of its Gemma 4 model
    must be in the files, with its shape; modules quantized as config.json and the `.scales` tensors say)."""
    try:
        from mlx_vlm.utils import load_model
    except ImportError:
        raise MLXTowersError("validating the towers needs mlx-vlm: pip install mlx-vlm") from None
    return load_model(Path(mlx_dir), trust_remote_code=False)


def load_vlm_processor(mlx_dir: str | Path):
    """mlx-vlm's whole loader, `mlx_vlm.load`: (model, processor), with remote code refused."""
    from mlx_vlm import load

    return load(str(mlx_dir), trust_remote_code=False)


@contextmanager
def _widened(modules, dtype: str):
    """The modules' floating parameters in float32 for the duration (bf16 and f16 widen exactly), restored after;
    dtype "native" leaves them as loaded."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if dtype not in ("float32", "native"):
        raise ValueError(f"dtype {dtype!r}: float32 or native")
    saved = [m.parameters() for m in modules]
    try:
        if dtype == "float32":
            for m in modules:
                m.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                                  m.parameters()))
        yield
    finally:
        for m, p in zip(modules, saved):
            m.update(p)


def _model(model_or_dir):
    return load_vlm(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir


def mlx_vlm_features(model_or_dir, pixel_values: np.ndarray, position_ids: np.ndarray,
                     dtype: str = "float32") -> np.ndarray:
    """[soft tokens, text hidden] for one image, by mlx-vlm's own `Model.encode_image` (vision_tower, then
    embed_vision), from pixel_values [1, N, p*p*3] and position ids [1, N, 2] as towers.image_patches makes them.
    dtype "float32" computes with the tower and embedder weights widened to float32 (exact), "native" in the
    stored dtype (bf16), as mlx-vlm runs them."""
    import mlx.core as mx

    model = _model(model_or_dir)
    with _widened([model.vision_tower, model.embed_vision], dtype):
        pv = mx.array(np.ascontiguousarray(pixel_values, dtype=np.float32))
        pos = mx.array(np.ascontiguousarray(position_ids).astype(np.int32))
        out = model.encode_image(pv, pos).astype(mx.float32)
        mx.eval(out)
    return np.array(out).reshape(-1, out.shape[-1])


def mlx_vlm_audio_features(model_or_dir, input_features: np.ndarray, mask: np.ndarray,
                           dtype: str = "float32") -> np.ndarray:
    """[soft tokens, text hidden] for one clip: mlx-vlm's audio_tower then embed_audio, as its
    `get_input_embeddings` runs them, on log-mel input_features [1, T, mel] with transformers' mask [1, T] (True =
    a valid frame; mlx-vlm's tower takes the inverse), keeping the frames its tower marks valid. dtype as for
    mlx_vlm_features."""
    import mlx.core as mx

    model = _model(model_or_dir)
    if model.audio_tower is None:
        raise MLXTowersError("this mlx-vlm model has no audio tower")
    with _widened([model.audio_tower, model.embed_audio], dtype):
        feats = mx.array(np.ascontiguousarray(input_features, dtype=np.float32))
        invalid = mx.array(~np.asarray(mask, dtype=bool))
        enc, out_mask = model.audio_tower(feats, invalid)
        out = model.embed_audio(enc).astype(mx.float32)
        mx.eval(out, out_mask)
    keep = ~np.array(out_mask[0])
    return np.array(out[0])[keep]


# ---- the towers' runner for validate.towers.tower_checks --------------------------------------------------------


class VLMTowerRunner:
    """mlx-vlm running the directory as its apps do (the towers in their stored dtype): the image and audio
    embeddings, and greedy generations from a prompt holding an image or a clip (mlx-vlm's own generate_step)."""

    name = "mlx-vlm"

    def __init__(self, mlx_dir: str | Path, src_dir: str | Path, device: str = "cpu"):
        import mlx.core as mx
        from transformers import AutoTokenizer

        if device in ("gpu", "mps", "metal"):
            mx.set_default_device(mx.gpu)
        self.mx = mx
        self.dir, self.src_dir = Path(mlx_dir), Path(src_dir)
        self.model = load_vlm(self.dir)
        from ..validate.mlxrt import widen_experts_for_cpu

        widen_experts_for_cpu(self.model)
        self.cfg = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
        self.vision = self.model.vision_tower is not None
        self.audio = getattr(self.model, "audio_tower", None) is not None
        self.limits = "float"  # unquantized towers
        self.patch = int(self.cfg["vision_config"]["patch_size"])
        self.tok = AutoTokenizer.from_pretrained(self.dir)

    def embeddings(self, media: np.ndarray) -> np.ndarray:
        from ..validate.towers import audio_features, image_patches

        if media.ndim == 3:
            return mlx_vlm_features(self.model, *image_patches(media, self.patch), dtype="native")
        return mlx_vlm_audio_features(self.model, *audio_features(media, self.src_dir), dtype="native")

    def media_prompt(self, kind: str, media: np.ndarray) -> list[int]:
        from ..validate.towers import media_prompt_ids

        return media_prompt_ids(lambda t: self.tok.encode(t, add_special_tokens=False), self.cfg, kind,
                                self.embeddings(media).shape[0])

    def media_greedy(self, kind: str, media: np.ndarray, n: int) -> list[int]:
        from mlx_vlm.generate.ar import generate_step

        from ..validate.towers import audio_features, image_patches

        mx = self.mx
        ids = self.media_prompt(kind, media)
        c = self.cfg
        types = [[1 if t == c["image_token_id"] else 3 if t == c["audio_token_id"] else 0 for t in ids]]
        kw: dict = {"mm_token_type_ids": mx.array(types)}
        pixels = None
        if kind == "image":
            pv, pos = image_patches(media, self.patch)
            pixels, kw["image_position_ids"] = mx.array(pv), mx.array(pos.astype(np.int32))
        else:
            x, mask = audio_features(media, self.src_dir)
            kw["input_features"], kw["input_features_mask"] = mx.array(x), mx.array(mask)
        out = generate_step(mx.array([ids]), self.model, pixels, None, max_tokens=n, temperature=0.0, **kw)
        return [int(t) for t, _ in out][:n]

    def close(self) -> None:
        self.model = None
