"""onnxruntime-genai (PyPI, run for real) with the multimodal `gemma4` genai_config that targets/onnx_genai.py writes
over an ONNX directory with encoders (tiny-e2b, fp32): genai's four-session pipeline (vision, speech, embedding,
decoder) over our encoders and the two wrapper graphs generates greedily
- from a text prompt, the tokens of the gemma4_text config (the single graph) and of our onnxruntime runner;
- from an image / audio prompt fed as tensors (our patches and log-mel, Generator.set_inputs), the tokens of our
  onnxruntime tower runner (EncoderTowerRunner.media_greedy); without the features the tokens differ;
- through genai's own MultiModalProcessor (onnxruntime-extensions: a PNG and a WAV file, the prompt's <|image|> /
  <|audio|> expanded by genai), the tokens of our runner fed the same preprocessed tensors and ids;
- genai's image resizing against transformers' Gemma4ImageProcessor on the same PNG: the same grid, features within
  the float towers' limits.
"""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

from conftest import genai_greedy  # noqa: E402
from gemma4_export import api  # noqa: E402
from gemma4_export.targets.onnx_genai import (  # noqa: E402
    AUDIO_PROCESSOR,
    GENAI_DECODER,
    GENAI_EMBED,
    IMAGE_PROCESSOR,
    genai_files,
    write_genai_config,
)
from gemma4_export.targets.onnx_towers import EncoderTowerRunner  # noqa: E402
from gemma4_export.validate.onnxrt import ONNXRunner  # noqa: E402
from gemma4_export.validate import towers as vt  # noqa: E402  (as a module: its test_image is not a test)
from gemma4_export.validate.towers import MEDIA_PROMPT, audio_features, image_patches, image_size_for  # noqa: E402
from gemma4_export.validate.towers import media_prompt_ids  # noqa: E402

N = 12  # new tokens


def _checkpoint(variant: str):
    from pathlib import Path

    import gemma4_export

    return Path(gemma4_export.__file__).parent / "tiny" / "checkpoints" / variant


def _tensors(**arrays):
    t = og.NamedTensors()
    for k, v in arrays.items():
        t[k] = v
    return t


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """tiny-e2b's fp32 ONNX directory with its encoders, as exported (genai_config gemma4), and the text prompt's
    genai tokens under the gemma4_text config over the single graph (written in for the comparison, then the
    exported config put back)."""
    from gemma4_export.targets.onnx import CONFIG_FILE, genai_config

    work = tmp_path_factory.mktemp("genai")
    path = api.export("onnx", "tiny-e2b", "fp32", out=work, force=True).path
    exported = (path / "genai_config.json").read_text()
    assert json.loads(exported)["model"]["type"] == "gemma4"
    runner = ONNXRunner(path)
    ids = runner.tokenize("<bos>The quick brown fox jumps over the lazy dog. " * 8)[:90]
    inference = json.loads((path / CONFIG_FILE).read_text())["presets"]["fp32"]
    (path / "genai_config.json").write_text(json.dumps(genai_config(inference, "fp32")))
    text_tokens = genai_greedy(og.Model(str(path)), 40, ids=ids)
    (path / "genai_config.json").write_text(exported)
    return {"path": path, "ids": ids, "text_tokens": text_tokens, "runner": runner,
            "model": og.Model(str(path)), "cfg": json.loads((path / "config.json").read_text())}


def test_config_and_wrapper_graphs(art):
    import onnx

    path = art["path"]
    m = json.loads((path / "genai_config.json").read_text())["model"]
    assert m["type"] == "gemma4"
    assert {"decoder", "embedding", "vision", "speech"} <= set(m)
    assert m["embedding"]["inputs"] == {"input_ids": "input_ids", "image_features": "image_features",
                                        "audio_features": "audio_features"}
    assert (path / IMAGE_PROCESSOR).is_file() and (path / AUDIO_PROCESSOR).is_file()
    files = genai_files("fp32")
    emb = onnx.load(str(path / files[GENAI_EMBED]), load_external_data=False)
    dec = onnx.load(str(path / files[GENAI_DECODER]), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(emb.graph.output) + list(dec.graph.input)}
    text = art["cfg"]["text_config"]
    layers, ple = text["num_hidden_layers"], text["hidden_size_per_layer_input"]
    assert dims["per_layer_inputs"][-1] == layers * ple  # the rank-3 buffer genai allocates
    assert "num_logits_to_keep" not in {i.name for i in dec.graph.input}
    # the wrappers read the graphs' own data files: no weight of their own beyond a few shape constants
    for g in (emb, dec):
        inline = sum(len(t.raw_data) for t in g.graph.initializer if not t.external_data)
        assert inline < 1 << 20, inline
        assert {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"} <= \
            {"embed_tokens.onnx_data", "decoder_model_merged.onnx_data"}


def test_text_prompt_same_tokens(art):
    """gemma4 (embedding -> decoder sessions) = gemma4_text (the single graph) = our runner, past the sliding window."""
    got = genai_greedy(art["model"], 40, ids=art["ids"])
    assert got == art["text_tokens"]
    assert got == art["runner"].greedy(art["ids"], 40)


@pytest.fixture(scope="module")
def towers(art):
    return EncoderTowerRunner(art["path"], _checkpoint("tiny-e2b"), "fp32")


def _image_prompt(model, towers, cfg) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, genai's tokens, our tower runner's tokens) for the code-made image fed to genai as tensors."""
    img = vt.test_image(*image_size_for(cfg["vision_config"]))
    pv, pos = image_patches(img, towers.patch)
    n = towers.embeddings(img).shape[0]
    ids = media_prompt_ids(towers.text.tokenize, cfg, "image", n)
    got = genai_greedy(model, N, inputs=_tensors(input_ids=np.array([ids], np.int32), pixel_values=pv,
                                              pixel_position_ids=pos, num_image_tokens=np.array([n], np.int64)))
    return ids, got, towers.media_greedy("image", img, N)


def test_image_tensors_same_tokens(art, towers):
    ids, got, want = _image_prompt(art["model"], towers, art["cfg"])
    assert got == want
    assert genai_greedy(art["model"], N, ids=ids) != want  # the features reach the decoder


def test_audio_tensors_same_tokens(art, towers):
    wav = vt.test_audio()
    f, mask = audio_features(wav, _checkpoint("tiny-e2b"))
    feats = towers.embeddings(wav)
    ids = media_prompt_ids(towers.text.tokenize, art["cfg"], "audio", feats.shape[0])
    want = towers.media_greedy("audio", wav, N)
    got = genai_greedy(art["model"], N, inputs=_tensors(
        input_ids=np.array([ids], np.int32), input_features=f, input_features_mask=mask,
        audio_sizes=np.array([feats.shape[0]], np.int64)))
    assert got == want
    assert genai_greedy(art["model"], N, ids=ids) != want


def _ours(towers, ids, feats, token: int, n: int) -> list[int]:
    """Our onnxruntime text graphs, `feats` over the `token` placeholders of `ids`, greedy."""
    at = np.array([ids]) == token
    logits, cache = towers.text.run(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None],
                                    towers.text.empty_cache(), keep=1, media=(at, feats))
    out, total = [], len(ids)
    while True:
        out.append(int(np.argmax(logits[0, -1])))
        if len(out) == n:
            return out
        logits, cache = towers.text.run(np.array([[out[-1]]]), np.ones((1, total + 1)), np.array([[total]]),
                                        cache, keep=1)
        total += 1


@pytest.fixture(scope="module")
def processor(art):
    return art["model"].create_multimodal_processor() if hasattr(art["model"], "create_multimodal_processor") \
        else og.MultiModalProcessor(art["model"])


def test_processor_image(art, towers, processor, tmp_path):
    from PIL import Image

    img = vt.test_image(*image_size_for(art["cfg"]["vision_config"]))
    Image.fromarray(img).save(tmp_path / "image.png")
    t = processor(MEDIA_PROMPT.format(media="<|image|>"), images=og.Images.open(str(tmp_path / "image.png")))
    ids = t["input_ids"].as_numpy()[0].tolist()
    feats = towers.enc.image_features(t["pixel_values"].as_numpy(), t["pixel_position_ids"].as_numpy())
    assert ids.count(art["cfg"]["image_token_id"]) == feats.shape[0] == int(t["num_image_tokens"].as_numpy().sum())
    assert genai_greedy(art["model"], N, inputs=t) == _ours(towers, ids, feats, art["cfg"]["image_token_id"], N)


@pytest.mark.parametrize("size", [(375, 500), (97, 611), (1000, 1500), (224, 224)])
def test_processor_resizes_as_transformers(art, processor, tmp_path, size):
    """genai's image processor and transformers' Gemma4ImageProcessor, given the same PNG of a size neither keeps,
    resize it to the same patch grid within the 280-token budget (same positions, same number of soft tokens); the
    pixels differ by their bicubic implementations (measured: at most 0.06 of the [0, 1] range, 0.0003-0.0009 on
    average), which moves the tower's features by a relative 0.05-0.19% (cosine min >= 0.99989), within the float
    towers' limits."""
    import transformers
    from PIL import Image

    img = vt.test_image(*size, seed=3)
    Image.fromarray(img).save(tmp_path / "image.png")
    t = processor(MEDIA_PROMPT.format(media="<|image|>"), images=og.Images.open(str(tmp_path / "image.png")))
    gpv, gpos = t["pixel_values"].as_numpy(), t["pixel_position_ids"].as_numpy()
    hf = transformers.AutoImageProcessor.from_pretrained(_checkpoint("tiny-e2b"))
    r = hf(images=[Image.open(tmp_path / "image.png")], return_tensors="np")
    tpv, tpos = r["pixel_values"], r["image_position_ids"]
    gv, tv = gpos[0][:, 0] >= 0, tpos[0][:, 0] >= 0  # each pads to its own length with position -1
    assert np.array_equal(gpos[0][gv], tpos[0][tv])
    assert gv.sum() // 9 == t["input_ids"].as_numpy()[0].tolist().count(art["cfg"]["image_token_id"]) <= 280
    diff = np.abs(gpv[0][gv] - tpv[0][tv])
    assert diff.max() < 0.1 and diff.mean() < 2e-3
    ref = vt.TowerReference(_checkpoint("tiny-e2b"))
    got = vt.compare_features(ref.image_features(gpv, gpos), ref.image_features(tpv, tpos))
    cos, rel = vt.TOWER_LIMITS["float"]
    assert got["cos_min"] >= cos and got["rel_error"] <= rel, got


def test_processor_audio(art, towers, processor, tmp_path):
    wav = vt.test_audio()
    with wave.open(str(tmp_path / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(wav, -1, 1) * 32767).round().astype("<i2").tobytes())
    t = processor(MEDIA_PROMPT.format(media="<|audio|>"), audios=og.Audios.open(str(tmp_path / "audio.wav")))
    mel = t["audio_embeds"].as_numpy()
    ref, _ = audio_features(wav, _checkpoint("tiny-e2b"))
    # Gemma4LogMel of the 16-bit file against transformers' extractor on the float wave: the quantization moves the
    # quietest bins' logs by up to ~0.03
    assert mel.shape == ref.shape and np.abs(mel - ref).mean() < 1e-3 and np.abs(mel - ref).max() < 0.1
    ids = t["input_ids"].as_numpy()[0].tolist()
    feats = towers.enc.audio_features(mel, t["audio_attention_mask"].as_numpy())
    assert ids.count(art["cfg"]["audio_token_id"]) == feats.shape[0] == int(t["audio_sizes"].as_numpy().sum())
    assert genai_greedy(art["model"], N, inputs=t) == _ours(towers, ids, feats, art["cfg"]["audio_token_id"], N)


def test_text_only_directory_keeps_gemma4_text(tmp_path):
    """Without a vision encoder (genai's gemma4 type always opens one) the config stays gemma4_text."""
    path = api.export("onnx", "tiny-e2b", "fp32", out=tmp_path, force=True, towers=False).path
    before = (path / "genai_config.json").read_text()
    assert write_genai_config(path, "fp32") == "gemma4_text"
    assert (path / "genai_config.json").read_text() == before
    assert not (path / genai_files("fp32")[GENAI_EMBED]).exists()
    shutil.rmtree(path)


def test_vision_only_model(tmp_path):
    """tiny-31b (a vision tower, no audio tower, no per-layer inputs): the export's gemma4 config has no speech
    section, and genai's pipeline generates from an image prompt our onnxruntime tower runner's tokens."""
    path = api.export("onnx", "tiny-31b", "fp32", out=tmp_path, force=True).path
    m = json.loads((path / "genai_config.json").read_text())["model"]
    assert m["type"] == "gemma4" and not m["speech"].get("filename") and not m["speech"]["config_filename"]
    assert "audio_features" not in m["embedding"]["inputs"]
    assert (path / IMAGE_PROCESSOR).is_file() and not (path / AUDIO_PROCESSOR).exists()
    cfg = json.loads((path / "config.json").read_text())
    _, got, want = _image_prompt(og.Model(str(path)), EncoderTowerRunner(path, _checkpoint("tiny-31b"), "fp32"), cfg)
    assert got == want


def test_float16_directory(tmp_path):
    """q4f16 (float16 graphs; the encoders write float32 features in every preset, which the embedding wrapper
    takes as they come): genai's gemma4 pipeline generates our runners' tokens from a text and an image prompt."""
    path = api.export("onnx", "tiny-e2b", "q4f16", out=tmp_path, force=True).path
    model = og.Model(str(path))
    runner = ONNXRunner(path)
    ids = list(range(300, 340))
    assert genai_greedy(model, 16, ids=ids) == runner.greedy(ids, 16)
    cfg = json.loads((path / "config.json").read_text())
    _, got, want = _image_prompt(model, EncoderTowerRunner(path, _checkpoint("tiny-e2b"), "q4f16"), cfg)
    assert got == want
