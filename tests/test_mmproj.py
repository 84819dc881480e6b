"""The projector GGUF (mmproj) for llama.cpp's mtmd: names, layouts and types from the tower rules, the pipeline
that writes it beside the text GGUF, and llama.cpp running it against transformers' towers."""

import json

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.errors import CheckpointError, Gemma4ExportError
from gemma4_export.exporter.checkpoint import Checkpoint, to_f32
from gemma4_export.exporter.source import ModelSource, config_tower_specs
from gemma4_export.exporter.tensors import Role
from gemma4_export.exporter.variants import TINY_DIR, VARIANTS
from gemma4_export.quant.plan import build_tower_plan
from gemma4_export.quant.rules import tower_kind
from gemma4_export.targets.gguf_file import read_gguf
from gemma4_export.targets.gguf_mmproj import MMProjError, check_towers, mmproj_policy, mmproj_tensor

TOWERED = ["tiny-e2b", "tiny-31b", "tiny-12b"]


def variant_dir(name: str):
    return TINY_DIR / name


def _published_configs():
    out = []
    for name, v in VARIANTS.items():
        if v.tiny or v.instruction_tuned:
            continue
        cfg = v.config()
        if cfg.get("model_type") == "gemma4" and (cfg.get("vision_config") or cfg.get("audio_config")):
            out.append((name, cfg))
    return out


@pytest.mark.parametrize("name,cfg", _published_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_published_tower_tensor_has_one_place(name, cfg):
    """Every tower tensor transformers builds for a published config maps to a distinct name clip.cpp reads."""
    specs = config_tower_specs(cfg)
    names = [mmproj_tensor(s.name)[0] for s in specs]
    assert len(set(names)) == len(names)
    assert "mm.input_projection.weight" in names and "v.patch_embd.weight" in names
    if cfg.get("audio_config"):
        assert {"a.conv1d.0.weight", "a.input_projection.weight", "mm.a.input_projection.weight"} <= set(names)
        assert any(n.endswith("per_dim_scale.weight") for n in names)


def test_unknown_tower_tensor_is_an_error():
    with pytest.raises(CheckpointError, match="no place"):
        mmproj_tensor("model.vision_tower.encoder.layers.0.new_block.weight")


def test_tower_rules_per_choice():
    src = ModelSource.open("tiny-e2b", need_weights=True)
    specs = src.tensor_specs()
    f16 = {e.name: e for e in build_tower_plan(specs, mmproj_policy("f16"), "gguf").entries}
    q8 = {e.name: e for e in build_tower_plan(specs, mmproj_policy("q8_0"), "gguf").entries}
    assert set(f16) == {s.name for s in specs if s.role == Role.TOWER}
    for name, e in f16.items():
        kind = tower_kind(name, e.shape)
        if kind in ("scalar", "norm", "bias", "position", "conv"):
            assert e.type == q8[name].type == "F32", name
        elif kind == "patch":
            assert (e.type, q8[name].type) == ("F16", "F32")
        else:
            assert (e.type, q8[name].type) == ("F16", "Q8_0"), name
    assert q8["model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max"].rule == "tower-scalar"
    with pytest.raises(MMProjError, match="--mmproj 'q4'"):
        mmproj_policy("q4")


def test_text_only_checkpoints_are_refused_clearly():
    with pytest.raises(MMProjError, match="no vision or audio tower"):
        check_towers({"model_type": "gemma4_text"})


def test_unified_projector_layout(tmp_path):
    """The unified 12B's embedders as llama.cpp's gemma4uv / gemma4ua: the 48 x 48 x 3 patch's columns and first
    norm reordered from (y, x, c) to (c, y, x), the position table [S, 2, D] as [2, S, D]."""
    r = api.export("gguf", variant="tiny-12b", preset="q8_0", out=tmp_path)
    g = read_gguf(r.towers)
    assert g.metadata["clip.vision.projector_type"] == "gemma4uv"
    assert g.metadata["clip.audio.projector_type"] == "gemma4ua" and g.metadata["clip.audio.num_mel_bins"] == 640
    with Checkpoint(variant_dir("tiny-12b")) as ck:
        w = np.array(to_f32(ck.raw("model.embed_vision.patch_dense.weight"), "BF16"), np.float32)
        ln = np.array(to_f32(ck.raw("model.embed_vision.patch_ln1.weight"), "BF16"), np.float32)
        pos = np.array(to_f32(ck.raw("model.embed_vision.pos_embedding"), "BF16"), np.float32).reshape(
            ck.info("model.embed_vision.pos_embedding").shape)
    got = g.read_tensor("v.patch_embd.weight").astype(np.float32)  # F16 in an f16 projector
    # (c=2, y=5, x=7) in gemma4uv's order is (y=5, x=7, c=2) in transformers'
    c, y, x = 2, 5, 7
    assert np.array_equal(got[:, c * 48 * 48 + y * 48 + x], w[:, (y * 48 + x) * 3 + c].astype(np.float16))
    assert np.array_equal(g.read_tensor("v.patch_norm.1.weight")[c * 48 * 48 + y * 48 + x], ln[(y * 48 + x) * 3 + c])
    assert np.array_equal(g.read_tensor("v.position_embd.weight"), pos.transpose(1, 0, 2))


def test_projector_written_beside_the_gguf_and_reused(tmp_path):
    r = api.export("gguf", variant="tiny-e2b", preset="q8_0", out=tmp_path)
    mm = tmp_path / "mmproj-tiny-e2b-f16.gguf"
    assert r.towers == mm and mm.is_file() and (tmp_path / "mmproj-tiny-e2b-f16.gguf.plan.json").is_file()
    g = read_gguf(mm)
    meta = g.metadata
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.vision.projector_type"] == "gemma4v" and meta["clip.audio.projector_type"] == "gemma4a"
    assert meta["clip.vision.projection_dim"] == meta["clip.audio.projection_dim"] == 256
    assert meta["clip.audio.num_mel_bins"] == 128  # the processor's feature_size
    assert list(meta["clip.vision.image_mean"]) == [0, 0, 0] and list(meta["clip.vision.image_std"]) == [1, 1, 1]
    with Checkpoint(variant_dir("tiny-e2b")) as ck:
        def f32(name):
            info = ck.info(name)
            return np.array(to_f32(ck.raw(name), info.dtype), dtype=np.float32).reshape(info.shape)

        patch = f32("model.vision_tower.patch_embedder.input_proj.weight")  # [D, p*p*3], (y, x, c) order
        got = g.read_tensor("v.patch_embd.weight").astype(np.float32)  # [D, 3, p, p]
        assert got.shape == (64, 3, 16, 16)
        # pixel (y=2, x=5) of channel 1 is column (2 * 16 + 5) * 3 + 1 of the flattened patch
        assert np.array_equal(got[:, 1, 2, 5], patch[:, (2 * 16 + 5) * 3 + 1].astype(np.float16).astype(np.float32))
        pds = f32("model.audio_tower.layers.1.self_attn.per_dim_scale")
        assert np.allclose(g.read_tensor("a.blk.1.per_dim_scale.weight"), np.logaddexp(0, pds), rtol=1e-6)
        lim = g.read_tensor("v.blk.0.attn_q.input_max")
        assert lim.shape == (1,) and lim.dtype == np.float32
        assert lim[0] == f32("model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max")
        # the lconv1d norms are written crossed, the names clip.cpp reads them by
        assert np.array_equal(g.read_tensor("a.blk.0.conv_norm.weight"),
                              f32("model.audio_tower.layers.0.lconv1d.pre_layer_norm.weight"))
    before = mm.stat().st_mtime_ns
    r2 = api.export("gguf", variant="tiny-e2b", preset="q4_0", out=tmp_path, calibrate=False)
    assert r2.towers == mm and mm.stat().st_mtime_ns == before  # the same weights' projector is kept
    r3 = api.export("gguf", variant="tiny-e2b", preset="q6_k", out=tmp_path, calibrate=False, towers=False)
    assert r3.towers is None and r3.tower_plan is None


def test_projector_of_other_weights_is_not_overwritten(tmp_path):
    (tmp_path / "mmproj-tiny-e2b-f16.gguf").write_bytes(b"not this checkpoint's")
    with pytest.raises(Gemma4ExportError, match="not this checkpoint's projector"):
        api.export("gguf", variant="tiny-e2b", preset="q8_0", out=tmp_path)
    assert not (tmp_path / "tiny-e2b-q8_0.gguf").exists()
    r = api.export("gguf", variant="tiny-e2b", preset="q8_0", out=tmp_path, force=True)
    assert read_gguf(r.towers).metadata["general.type"] == "mmproj"


def test_text_only_exports(tmp_path):
    r = api.export("gguf", variant="tiny-e2b", preset="q8_0", out=tmp_path, towers=False)
    assert r.towers is None and not list(tmp_path.glob("mmproj-*"))
    r = api.export("gguf", variant="tiny-31b", preset="q8_0", out=tmp_path, tower_type="none")
    assert r.towers is None and not list(tmp_path.glob("mmproj-*"))
    with pytest.raises(Gemma4ExportError, match="--text-only"):
        api.export("gguf", variant="tiny-e2b", preset="q8_0", out=tmp_path, towers=False, tower_type="q8_0")


def test_plan_towers_cli():
    from typer.testing import CliRunner

    from gemma4_export.cli import app

    res = CliRunner().invoke(app, ["plan", "--variant", "tiny-31b", "--towers", "--mmproj", "q8_0", "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout)
    assert p["preset"] == "mmproj-q8_0"
    types = {t["name"]: t["type"] for t in p["tensors"]}
    assert types["model.embed_vision.embedding_projection.weight"] == "Q8_0"
    assert not any(n.startswith("model.audio_tower") for n in types)


# ---- llama.cpp runs the projector ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", TOWERED)
@pytest.mark.parametrize("mmproj", ["f16", "q8_0"])
def test_mtmd_matches_transformers_towers(tmp_path, variant, mmproj):
    """llama.cpp's mtmd loads the text GGUF and its projector; its image (and audio) embeddings match
    transformers' towers within the projector's limits, and greedy generations from a prompt holding the image
    (clip) are transformers' own."""
    pytest.importorskip("llama_cpp")
    from gemma4_export.validate.mtmd import MtmdRunner
    from gemma4_export.validate.towers import TOWER_LIMITS, tower_checks

    r = api.export("gguf", variant=variant, preset="f32", out=tmp_path, tower_type=mmproj)
    cfg = json.loads((variant_dir(variant) / "config.json").read_text())
    runner = MtmdRunner(r.path, r.towers, image_id=cfg["image_token_id"], audio_id=cfg["audio_token_id"])
    try:
        assert runner.vision and runner.audio == bool(cfg.get("audio_config"))
        assert runner.limits == ("q8_0" if mmproj == "q8_0" else "float")
        # llama.cpp decides causal or bidirectional image attention by the text width (E2B's and E4B's are causal),
        # so at tiny-e2b's width it attends bidirectionally where transformers does not: its image generations
        # agree up to a near-tie, which tower_checks accepts; every other case is held to identical tokens
        checks = tower_checks(runner, variant_dir(variant), TOWER_LIMITS[runner.limits])
    finally:
        runner.close()
    want = {"image_embeddings", "image_generation"} | ({"audio_embeddings", "audio_generation"}
                                                       if cfg.get("audio_config") else set())
    assert set(checks) == want
    for name, c in checks.items():
        assert c["passed"], (name, c)
    assert checks["image_embeddings"]["tokens"] == 70
    if "audio_embeddings" in checks:
        assert checks["audio_embeddings"]["tokens"] == 50


@pytest.mark.slow
def test_a_wrong_projector_layout_fails(tmp_path, monkeypatch):
    """Negative control: the patch kernel written without its (y, x, c) -> (c, y, x) permutation loads and runs
    in llama.cpp, and the embedding check catches it."""
    pytest.importorskip("llama_cpp")
    from gemma4_export.targets import gguf_mmproj
    from gemma4_export.validate.mtmd import MtmdRunner
    from gemma4_export.validate.towers import TOWER_LIMITS, tower_checks

    real = gguf_mmproj._convert
    monkeypatch.setattr(gguf_mmproj, "_convert", lambda a, t, p: real(a, "", p).reshape(a.shape[0], 3, p, p)
                        if t == "patch" else real(a, t, p))
    r = api.export("gguf", variant="tiny-31b", preset="f32", out=tmp_path)
    runner = MtmdRunner(r.path, r.towers, image_id=1019, audio_id=1020)
    try:
        checks = tower_checks(runner, variant_dir("tiny-31b"), TOWER_LIMITS["float"], whole=False)
    finally:
        runner.close()
    assert not checks["image_embeddings"]["passed"]
    assert checks["image_embeddings"]["rel_error"] > 0.1


@pytest.mark.slow
def test_validate_reports_the_towers(tmp_path):
    """`validate` on a GGUF with its projector beside it adds the tower checks to the report."""
    pytest.importorskip("llama_cpp")
    r = api.export("gguf", variant="tiny-31b", preset="q8_0", out=tmp_path)
    rep = api.validate(r.path, variant="tiny-31b", prompts=2, windows=2)
    assert rep.passed, rep.failures
    assert {"image_embeddings", "image_generation"} <= set(rep.checks)
    md = (tmp_path / "tiny-31b-q8_0.gguf.validation.md").read_text()
    assert "image embeddings" in md
