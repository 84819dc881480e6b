"""The ONNX directory in the apps that load it, unchanged: onnxruntime-genai (PyPI) through its genai_config.json, and
transformers.js in Node (npm @huggingface/transformers, tests/js/generate.mjs) through config.json's
transformers.js_config. Each generates greedily from the fp32 reference's chat prompts:
- fp32: the tokens equal transformers' own greedy tokens (the stored reference's), token for token;
- int4 (q4): they equal our onnxruntime runner's on the same directory (the artifact itself validates against the
  reference within the preset's limits in test_onnx).
- q4f16 (float16 compute): as int4, on tiny-e2b.
- qat (a QAT checkpoint's lattice in 4-bit blocks, which transformers.js loads as dtype q4): as int4, on tiny-e2b-qat.
Where two sequences part, the test accepts it only at a near-tie: the step's top-2 logit margin under 1e-4 (float
rounding between onnxruntime builds; 3e-2 in a float16 graph), as the KV-cache check does; anything else fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import genai_greedy  # noqa: E402
from gemma4_export import api  # noqa: E402
from gemma4_export.exporter.variants import TINY  # noqa: E402
from gemma4_export.validate.onnxrt import ONNXRunner  # noqa: E402

JS = Path(__file__).parent / "js"
# Every architecture's int4 graphs (against our runner on them), and the fp32 graphs of tiny-e2b, the one with every
# input kind (per-layer inputs, KV-shared layers), against transformers' own greedy tokens.
CASES = [pytest.param(v, p, marks=() if (v, p) == ("tiny-e2b", "int4") else pytest.mark.slow)
         for v in TINY for p in ("fp32", "int4") if p == "int4" or v == "tiny-e2b"] + [
    pytest.param("tiny-e2b", "q4f16", marks=pytest.mark.slow),
    pytest.param("tiny-e2b-qat", "qat", marks=pytest.mark.slow)]
DTYPE = {"fp32": "fp32", "int4": "q4", "q4f16": "q4f16", "qat": "q4"}  # transformers.js's names (qat: 4-bit blocks)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the transformers.js check runs in Node 20+ (then "
                    "`npm ci --ignore-scripts --prefix tests/js`)")
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail("tests/js has no node_modules: run `npm ci --ignore-scripts --prefix tests/js` (the README's "
                    "set-up)")
    return node


def transformers_js(path: Path, dtype: str, ids: list[int], n: int) -> list[int]:
    r = subprocess.run([_node(), str(JS / "generate.mjs"), str(path), dtype, json.dumps(ids), str(n)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "G4_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["tokens"]


def genai(path: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    return genai_greedy(og.Model(str(path)), n, ids=ids)


def _until_eos(tokens: list[int], eos) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[: j + 1]
    return tokens


def _agree(got: list[int], want: list[int], margin_at, tie: float) -> tuple[bool, str]:
    """Equal, or parted at a step where the chooser was at a near-tie (then the rest cannot be compared)."""
    first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None:
        return len(got) == len(want), f"lengths {len(got)} / {len(want)}"
    m = margin_at(first)
    return m < tie, f"part at step {first} ({got[first]} against {want[first]}), top-2 margin there {m:.2e}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("consumers")


@pytest.mark.parametrize("variant,preset", CASES)
def test_apps_generate_the_same_tokens(variant, preset, workdir):
    ref = api.reference(variant, windows=1, prompts=2, new_tokens=32)
    art = api.export("onnx", variant, preset, out=workdir / variant, force=True).path
    runner = ONNXRunner(art)
    eos = set(ref.eos_ids)
    for g in ref.generations:
        n = len(g.tokens)
        if preset == "fp32":  # transformers' greedy tokens, with its own margins
            want, margin_at = g.tokens, lambda j, g=g: g.margins[j]
        else:  # our onnxruntime runner on the same directory
            want = _until_eos(runner.greedy(g.ids, n), eos)

            def margin_at(j, want=want, g=g):
                top2 = np.partition(runner.logits(g.ids + want[:j])[-1], -2)[-2:]
                return float(top2[1] - top2[0])
        for app, got in (("onnxruntime-genai", genai(art, g.ids, n)),
                         ("transformers.js", transformers_js(art, DTYPE[preset], g.ids, n))):
            ok, why = _agree(_until_eos(got, eos), want, margin_at, runner.tie)
            assert ok, f"{app} on {variant} {preset}, prompt {g.prompt!r}: {why}"

    # past the sliding window (64 tokens in the tiny models) and through the KV-shared layers: a held-out text's
    # first 90 tokens, 40 new ones, against our runner (whose cache equals generation without one, test_onnx)
    ids, n = ref.windows[0].ids[:90], 40
    assert len(ids) == 90
    want = _until_eos(runner.greedy(ids, n), eos)

    def margin_long(j):
        top2 = np.partition(runner.logits(ids + want[:j])[-1], -2)[-2:]
        return float(top2[1] - top2[0])
    for app, got in (("onnxruntime-genai", genai(art, ids, n)),
                     ("transformers.js", transformers_js(art, DTYPE[preset], ids, n))):
        ok, why = _agree(_until_eos(got, eos), want, margin_long, runner.tie)
        assert ok, f"{app} on {variant} {preset}, 90-token prompt: {why}"


def test_one_directory_several_dtypes(workdir):
    """fp32 and q4 graphs in one directory (`into`), as onnx-community repositories hold them: transformers.js picks
    each by its dtype option and generates what our runner does on that preset's graphs."""
    d = api.export("onnx", "tiny-e2b", "fp32", out=workdir / "multi", force=True).path
    api.export("onnx", "tiny-e2b", "int4", into=d)
    ids = list(range(300, 340))
    for dtype, graph in (("fp32", "decoder_model_merged.onnx"), ("q4", "decoder_model_merged_q4.onnx")):
        runner = ONNXRunner(d / "onnx" / graph)
        want = runner.greedy(ids, 24)

        def margin_at(j, want=want, runner=runner):
            top2 = np.partition(runner.logits(ids + want[:j])[-1], -2)[-2:]
            return float(top2[1] - top2[0])
        got = transformers_js(d, dtype, ids, 24)
        eos = set(runner.cfg["eos_token_ids"])
        ok, why = _agree(_until_eos(got, eos), _until_eos(want, eos), margin_at, runner.tie)
        assert ok, f"transformers.js {dtype}: {why}"


@pytest.mark.parametrize("preset", ["fp32", pytest.param("int4", marks=pytest.mark.slow)])
def test_transformers_js_runs_the_encoders(preset, workdir):
    """transformers.js loads the directory as Gemma4ForConditionalGeneration (embed_tokens, decoder, vision and audio
    encoders) and, from a prompt holding the code-made image (then clip), generates what our onnxruntime runner
    generates with the same encoders (which validation holds to transformers' fp32 towers and model); a
    divergence passes only at a near-tie of our runner's logits."""
    from gemma4_export.targets.onnx import graph_files
    from gemma4_export.targets.onnx_towers import EncoderTowerRunner
    from gemma4_export.validate.towers import (
        audio_features,
        image_patches,
        image_size_for,
        test_audio,
        test_image,
    )

    node = _node()
    from gemma4_export.exporter.variants import VARIANTS

    ckpt = VARIANTS["tiny-e2b"].local_dir
    art = api.export("onnx", "tiny-e2b", preset, out=workdir / "mm", force=True).path
    runner = EncoderTowerRunner(art / graph_files(preset)["decoder_model_merged"], ckpt, preset)
    vision = json.loads((ckpt / "config.json").read_text())["vision_config"]
    n = 12
    for kind, media in (("image", test_image(*image_size_for(vision))), ("audio", test_audio(2.0))):
        ids = runner.media_prompt(kind, media)
        want = runner.media_greedy(kind, media, n)
        if kind == "image":
            pv, pos = image_patches(media, vision["patch_size"])
            feeds = {"pixel_values": pv, "image_position_ids": pos}
        else:
            x, mask = audio_features(media, ckpt)
            feeds = {"input_features": x, "input_features_mask": mask.astype(np.uint8)}
        doc = {"input_ids": ids, **{k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in feeds.items()}}
        f = workdir / f"mm-{kind}-{preset}.json"
        f.write_text(json.dumps(doc))
        r = subprocess.run([node, str(JS / "multimodal.mjs"), str(art), DTYPE[preset], str(f), str(n)],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "G4_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "vision_encoder" in r.stderr and "audio_encoder" in r.stderr  # the sessions it loaded
        got = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]
        at = np.array([ids]) == runner.cfg["image_token_id" if kind == "image" else "audio_token_id"]
        feats = runner.embeddings(media)

        def margin_at(j, want=want, ids=ids, at=at, feats=feats):
            seq = ids + want[:j]
            mask = np.zeros((1, len(seq)), bool)
            mask[:, : at.shape[1]] = at
            logits, _ = runner.text.run(np.array([seq]), np.ones((1, len(seq))), np.arange(len(seq))[None],
                                        runner.text.empty_cache(), keep=1, media=(mask, feats))
            top2 = np.partition(logits[0, -1], -2)[-2:]
            return float(top2[1] - top2[0])

        ok, why = _agree(got, want, margin_at, runner.text.tie)
        assert ok, f"transformers.js, {kind} prompt, {preset}: {why}"


def test_transformers_js_with_a_vision_only_model(workdir):
    """A model with a vision tower and no audio tower (26B-A4B, 31B): transformers.js 4.3 loads its text
    (Gemma4ForCausalLM) from the directory with the vision encoder in it and generates our onnxruntime runner's
    tokens, but its Gemma4ForConditionalGeneration asks for an onnx/audio_encoder the model cannot have. The export
    says so in a note. (When transformers.js stops asking, this test fails: then run the image prompt through it.)"""
    from gemma4_export.progress import Silent
    from gemma4_export.validate.towers import image_patches, image_size_for, test_image

    class Notes(Silent):
        def __init__(self):
            self.notes = []

        def note(self, text):
            self.notes.append(text)

    node, rep = _node(), Notes()
    art = api.export("onnx", "tiny-31b", "fp32", out=workdir / "vision-only", force=True, reporter=rep).path
    assert (art / "onnx" / "vision_encoder.onnx").is_file() and not (art / "onnx" / "audio_encoder.onnx").exists()
    assert any("audio_encoder" in n and "Gemma4ForCausalLM" in n for n in rep.notes), rep.notes
    runner = ONNXRunner(art)
    ids = list(range(300, 340))
    want = runner.greedy(ids, 16)

    def margin_at(j):
        top2 = np.partition(runner.logits(ids + want[:j])[-1], -2)[-2:]
        return float(top2[1] - top2[0])
    eos = set(runner.cfg["eos_token_ids"])
    ok, why = _agree(_until_eos(transformers_js(art, "fp32", ids, 16), eos), _until_eos(want, eos), margin_at,
                     runner.tie)
    assert ok, f"transformers.js, text of a vision-only model: {why}"

    from gemma4_export.exporter.variants import VARIANTS

    ckpt = VARIANTS["tiny-31b"].local_dir
    vision = json.loads((ckpt / "config.json").read_text())["vision_config"]
    pv, pos = image_patches(test_image(*image_size_for(vision)), vision["patch_size"])
    doc = {"input_ids": ids, **{k: {"dims": list(v.shape), "data": v.ravel().tolist()}
                                for k, v in (("pixel_values", pv), ("image_position_ids", pos))}}
    f = workdir / "vision-only.json"
    f.write_text(json.dumps(doc))
    r = subprocess.run([node, str(JS / "multimodal.mjs"), str(art), "fp32", str(f), "4"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "G4_THREADS": "1"})
    assert r.returncode == 1 and "audio_encoder.onnx" in r.stderr, (r.returncode, r.stderr[-2000:])
