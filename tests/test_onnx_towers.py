"""The towers' ONNX encoders: exported from the tiny checkpoints, run in onnxruntime, compared with transformers' own
towers (validate/towers.TowerReference) in float32 on the same image and audio inputs, unpadded and padded as
transformers.js pads them; their files, inputs and outputs as transformers.js reads them; and the errors."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from gemma4_export.errors import Gemma4ExportError  # noqa: E402
from gemma4_export.exporter.variants import TINY_DIR  # noqa: E402
from gemma4_export.targets import onnx_towers as ot  # noqa: E402
from gemma4_export.validate import towers as tw  # noqa: E402

# transformers.js pads every image to max_soft_tokens * k^2 patches: 280 * 3^2
MAX_PATCHES = 2520
# (minimum cosine over the tokens, maximum relative error), against the float32 reference. Measured on tiny-e2b /
# tiny-31b: fp32 cos 1 - 2e-14, rel 1.8e-7 (vision), 5.0e-7 (audio); fp16 cos_min 0.99999999 / 0.999999, rel 1.0e-4
# (vision) / 6.6e-4 (audio); int8 (8-bit weight blocks, activations in int8 blocks per row) cos_min 0.99998 / 0.99965,
# rel 0.0063 / 0.020.
LIMITS = {"fp32": (0.9999, 1e-3), "fp16": (0.9999, 5e-3), "int8": (0.998, 0.06)}
# the valid rows' relative change when padding is added: none (int8 quantizes each row's activations on its own;
# measured 0.0)
PADDING = {"fp32": 1e-5, "fp16": 1e-5, "int8": 1e-5}
# an image 7 x 10 soft tokens: 70 rows; a 2-second clip: 50 rows
IMAGE_TOKENS, AUDIO_TOKENS = 70, 50


def ckpt(name):
    return TINY_DIR / name


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tw.TowerReference(ckpt(name))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, preset) -> (onnx directory, {part: path}, {part: seconds}), each exported once for the module."""
    cache = {}

    def get(name, preset="fp32"):
        if (name, preset) not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{preset}")
            r = ot.export_encoders_timed(ckpt(name), d, preset)
            cache[name, preset] = (d, r.paths, r.seconds)
        return cache[name, preset]
    return get


def image_inputs(ref, seed=0, tokens=tw.DEFAULT_IMAGE_TOKENS):
    vc = ref.config.vision_config
    image = tw.test_image(*tw.image_size_for(vc.to_dict(), tokens), seed=seed)
    return tw.image_patches(image, vc.patch_size)


def assert_close(art, ref, preset, what):
    m = ot.feature_metrics(art, ref)
    cos, rel = LIMITS[preset]
    assert m["cos_min"] >= cos and m["rel_err"] <= rel, f"{what} ({preset}): {m}"
    return m


def check_image(runner, ref, preset):
    pv, pos = image_inputs(ref)
    want = ref.image_features(pv, pos)
    assert want.shape == (IMAGE_TOKENS, ref.config.text_config.hidden_size)
    got = runner.image_features(pv, pos)
    assert got.shape == want.shape
    assert_close(got, want, preset, "image")
    padded = runner.image_features(*ot.pad_patches(pv, pos, MAX_PATCHES))
    assert padded.shape == want.shape  # the padded soft tokens are dropped: exactly the placeholder count
    assert_close(padded, want, preset, "padded image")
    assert ot.feature_metrics(padded, got)["rel_err"] <= PADDING[preset]  # padding changes nothing


def check_audio(runner, ref, preset):
    feats, mask = tw.audio_features(tw.test_audio(2.0), ref.dir)
    want = ref.audio_features(feats, mask)
    assert want.shape == (AUDIO_TOKENS, ref.config.text_config.hidden_size)
    got = runner.audio_features(feats, mask)
    assert got.shape == want.shape
    assert_close(got, want, preset, "audio")
    # frames past the clip, masked out, as a batch's shorter clips are padded: the same rows
    extra = 37
    pf = np.concatenate([feats, np.zeros((1, extra, feats.shape[2]), np.float32)], 1)
    pm = np.concatenate([mask, np.zeros((1, extra), bool)], 1)
    padded = runner.audio_features(pf, pm)
    assert padded.shape == want.shape
    assert ot.feature_metrics(padded, got)["rel_err"] <= PADDING[preset]


# ---------------------------------------------------------------------------------------------------------------
# float32: the reference's numbers


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-31b"])
def test_image_features_match_transformers(name, refs, exported):
    d, paths, _ = exported(name)
    check_image(ot.EncoderRunner(d, ""), refs(name), "fp32")


def test_audio_features_match_transformers(refs, exported):
    d, paths, _ = exported("tiny-e2b")
    check_audio(ot.EncoderRunner(d, ""), refs("tiny-e2b"), "fp32")


@pytest.mark.parametrize("seconds", [0.37, 1.3, 3.7])
def test_audio_any_length(seconds, refs, exported):
    """Odd and even frame counts, chunk boundaries: the frame axis is dynamic and the row count follows the mask."""
    d, _, _ = exported("tiny-e2b")
    ref = refs("tiny-e2b")
    feats, mask = tw.audio_features(tw.test_audio(seconds, seed=3), ref.dir)
    want = ref.audio_features(feats, mask)
    got = ot.EncoderRunner(d).audio_features(feats, mask)
    assert got.shape == want.shape
    assert_close(got, want, "fp32", f"{seconds}s audio")


def test_files_as_transformers_js_reads_them(exported):
    import onnx

    d, paths, seconds = exported("tiny-e2b")
    assert {p: q.name for p, q in paths.items()} == {"vision": "vision_encoder.onnx", "audio": "audio_encoder.onnx"}
    assert set(seconds) == {"vision", "audio"}
    # nothing else is left in the directory (no staging directory, no stray data)
    assert sorted(os.listdir(d)) == sorted([f for p in paths.values() for f in (p.name, p.name + "_data")])
    assert ot.data_files(paths) == {"vision_encoder.onnx": 1, "audio_encoder.onnx": 1}
    hidden = json.loads((ckpt("tiny-e2b") / "config.json").read_text())["text_config"]["hidden_size"]
    F, I64, B = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
    want = {"vision": ({"pixel_values": (F, 3), "pixel_position_ids": (I64, 3)}, "image_features"),
            "audio": ({"input_features": (F, 3), "input_features_mask": (B, 2)}, "audio_features")}
    for part, path in paths.items():
        m = onnx.load(str(path), load_external_data=False)
        assert any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in m.opset_import)
        ins = {i.name: (i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim)) for i in m.graph.input}
        assert ins == want[part][0]
        for i in m.graph.input:  # batch and patches / frames are dynamic
            assert [x.dim_param for x in i.type.tensor_type.shape.dim[:2]] == ["batch_size", i.name.startswith(
                "pixel") and "num_patches" or "num_frames"]
        (out,) = m.graph.output
        assert out.name == want[part][1] and out.type.tensor_type.elem_type == F
        dims = out.type.tensor_type.shape.dim
        assert len(dims) == 2 and dims[0].dim_param and dims[1].dim_value == hidden
        # the weights are in the data file beside the graph
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def test_wrong_positions_are_caught(refs, exported):
    """Negative control: the comparison sees a mistake in the patch positions (shifted by one column)."""
    d, _, _ = exported("tiny-e2b")
    ref = refs("tiny-e2b")
    pv, pos = image_inputs(ref)
    shifted = pos.copy()
    shifted[..., 0] += 1
    m = ot.feature_metrics(ot.EncoderRunner(d).image_features(pv, shifted), ref.image_features(pv, pos))
    cos, rel = LIMITS["fp32"]
    assert not (m["cos_min"] >= cos and m["rel_err"] <= rel), m


def test_feature_metrics():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 8))
    m = ot.feature_metrics(a, a)
    assert m["tokens"] == 5 and m["rel_err"] == 0 and m["cos_min"] == pytest.approx(1)
    b = a.copy()
    b[2] = -b[2]
    m = ot.feature_metrics(b, a)
    assert m["cos_min"] == pytest.approx(-1) and m["cos_mean"] == pytest.approx(0.6)
    assert m["rel_err"] == pytest.approx(2 * np.linalg.norm(a[2]) / np.linalg.norm(a))
    nan = a.copy()
    nan[0, 0] = np.nan
    assert ot.feature_metrics(nan, a)["rel_err"] == float("inf")
    with pytest.raises(Gemma4ExportError, match="shapes differ"):
        ot.feature_metrics(a[:4], a)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _config_only(tmp_path, cfg):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_no_towers_is_a_clear_error(tmp_path):
    cfg = json.loads((ckpt("tiny-e2b") / "config.json").read_text())
    cfg["vision_config"] = cfg["audio_config"] = None
    d = _config_only(tmp_path, cfg)
    with pytest.raises(Gemma4ExportError, match="no vision or audio tower"):
        ot.export_encoders(d, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_text_only_checkpoint_is_a_clear_error(tmp_path):
    text = json.loads((ckpt("tiny-e2b") / "config.json").read_text())["text_config"]
    d = _config_only(tmp_path, {**text, "architectures": ["Gemma4ForCausalLM"]})
    with pytest.raises(Gemma4ExportError, match="no vision or audio tower"):
        ot.export_encoders(d, tmp_path / "onnx")


def test_other_errors(tmp_path):
    with pytest.raises(Gemma4ExportError, match="Gemma4UnifiedForConditionalGeneration"):
        ot.export_encoders(ckpt("tiny-12b"), tmp_path)
    with pytest.raises(Gemma4ExportError, match="no audio tower"):
        ot.export_encoders(ckpt("tiny-31b"), tmp_path, parts=("audio",))
    with pytest.raises(Gemma4ExportError, match="no preset 'int4'"):
        ot.export_encoders(ckpt("tiny-e2b"), tmp_path, "int4")
    with pytest.raises(Gemma4ExportError, match="no such encoder"):
        ot.EncoderRunner(tmp_path, "_fp16").image_features(np.zeros((1, 18, 768), np.float32),
                                                           np.zeros((1, 18, 2), np.int64))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_failed_export_leaves_the_old_files(tmp_path, monkeypatch):
    from gemma4_export.targets import onnx as onnx_target

    paths = ot.export_encoders(ckpt("tiny-31b"), tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def broken(path):
        raise onnx_target.ONNXExportError("checker says no")
    monkeypatch.setattr(onnx_target, "_check_model", broken)
    with pytest.raises(Gemma4ExportError, match="checker says no"):
        ot.export_encoders(ckpt("tiny-31b"), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert set(before) == {paths["vision"].name, paths["vision"].name + "_data"}


# ---------------------------------------------------------------------------------------------------------------
# fp16, int8, batches, clipping and standardization


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp16", "int8"])
def test_reduced_precision(preset, refs, exported):
    d, paths, _ = exported("tiny-e2b", preset)
    sfx = {"fp16": "_fp16", "int8": "_quantized"}[preset]
    assert {q.name for q in paths.values()} == {f"vision_encoder{sfx}.onnx", f"audio_encoder{sfx}.onnx"}
    runner = ot.EncoderRunner(d, sfx)
    check_image(runner, refs("tiny-e2b"), preset)
    check_audio(runner, refs("tiny-e2b"), preset)


@pytest.mark.slow
def test_fp16_computes_in_half(exported):
    """The fp16 graphs hold float16 weights and run their projections in float16; their inputs and outputs stay
    float32."""
    import onnx

    d, paths, _ = exported("tiny-e2b", "fp16")
    for path in paths.values():
        m = onnx.load(str(path))
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
        kinds = {t.data_type for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in floats}
        assert kinds == {onnx.TensorProto.FLOAT16}, (path.name, kinds)
        assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.slow
def test_batches(refs, exported):
    """Two images of different sizes in one batch, both padded: the rows of each, one after the other; two clips of
    different lengths: likewise."""
    d, _, _ = exported("tiny-e2b")
    ref = refs("tiny-e2b")
    runner = ot.EncoderRunner(d)
    a, b = image_inputs(ref, 0), image_inputs(ref, 1, (4, 6))
    pa, pb = ot.pad_patches(*a, MAX_PATCHES), ot.pad_patches(*b, MAX_PATCHES)
    got = runner.image_features(np.concatenate([pa[0], pb[0]]), np.concatenate([pa[1], pb[1]]))
    want = np.concatenate([ref.image_features(*a), ref.image_features(*b)])
    assert got.shape == (IMAGE_TOKENS + 24, want.shape[1])
    assert_close(got, want, "fp32", "batch of images")
    fa, ma = tw.audio_features(tw.test_audio(2.0), ref.dir)
    fb, mb = tw.audio_features(tw.test_audio(1.1, seed=2), ref.dir)
    n = fa.shape[1]
    fb2 = np.zeros_like(fa)
    fb2[:, :fb.shape[1]] = fb
    mb2 = np.zeros_like(ma)
    mb2[:, :fb.shape[1]] = mb
    got = runner.audio_features(np.concatenate([fa, fb2]), np.concatenate([ma, mb2]))
    want = np.concatenate([ref.audio_features(fa, ma), ref.audio_features(fb, mb)])
    assert got.shape == want.shape and n > fb.shape[1]
    assert_close(got, want, "fp32", "batch of clips")


@pytest.mark.slow
def test_clipping_and_standardization(tmp_path):
    """A tower whose clipped linears clip (finite bounds, set from the activations' range) and whose vision features
    are standardized (the tiny checkpoints have neither): the encoders still match transformers' towers."""
    import torch

    ref = tw.TowerReference(ckpt("tiny-e2b"))
    pv, pos = image_inputs(ref)
    feats, mask = tw.audio_features(tw.test_audio(2.0), ref.dir)
    plain = ref.image_features(pv, pos), ref.audio_features(feats, mask)
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    clipped = [mod for tower in (ref.model.vision_tower, ref.model.audio_tower) for mod in tower.modules()
               if isinstance(mod, Gemma4ClippableLinear)]
    assert clipped
    ranges, hooks = {}, []
    for mod in clipped:
        def hook(mod, args, out):
            ranges[mod] = (float(args[0].abs().max()), float(out.abs().max()))
        hooks.append(mod.register_forward_hook(hook))
    ref.image_features(pv, pos)
    ref.audio_features(feats, mask)
    for h in hooks:
        h.remove()
    for mod in clipped:
        i, o = ranges[mod]
        mod.input_min.fill_(-0.6 * i)
        mod.input_max.fill_(0.7 * i)
        mod.output_min.fill_(-0.8 * o)
        mod.output_max.fill_(0.5 * o)
    vt = ref.model.vision_tower
    g = torch.Generator().manual_seed(0)
    hidden = vt.config.hidden_size
    vt.config.standardize = True
    vt.std_bias = torch.nn.Buffer(0.5 * torch.randn(hidden, generator=g))
    vt.std_scale = torch.nn.Buffer(0.5 + torch.rand(hidden, generator=g))
    want_image, want_audio = ref.image_features(pv, pos), ref.audio_features(feats, mask)
    # the changes matter to the reference
    assert ot.feature_metrics(want_image, plain[0])["rel_err"] > 0.05
    assert ot.feature_metrics(want_audio, plain[1])["rel_err"] > 0.05
    ot.export_encoders(ckpt("tiny-e2b"), tmp_path, reference=ref)
    runner = ot.EncoderRunner(tmp_path)
    assert_close(runner.image_features(*ot.pad_patches(pv, pos, MAX_PATCHES)), want_image, "fp32", "image")
    assert_close(runner.audio_features(feats, mask), want_audio, "fp32", "audio")


def test_export_writes_the_encoders(tmp_path):
    """`gemma4-export onnx` writes the encoders by default, named with the text preset's suffix (one transformers.js
    dtype loads every session), declared in config.json and inference_config.json; --text-only writes none."""
    from gemma4_export import api
    from gemma4_export.validate.onnxrt import read_config

    r = api.export("onnx", "tiny-31b", "int4", out=tmp_path, calibrate=False)
    onnx_dir = r.path / "onnx"
    assert (onnx_dir / "vision_encoder_q4.onnx").is_file() and not (onnx_dir / "audio_encoder_q4.onnx").exists()
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["vision_config"] and "audio_config" not in cfg or cfg["audio_config"] is None
    assert cfg["transformers.js_config"]["use_external_data_format"]["vision_encoder_q4.onnx"] == 1
    inf = read_config(r.path / "onnx" / "decoder_model_merged_q4.onnx")
    assert inf["encoders"]["vision"] == {"file": "onnx/vision_encoder_q4.onnx", "preset": "int8"}
    types = {e.name: e.type for e in r.tower_plan.kept}
    assert r.tower_plan.preset == "encoders-int8"
    assert types["model.embed_vision.embedding_projection.weight"] == "INT8"
    assert types["model.vision_tower.encoder.layers.0.input_layernorm.weight"] == "FP32"
    t = api.export("onnx", "tiny-31b", "fp32", out=tmp_path, calibrate=False, towers=False)
    assert not list((t.path / "onnx").glob("vision_encoder*")) and "vision_config" not in json.loads(
        (t.path / "config.json").read_text())


def test_audio_layers_take_one_length_symbol(tmp_path):
    """Traced by the encoder export, every conformer layer of the audio encoder takes its input at the same symbolic
    length (the subsampled frames). A layer's blocked attention returns min(frames, 12 * blocks); left so, each layer
    nests that expression once more and the export's shape reasoning grows exponentially with the layers (E2B's
    12-layer audio tower did not export in 20 minutes; tiny towers took 28 s at 2 layers, 337 s at 6)."""
    from gemma4_export.validate.towers import TowerReference

    ref = TowerReference(TINY_DIR / "tiny-e2b")
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args, kw: lengths.append(str(args[0].shape[1])),
                                             with_kwargs=True)
             for layer in ref.model.audio_tower.layers]
    try:
        ot.export_encoders(TINY_DIR / "tiny-e2b", tmp_path, "fp32", parts=(ot.AUDIO,), reference=ref)
    finally:
        for h in hooks:
            h.remove()
    traced = [x for x in lengths if not x.isdigit()]  # the export's symbolic trace (not its concrete checks)
    assert len(traced) >= len(ref.model.audio_tower.layers) >= 2, lengths
    assert len(set(traced)) == 1 and "Min" not in traced[0], traced
