"""ONNX encoders for Gemma 4's vision and audio towers, as transformers.js 4.x (Gemma4ForConditionalGeneration) and
onnxruntime run them.

- onnx/vision_encoder{suffix}.onnx: pixel_values float32 [batch, patches, p*p*3] (rescaled to 0..1, as the image
  processor gives them) and pixel_position_ids int64 [batch, patches, 2] ((column, row) per patch, (-1, -1) for a
  padding patch) -> image_features float32 [tokens, text hidden]: the valid soft tokens only, image after image. The
  processor pads every image to max_soft_tokens * k^2 patches; a padding patch is zeroed, masked out of attention and
  pooled into nothing, and the soft tokens no valid patch falls into are dropped (what Gemma4VisionModel does), so an
  image gives (its valid patches) / k^2 rows, padded or not.
- onnx/audio_encoder{suffix}.onnx: input_features float32 [batch, frames, mel] and input_features_mask bool
  [batch, frames] -> audio_features float32 [tokens, text hidden]: the frames the tower's own output mask keeps (the
  input mask after its two stride-2 convolutions), clip after clip.

Both graphs end in the multimodal embedder, so the rows are in the text model's hidden size, ready to be placed at the
image / audio placeholder tokens. The graphs are traced by torch.onnx.export (the dynamo exporter) from transformers'
own modules (patch embedder, encoder layers, subsampling convolutions, conformer layers, embedders), in float32 built
from the checkpoint's tower tensors alone (validate/towers.py). Only the parts whose shapes transformers computes in
Python are written here as tensor operations, so that they stay dynamic: the vision pooler (the same one-hot
average over k x k patches, then the sqrt(hidden) scale and the optional standardization), and the audio tower's
stride-2 masks and its blocked sliding-window attention mask (the mask transformers builds, made from indices).

Presets (file suffix as transformers.js's dtype names it): fp32 (''); fp16 ('_fp16'): weights and compute in float16
where transformers computes a half model in float16, float32 where it upcasts (RMS norms, the audio attention logits
and softmax) and, here, also the vision pooling and the embedders' pre-projection norm (the pooled features are
scaled by sqrt(hidden), which can pass float16's range); its inputs and outputs stay float32 (Casts at both ends);
int8 ('_quantized'): the fp32 graph with its MatMul weights quantized to symmetric int8 blocks of 32 by onnxruntime's
weight-only quantizer (MatMulNBits at accuracy level 4: each row's activations in int8 blocks of 32 for the products).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import clear_stale
from ..errors import Gemma4ExportError
from .onnx import ONNX_DIR, ONNXExportError, suffix

VISION, AUDIO = "vision", "audio"
GRAPHS = {VISION: "vision_encoder", AUDIO: "audio_encoder"}
IO = {
    VISION: (("pixel_values", "pixel_position_ids"), "image_features"),
    AUDIO: (("input_features", "input_features_mask"), "audio_features"),
}
PRESETS = ("fp32", "fp16", "int8")
# the encoders beside each text preset: float ones in its float type, 4- and 8-bit ones 8-bit (int4 matrices would
# cost the towers more than the text model's 4 bits do; 8-bit MatMulNBits blocks run in onnxruntime and transformers.js)
ENCODER_PRESET = {"fp32": "fp32", "fp16": "fp16", "q4f16": "fp16", "int8": "int8", "int4": "int8", "qat": "int8"}
OPSET = 18
INT8_BLOCK = 32  # the int8 encoders' weight blocks (llama.cpp's q8_0 block)
MIN_PATCHES = 18  # the exporter needs two soft tokens at least (a single one would be specialised)
MIN_FRAMES = 16


def encoder_file(part: str, preset: str) -> str:
    """The file name of one encoder (vision_encoder_fp16.onnx, ...), inside the artifact's onnx/ directory."""
    return f"{GRAPHS[part]}{suffix(preset)}.onnx"


def encoder_files(preset: str) -> dict[str, str]:
    """{part: path of its .onnx relative to the artifact directory}, as targets.onnx.graph_files gives the text
    model's."""
    return {part: f"{ONNX_DIR}/{encoder_file(part, preset)}" for part in GRAPHS}


def data_files(paths: dict[str, Path]) -> dict[str, int]:
    """{graph file name: number of external data files} for transformers.js's use_external_data_format."""
    return {p.name: int(Path(str(p) + "_data").is_file()) for p in paths.values()}


# ---------------------------------------------------------------------------------------------------------------
# The wrappers: transformers' modules, with the shape-dependent parts as tensor operations


def _modules():
    import torch

    class VisionEncoder(torch.nn.Module):
        """pixel_values, pixel_position_ids -> [valid soft tokens over the batch, text hidden], in float32."""

        def __init__(self, tower, embedder):
            super().__init__()
            self.tower, self.embedder = tower, embedder
            self.k = int(tower.config.pooling_kernel_size)
            self.root_hidden = float(tower.config.hidden_size) ** 0.5

        def forward(self, pixel_values, pixel_position_ids):
            t, k = self.tower, self.k
            padding = (pixel_position_ids == -1).all(dim=-1)
            x = t.patch_embedder(pixel_values, pixel_position_ids, padding)
            h = t.encoder(inputs_embeds=x, attention_mask=~padding, pixel_position_ids=pixel_position_ids)
            h = h.last_hidden_state.masked_fill(padding.unsqueeze(-1), 0.0)
            # Gemma4VisionPooler: each patch averaged into the soft token of its k x k cell, by a one-hot matrix
            length = pixel_values.shape[1] // (k * k)
            pos = pixel_position_ids.clamp(min=0)
            cols = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
            cell = torch.div(pos, k, rounding_mode="floor")
            cell = cell[..., 0] + torch.div(cols, k, rounding_mode="floor") * cell[..., 1]
            weights = (cell.unsqueeze(-1) == torch.arange(length, device=cell.device)).float() / (k * k)
            pooled = weights.transpose(1, 2) @ h.float()
            keep = torch.logical_not((weights == 0).all(dim=1))
            feats = pooled[keep] * self.root_hidden
            if t.config.standardize:
                feats = (feats - t.std_bias.float()) * t.std_scale.float()
            return _embed(self.embedder, feats)

    class AudioEncoder(torch.nn.Module):
        """input_features, input_features_mask -> [valid frames over the batch, text hidden], in float32."""

        def __init__(self, tower, embedder):
            super().__init__()
            self.tower, self.embedder = tower, embedder
            c = tower.config
            self.chunk = int(c.attention_chunk_size)
            self.left = int(c.attention_context_left) - 1  # the past frames a block's context holds
            self.right = int(c.attention_context_right)

        def blocked_mask(self, mask):
            """True where attention is masked, [batch, 1, blocks, chunk, context]: the mask
            Gemma4AudioModel._convert_4d_mask_to_blocked_5d makes of its bidirectional sliding-window mask."""
            n = mask.shape[1]
            c, left, right = self.chunk, self.left, self.right
            blocks = (n + c - 1) // c
            start = torch.arange(blocks, device=mask.device)[:, None, None] * c
            q = start + torch.arange(c, device=mask.device)[None, :, None]
            kv = start + torch.arange(c + left + right, device=mask.device)[None, None, :] - left
            dist = q - kv
            window = ((dist >= 0) & (dist < left)) | ((dist < 0) & (-dist < right))
            inside = (kv >= 0) & (kv < n) & (q < n)
            valid_kv = mask[:, kv.clamp(0, n - 1)]
            return torch.logical_not(window & inside & valid_kv).unsqueeze(1)

        def forward(self, input_features, input_features_mask):
            t = self.tower
            sub = t.subsample_conv_projection
            dtype = sub.input_proj_linear.weight.dtype
            mask = input_features_mask
            h = input_features.to(dtype).unsqueeze(1)
            for layer in (sub.layer0, sub.layer1):  # Gemma4AudioSubSampleConvProjectionLayer, its mask made here
                h = h * mask[:, None, :, None].to(dtype)
                h, _ = layer(h, None)
                mask = mask.index_select(1, torch.arange(0, mask.shape[1], 2, device=mask.device))
            b, _, frames, _ = h.shape
            h = sub.input_proj_linear(h.permute(0, 2, 3, 1).reshape(b, frames, -1))
            position_embeddings = t.rel_pos_enc(h)
            attention_mask = self.blocked_mask(mask)
            for layer in t.layers[: t.config.num_hidden_layers]:
                h = layer(h, attention_mask=attention_mask, position_embeddings=position_embeddings)
                # the layer's blocked attention gives its output length as min(frames, 12 * blocks), which the
                # exporter cannot reduce to `frames`; narrowed to `frames` (what it is), the next layer starts from
                # the plain symbol. Without this every layer nests the expression again and the export time grows
                # exponentially with the layers (tiny towers: 28 s at 2 layers, 337 s at 6; E2B's 12 did not
                # export in 20 minutes).
                h = h.narrow(1, 0, frames)
            h = t.output_proj(h)
            return _embed(self.embedder, h[mask])

    def _embed(embedder, feats):
        # Gemma4MultimodalEmbedder, its norm (no scale) in float32 whatever the weights' type
        normed = embedder.embedding_pre_projection_norm(feats.float())
        proj = embedder.embedding_projection
        return proj(normed.to(proj.weight.dtype)).float()

    return VisionEncoder, AudioEncoder


# ---------------------------------------------------------------------------------------------------------------
# Export


@dataclass
class EncoderExport:
    """What export_encoders_timed wrote: {part: path}, and the seconds each part took."""

    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def towers_of(checkpoint_dir: str | Path) -> list[str]:
    """The towers a checkpoint's config declares ([], ['vision'], ['vision', 'audio']), before anything is loaded.
    Raises for an architecture whose towers this exporter does not know (the unified model)."""
    from ..exporter.arch import head_architecture, load_config

    cfg = load_config(Path(checkpoint_dir))
    arch = head_architecture(cfg) or (cfg.get("architectures") or ["?"])[0]
    parts = [p for p, key in ((VISION, "vision_config"), (AUDIO, "audio_config")) if cfg.get(key)]
    if parts and arch != "Gemma4ForConditionalGeneration":
        raise ONNXExportError(f"{checkpoint_dir}: {arch}'s towers cannot be exported as ONNX encoders (only "
                              "Gemma4ForConditionalGeneration's)")
    return parts


def export_encoders(checkpoint_dir: str | Path, onnx_dir: str | Path, preset: str = "fp32",
                    parts: tuple[str, ...] | None = None, reference=None, file_preset: str | None = None
                    ) -> dict[str, Path]:
    """Write the checkpoint's tower encoders (vision, audio: those it has, or `parts`) into `onnx_dir` as
    vision_encoder{suffix}.onnx / audio_encoder{suffix}.onnx, each with its weights in {file}_data beside it.
    Each file appears whole or not at all (written in a staging directory beside it, then renamed).
    `reference`: a validate.towers.TowerReference of the same checkpoint to reuse (fp16 turns its towers to float16:
    pass one for fp16 only if it is not needed after). `file_preset`: the text preset whose file suffix the
    encoders take (transformers.js loads every session of one dtype by one suffix), else `preset`'s.
    Returns {part: path}."""
    return export_encoders_timed(checkpoint_dir, onnx_dir, preset, parts, reference, file_preset).paths


def export_encoders_timed(checkpoint_dir: str | Path, onnx_dir: str | Path, preset: str = "fp32",
                          parts: tuple[str, ...] | None = None, reference=None, file_preset: str | None = None
                          ) -> EncoderExport:
    if preset not in PRESETS:
        raise ONNXExportError(f"the tower encoders have no preset {preset!r} (they have {', '.join(PRESETS)})")
    _require()
    checkpoint_dir, onnx_dir = Path(checkpoint_dir), Path(onnx_dir)
    have = towers_of(checkpoint_dir)
    if not have:
        raise ONNXExportError(f"{checkpoint_dir}: the checkpoint has no vision or audio tower, so there is no encoder "
                              "to export")
    want = list(parts) if parts is not None else have
    missing = [p for p in want if p not in have]
    if missing or not want:
        raise ONNXExportError(f"{checkpoint_dir}: no {' or '.join(missing) or 'encoder'} tower to export (it has "
                              f"{', '.join(have)})")
    if reference is None:
        from ..validate.towers import TowerReference

        reference = TowerReference(checkpoint_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    out = EncoderExport()
    for part in want:
        t0 = time.perf_counter()
        out.paths[part] = _export_one(reference, part, onnx_dir, preset, file_preset or preset)
        out.seconds[part] = time.perf_counter() - t0
    return out


def _require() -> None:
    import importlib.util

    lacking = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if lacking:
        raise ONNXExportError(f"the ONNX encoders need {', '.join(lacking)}: pip install 'gemma4-export[onnx]'")


def _example(reference, part: str):
    """Inputs to trace with: two items (so that the batch stays dynamic), padded as the processors pad them."""
    import torch

    from ..validate import towers

    if part == VISION:
        vc = reference.config.vision_config
        k = vc.pooling_kernel_size
        pv, pos = towers.image_patches(towers.test_image(4 * k * vc.patch_size, 5 * k * vc.patch_size),
                                       vc.patch_size)
        n, total = pv.shape[1], pv.shape[1] + 3 * k * k
        pixel_values = np.zeros((2, total, pv.shape[2]), np.float32)
        positions = np.full((2, total, 2), -1, np.int64)
        pixel_values[:, :n], positions[:, :n] = pv[0], pos[0]
        return torch.from_numpy(pixel_values), torch.from_numpy(positions)
    mel = _mel_bins(reference)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 57, mel)).astype(np.float32)
    mask = np.ones((2, 57), bool)
    mask[1, 41:] = False
    return torch.from_numpy(features), torch.from_numpy(mask)


def _mel_bins(reference) -> int:
    """The feature extractor's mel bins; else what the tower's input projection implies (two stride-2 convolutions
    take the mel axis to a quarter of its size, times the second convolution's channels)."""
    from ..validate.towers import processor_config

    fe = processor_config(reference.dir).get("feature_extractor") or {}
    if fe.get("feature_size"):
        return int(fe["feature_size"])
    sub = reference.model.audio_tower.subsample_conv_projection
    return 4 * (sub.input_proj_linear.in_features // sub.layer1.conv.out_channels)


def _export_one(reference, part: str, onnx_dir: Path, preset: str, file_preset: str) -> Path:
    import torch

    VisionEncoder, AudioEncoder = _modules()
    m = reference.model
    if part == VISION:
        module = VisionEncoder(m.vision_tower, m.embed_vision)
    else:
        module = AudioEncoder(m.audio_tower, m.embed_audio)
    if preset == "fp16":
        module = module.half()
    module = module.eval()
    inputs, output = IO[part]
    batch = torch.export.Dim("batch_size")
    if part == VISION:
        n = torch.export.Dim("num_patches", min=MIN_PATCHES)
        dynamic = {inputs[0]: {0: batch, 1: n}, inputs[1]: {0: batch, 1: n}}
        tokens = "num_image_tokens"
    else:
        n = torch.export.Dim("num_frames", min=MIN_FRAMES)
        dynamic = {inputs[0]: {0: batch, 1: n}, inputs[1]: {0: batch, 1: n}}
        tokens = "num_audio_tokens"
    example = _example(reference, part)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # its notes on axis names shared by two inputs, and deprecations inside torch.export
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(module, example, dynamo=True, input_names=list(inputs),
                                        output_names=[output], dynamic_shapes=dynamic, opset_version=OPSET,
                                        optimize=True, verbose=False)
    except Exception as e:  # the exporter's own errors are many types, all of them a failed export
        raise ONNXExportError(f"the {part} encoder could not be exported by torch.onnx.export: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") \
            from e
    model = program.model
    _register_orphan_constants(model.graph)
    _name_output(model, tokens)
    for node in model.graph:  # the exporter's per-node stack traces and module paths: ~2 KB a node
        node.metadata_props.clear()
    model.producer_name = "gemma4-export"
    from .. import __version__

    model.producer_version = __version__
    model.metadata_props.update({"gemma4_export.part": GRAPHS[part], "gemma4_export.preset": preset,
                                 "gemma4_export.source": reference.dir.name})
    name = encoder_file(part, file_preset)
    return _publish(model, onnx_dir, name, quantize=preset == "int8")


def _register_orphan_constants(graph) -> None:
    """onnxscript's optimizer (0.7) folds each clamp into a Clip whose bounds it names '<input>_min'/'_max'; when one
    tensor is clamped several times (q/k/v projections of the same input), the second bounds take the same name and
    are not registered as initializers, and the written graph references names it does not define. Constants that
    feed a node but belong to no graph are registered here under unique names."""
    names = set(graph.initializers) | {v.name for v in graph.inputs}
    names |= {o.name for node in graph for o in node.outputs}
    for node in graph:
        for v in node.inputs:
            if v is None or v.producer() is not None or v.is_graph_input() or v.is_initializer():
                continue
            if v.const_value is None:
                raise ONNXExportError(f"the exported graph's node {node.name} reads {v.name}, which nothing defines")
            base = v.name or "constant"
            name, i = base, 1
            while name in names:
                name, i = f"{base}_{i}", i + 1
            v.name = name
            names.add(name)
            graph.register_initializer(v)


def _name_output(model, tokens: str) -> None:
    import onnx_ir as ir

    out = model.graph.outputs[0]
    if out.shape is not None and len(out.shape) == 2:
        out.shape = ir.Shape([tokens, out.shape[1]])


def _publish(model, onnx_dir: Path, name: str, quantize: bool) -> Path:
    """Write the model (and its data) in a staging directory beside the final files, check it, then rename."""
    import onnx_ir as ir

    from .onnx import _check_model

    final = onnx_dir / name
    clear_stale(final)
    staging = onnx_dir / f".{name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        path = staging / name
        if quantize:
            plain = staging / f"plain-{name}"
            ir.save(model, plain, external_data=plain.name + "_data", size_threshold_bytes=1024)
            _quantize_int8(plain, path)
        else:
            ir.save(model, path, external_data=name + "_data", size_threshold_bytes=1024)
        _check_model(path)
        data = staging / (name + "_data")
        final_data = onnx_dir / (name + "_data")
        if data.is_file():
            os.replace(data, final_data)
        elif final_data.exists():
            final_data.unlink()  # an older export's data, which the new graph does not read
        os.replace(path, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _quantize_int8(src: Path, dst: Path) -> None:
    """The MatMul weights as symmetric 8-bit blocks of INT8_BLOCK (MatMulNBits) by onnxruntime's own weight-only
    quantizer, run at accuracy level 4 (each row's activations quantized to int8 per block of 32, as llama.cpp's
    q8_0 products quantize theirs), written with its weights in {dst}_data.

    Measured on a real-width E2B's towers (untrained, 2 cores; image cosine min / relative error, audio the same,
    seconds per run of the 2-second clip): onnxruntime's dynamic quantizer (int8 weights per channel, activations
    with one range per tensor and run, what these encoders were before) 0.99941 / 0.032, 0.99795 / 0.057 (past the
    8-bit limits), 0.12 s, and padding moved the valid rows; these blocks at level 4: 0.99983 / 0.018, 0.99898 /
    0.039, 0.08 s; at the default level (float activations) 0.99985 / 0.017, 0.99940 / 0.030, but 1.0 s: onnxruntime
    dequantizes every 8-bit matrix on each run there."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    # only products with a weight matrix: a constant of another rank (the audio attention's relative position keys,
    # folded to [heads, head_dim, positions]) is not a [K, N] weight
    matrices = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in matrices]
    logging.disable(logging.WARNING)
    try:
        cfg = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, bits=8, accuracy_level=4)
        q = MatMulNBitsQuantizer(model, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=exclude, algo_config=cfg)
        q.process()
    except Exception as e:
        raise ONNXExportError(f"onnxruntime could not quantize {src.name}: {type(e).__name__}: {e}") from e
    finally:
        logging.disable(logging.NOTSET)
    onnx.save_model(q.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + "_data", size_threshold=1024)
    data = dst.with_name(dst.name + "_data")
    if data.is_file():
        shutil.copymode(dst, data)  # onnx writes the data file owner-only


# ---------------------------------------------------------------------------------------------------------------
# Running and comparing


class EncoderRunner:
    """The encoders of one preset in onnxruntime (CPU): features as [tokens, text hidden] float32 arrays."""

    def __init__(self, onnx_dir: str | Path, suffix: str = "", threads: int | None = None):
        self.dir = Path(onnx_dir)
        self.suffix = suffix
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def path(self, part: str) -> Path:
        return self.dir / f"{GRAPHS[part]}{self.suffix}.onnx"

    def has(self, part: str) -> bool:
        return self.path(part).is_file()

    def session(self, part: str):
        if part not in self._sessions:
            import onnxruntime as ort

            p = self.path(part)
            if not p.is_file():
                raise Gemma4ExportError(f"{p}: no such encoder")
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if self.threads:
                so.intra_op_num_threads = self.threads
            self._sessions[part] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        return self._sessions[part]

    def image_features(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        (a, b), out = IO[VISION]
        feed = {a: np.ascontiguousarray(pixel_values, np.float32), b: np.ascontiguousarray(position_ids, np.int64)}
        return np.asarray(self.session(VISION).run([out], feed)[0], np.float32)

    def audio_features(self, input_features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (a, b), out = IO[AUDIO]
        feed = {a: np.ascontiguousarray(input_features, np.float32), b: np.ascontiguousarray(mask, bool)}
        return np.asarray(self.session(AUDIO).run([out], feed)[0], np.float32)


def pad_patches(pixel_values: np.ndarray, position_ids: np.ndarray, max_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """An image's patches padded as Gemma4ImageProcessor pads them: zero pixels at position (-1, -1)."""
    b, n, d = pixel_values.shape
    if n > max_patches:
        raise Gemma4ExportError(f"{n} patches do not fit in {max_patches}")
    pv = np.zeros((b, max_patches, d), np.float32)
    pos = np.full((b, max_patches, 2), -1, np.int64)
    pv[:, :n], pos[:, :n] = pixel_values, position_ids
    return pv, pos


def feature_metrics(art: np.ndarray, ref: np.ndarray) -> dict:
    """Agreement of an encoder's features with the reference's, row by row: cosine similarity (mean and minimum over
    the tokens) and the relative error ||art - ref|| / ||ref|| over all of them. Shapes must match."""
    art, ref = np.asarray(art, np.float64), np.asarray(ref, np.float64)
    if art.shape != ref.shape:
        raise Gemma4ExportError(f"feature shapes differ: {art.shape} (artifact) vs {ref.shape} (reference)")
    if art.size == 0:
        raise Gemma4ExportError("no features to compare")
    na, nr = np.linalg.norm(art, axis=-1), np.linalg.norm(ref, axis=-1)
    den = na * nr
    # a zero row: cosine 1 against another zero row, 0 against anything else
    cos = np.where(den > 0, (art * ref).sum(-1) / np.where(den > 0, den, 1.0), ((na == 0) & (nr == 0)) * 1.0)
    rel = float(np.linalg.norm(art - ref) / max(np.linalg.norm(ref), 1e-30))
    finite = bool(np.isfinite(art).all())
    return {"tokens": int(art.shape[0]), "cos_mean": float(cos.mean()) if finite else float("nan"),
            "cos_min": float(cos.min()) if finite else float("nan"), "rel_err": rel if finite else float("inf")}


class EncoderTowerRunner:
    """An ONNX directory's encoders and text graphs in onnxruntime, as transformers.js runs them, for
    validate.towers.tower_checks: the encoders' embeddings, and greedy generations with those embeddings written
    over the placeholder rows of embed_tokens' output."""

    name = "onnxruntime encoders"

    def __init__(self, decoder_path: Path, src_dir: Path, preset: str, device: str = "cpu"):
        from ..validate.onnxrt import ONNXRunner, _directory

        d = _directory(decoder_path)
        self.text = ONNXRunner(decoder_path, device)
        self.enc = EncoderRunner(d / ONNX_DIR, suffix(preset))
        self.src_dir = Path(src_dir)
        self.cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        self.vision, self.audio = self.enc.has(VISION), self.enc.has(AUDIO)
        self.limits = "q8_0" if ENCODER_PRESET.get(preset) == "int8" else "float"
        self.patch = int((self.cfg.get("vision_config") or {}).get("patch_size", 16))

    def embeddings(self, media: np.ndarray) -> np.ndarray:
        from ..validate.towers import audio_features, image_patches

        if media.ndim == 3:
            return self.enc.image_features(*image_patches(media, self.patch))
        return self.enc.audio_features(*audio_features(media, self.src_dir))

    def media_prompt(self, kind: str, media: np.ndarray) -> list[int]:
        from ..validate.towers import media_prompt_ids

        return media_prompt_ids(self.text.tokenize, self.cfg, kind, self.embeddings(media).shape[0])

    def media_greedy(self, kind: str, media: np.ndarray, n: int) -> list[int]:
        from ..validate.towers import media_prompt_ids

        feats = self.embeddings(media)  # the encoder runs once; the prompt's placeholders are its rows
        ids = media_prompt_ids(self.text.tokenize, self.cfg, kind, feats.shape[0])
        token = self.cfg["image_token_id" if kind == "image" else "audio_token_id"]
        at = np.array([ids]) == token
        logits, cache = self.text.run(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None],
                                      self.text.empty_cache(), keep=1, media=(at, feats))
        out, total = [], len(ids)
        while True:
            out.append(int(np.argmax(logits[0, -1])))
            if len(out) == n:
                return out
            logits, cache = self.text.run(np.array([[out[-1]]]), np.ones((1, total + 1)), np.array([[total]]),
                                          cache, keep=1)
            total += 1

    def close(self) -> None:
        self.enc = None
