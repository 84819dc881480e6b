"""The target registry, the one export pipeline and the canonical tensor table: every target and every preset
declares all of its facts, and the tables the targets map through agree with their runtimes' own lists."""

import json
import re
import shutil
from pathlib import Path

import pytest

from gemma4_export import api
from gemma4_export.errors import Gemma4ExportError
from gemma4_export.exporter.tensors import HF_NAMES, Tensor, expected_text_tensors, hf_name, parse_hf_name
from gemma4_export.exporter.variants import get_variant
from gemma4_export.quant.presets import PRESET_LIST, PRESETS
from gemma4_export.targets.registry import detect_target, get_target, target_names, targets
from gemma4_export.validate.thresholds import Thresholds
from conftest import REAL

PACKAGE = Path(api.__file__).parent


def test_every_target_declares_everything():
    assert target_names() == ["gguf", "mlx", "onnx"]
    for name, t in targets().items():
        assert t.name == name and t.description and t.runtime_name and t.extra and t.color.startswith("#")
        assert t.artifact_kind in ("file", "directory")
        assert t.default_preset in t.presets, name
        assert t.types and all(k == v.name for k, v in t.types.items())
        assert t.backend("cpu")
        if t.max_tensor_bytes:
            assert t.max_tensor_reason and t.small_type(t.preset()).name in t.types


def test_every_preset_owns_its_facts():
    """Slots, thresholds and (where the format records one) the file type: a preset missing any of them fails here."""
    from gguf import LlamaFileType

    assert len(PRESETS) == len(PRESET_LIST), "two presets share a (target, name)"
    for p in PRESET_LIST:
        t = get_target(p.target)
        assert isinstance(p.thresholds, Thresholds), p.name
        th = p.thresholds
        assert th.kld_mean > 0 and th.kld_p999 >= th.kld_mean and 0 < th.top1 <= 1 and th.ppl_ratio >= 1, p.name
        # a generation check that can fail: an exact-match floor, or a first-divergence floor above zero
        assert th.gen_exact > 0 or th.gen_first_div > 0, p.name
        for slot, type_name in p.slots.items():
            if type_name is not None:
                assert type_name in t.types, (p.name, slot, type_name)
        assert p.description, p.name
        if t.name == "gguf":
            assert p.file_type in LlamaFileType.__members__, p.name
        else:
            assert p.file_type is None, p.name


def test_unknown_names_are_refused():
    with pytest.raises(Gemma4ExportError, match="unknown target 'tflite'; choose from gguf, mlx, onnx"):
        get_target("tflite")
    with pytest.raises(Gemma4ExportError, match="unknown gguf preset 'int4'"):
        get_target("gguf").preset("int4")
    with pytest.raises(Gemma4ExportError, match="--group-size does not apply to gguf"):
        get_target("gguf").preset("q4_k_m", group_size=32)
    with pytest.raises(Gemma4ExportError, match="no such artifact"):
        detect_target(Path("/nonexistent/x.gguf"))


def test_hf_names_round_trip_and_live_only_in_the_exporter():
    for key in Tensor:
        for bid in ([0, 17] if key.per_layer else [None]):
            assert parse_hf_name(hf_name(key, bid)) == (key, bid)
            assert parse_hf_name(hf_name(key, bid, "model."), "model.") == (key, bid)
    assert parse_hf_name("model.language_model.layers.3.nothing.weight") is None
    # the Hugging Face spelling is written in exporter/ only: no other module spells a checkpoint tensor
    spellings = [v.split("{bid}.")[-1] for v in HF_NAMES.values()]
    spellings = [s for s in spellings if "_" in s.split(".")[0] or "." in s]  # distinctive ones, e.g. q_proj.weight
    for f in PACKAGE.rglob("*.py"):
        if f.parent.name == "exporter" or f.parent.name == "tiny":
            continue
        text = f.read_text()
        for s in spellings:
            assert not re.search(r'"[\w.{}]*' + re.escape(s) + '"', text), (f.name, s)


def test_gguf_tensor_set_is_llama_cpps():
    """Every GGUF tensor the exporter writes for any variant is one llama.cpp's gemma4 architecture declares
    (gguf-py's MODEL_TENSORS[MODEL_ARCH.GEMMA4])."""
    from gguf import MODEL_ARCH, MODEL_TENSORS

    from gemma4_export.targets.gguf import GGUF_TENSORS

    allowed = set(MODEL_TENSORS[MODEL_ARCH.GEMMA4])
    used = {GGUF_TENSORS[s.key][0] for v in REAL for s in expected_text_tensors(get_variant(v).arch())}
    assert used <= allowed, sorted(t.name for t in used - allowed)
    assert {t for t, _ in GGUF_TENSORS.values()} <= allowed


@pytest.mark.parametrize("target", ["gguf", "mlx", "onnx"])
def test_pipeline_writes_the_artifact_and_its_plan(tmp_path, target):
    t = get_target(target)
    try:
        t.require()
    except Gemma4ExportError as e:
        pytest.skip(str(e))
    preset = {"gguf": "q8_0", "mlx": "8bit", "onnx": "int8"}[target]
    r = api.export(target, "tiny-31b", preset, tmp_path)
    assert r.path == tmp_path / t.artifact_name("tiny-31b", t.preset(preset))
    assert (r.path.is_file() if t.artifact_kind == "file" else r.path.is_dir())
    assert detect_target(r.path) is t and t.artifact_info(r.path).preset == preset
    plan = json.loads(r.plan_file.read_text())
    assert r.plan_file == tmp_path / f"{r.path.name}.plan.json"
    assert (plan["target"], plan["preset"]) == (target, preset) and r.bytes == api.artifact_bytes(r.path)
    companions = [r.towers.name, f"{r.towers.name}.plan.json"] if r.towers is not None else []
    assert (r.towers is not None) == (t.towers_kind == "file")  # tiny-31b has a vision tower
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r.path.name, r.plan_file.name, *companions])


@pytest.mark.parametrize("target", ["gguf", "mlx", "onnx"])
def test_no_local_paths_and_identical_from_two_directories(tmp_path, target):
    """Artifacts record the checkpoint's name (and hub id), never where it sat: the same checkpoint exported from
    two directories gives byte-identical artifacts."""
    t = get_target(target)
    try:
        t.require()
    except Gemma4ExportError as e:
        pytest.skip(str(e))
    src = get_variant("tiny-31b").local_dir
    a, b = tmp_path / "one" / "ckpt", tmp_path / "elsewhere" / "deeper" / "ckpt"
    for d in (a, b):
        shutil.copytree(src, d)
    preset = {"gguf": "q8_0", "mlx": "8bit", "onnx": "int8"}[target]
    ra = api.export(target, a, preset, tmp_path / "out-a")
    rb = api.export(target, b, preset, tmp_path / "out-b")
    files = sorted(p.relative_to(ra.path) for p in ra.path.rglob("*") if p.is_file()) if ra.path.is_dir() else [None]
    for rel in files:
        fa, fb = (ra.path / rel, rb.path / rel) if rel else (ra.path, rb.path)
        data = fa.read_bytes()
        assert data == fb.read_bytes(), rel
        assert str(tmp_path).encode() not in data and b"file://" not in data, rel
    assert re.search(r"ckpt", ra.path.name)


def test_hub_id_is_read_off_a_cache_path(tmp_path):
    from gemma4_export.exporter.source import hub_id_of

    d = tmp_path / "hub" / "models--someone--gemma-4-e2b-ft" / "snapshots" / "abc123"
    d.mkdir(parents=True)
    assert hub_id_of(d) == "someone/gemma-4-e2b-ft"
    assert hub_id_of(tmp_path) is None

