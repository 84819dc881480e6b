"""ONNX export: the graph holds the plan's types, runs in onnxruntime in a fresh process, validates against the fp32
reference, and its KV cache, padding and batch axes behave as an application needs."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from gemma4_export.atomic import OutputError  # noqa: E402
from gemma4_export.errors import Gemma4ExportError, QuantError  # noqa: E402
from gemma4_export.exporter.variants import TINY, get_variant  # noqa: E402
from gemma4_export.targets.onnx import CONFIG_FILE, graph_files, quantized_weights  # noqa: E402
from gemma4_export import api  # noqa: E402
from gemma4_export.validate.onnxrt import ONNXRunner, cache_consistency, read_config  # noqa: E402

BITS = {"INT4": 4, "INT8": 8}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def _graphs(path):
    files = graph_files(read_config(path)["gemma4_export"]["preset"])
    return [onnx.load(str(path / files[part]), load_external_data=False)
            for part in ("embed_tokens", "decoder_model_merged")]


def check_against_plan(path, plan):
    """Every weight the plan quantizes is a MatMulNBits / GatherBlockQuantized input with the plan's bits; every
    weight it keeps in float is a float initializer of the plan's precision; nothing dropped is in the graphs."""
    models = _graphs(path)
    inits = {t.name: t for m in models for t in m.graph.initializer}
    quant = {k: v for m in models for k, v in quantized_weights(m).items()}
    by_name = {}
    for (name, op), bits in quant.items():
        by_name.setdefault(name, set()).add(bits)
    for e in plan.entries:
        if e.dropped:
            assert e.name not in inits and e.name not in by_name, e.name
        elif e.type in BITS:
            assert by_name.get(e.name) == {BITS[e.type]}, (e.name, e.type, by_name.get(e.name))
        elif len(e.shape) >= 2:
            want = onnx.TensorProto.FLOAT16 if e.type == "FP16" else onnx.TensorProto.FLOAT
            name = e.name if len(e.shape) == 2 else f"{e.name}.expert0"  # experts: one view per expert
            assert name in inits and inits[name].data_type == want, (e.name, e.type)
            assert e.name not in by_name
    assert set(by_name) <= {e.name for e in plan.kept}
    return quant


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp32", "int4"])
@pytest.mark.parametrize("variant", TINY)
def test_export_matches_plan_and_validates(variant, preset, out_dir):
    r = api.export("onnx", variant, preset, out=out_dir, force=True)
    assert r.path == out_dir / f"{variant}-onnx-{preset}"
    sfx = {"fp32": "", "int4": "_q4"}[preset]
    for f in (f"onnx/embed_tokens{sfx}.onnx", f"onnx/embed_tokens{sfx}.onnx_data",
              f"onnx/decoder_model_merged{sfx}.onnx", f"onnx/decoder_model_merged{sfx}.onnx_data", CONFIG_FILE,
              "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (r.path / f).is_file(), f
    tjs = json.loads((r.path / "config.json").read_text())["transformers.js_config"]
    towers = {"tiny-e2b": ("vision", "audio"), "tiny-26b-a4b": ("vision",), "tiny-31b": ("vision",)}.get(variant, ())
    assert tjs["use_external_data_format"] == {f"embed_tokens{sfx}.onnx": 1, f"decoder_model_merged{sfx}.onnx": 1,
                                               **{f"{t}_encoder{sfx}.onnx": 1 for t in towers}}
    # the joined graph (for onnxruntime-genai) reads the two graphs' data: no weights of its own
    single = onnx.load(str(r.path / f"onnx/model{sfx}.onnx"), load_external_data=False)
    locations = {e.value for t in single.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {f"embed_tokens{sfx}.onnx_data", f"decoder_model_merged{sfx}.onnx_data"}
    assert not list((r.path / "onnx").glob(f"model{sfx}.onnx_data*"))
    assert (r.path / "onnx" / f"model{sfx}.onnx").stat().st_size < 2_000_000
    quant = check_against_plan(r.path, r.plan)
    a = get_variant(variant).arch()
    if preset == "int4":
        assert quant, "int4 quantizes matrices"
        prefix = "model.language_model."
        assert quant[(prefix + "embed_tokens.weight", "GatherBlockQuantized")] == 8
        assert quant[(prefix + "embed_tokens.weight", "MatMulNBits")] == 8  # the tied head, the decoder's copy
        assert quant[(prefix + "layers.0.self_attn.q_proj.weight", "MatMulNBits")] == 4
        if a.moe:
            assert (prefix + "layers.0.router.proj.weight", "MatMulNBits") not in quant, "router stays fp32"
            assert quant[(prefix + "layers.0.experts.gate_up_proj", "MatMulNBits")] == 4
        if a.has_ple:
            assert quant[(prefix + "embed_tokens_per_layer.weight", "GatherBlockQuantized")] == 4
            assert quant[(prefix + "layers.0.per_layer_input_gate.weight", "MatMulNBits")] == 8
    else:
        assert not quant

    cfg = read_config(r.path)
    owners = [i for i in range(a.num_layers) if not a.is_kv_shared(i)]
    assert [c["layer"] for c in cfg["kv_cache"]["layers"]] == owners
    assert [s["reads_layer"] for s in cfg["kv_cache"]["kv_shared_layers"]] == \
        [a.kv_donor(i) for i in range(a.num_layers) if a.is_kv_shared(i)]
    assert cfg["chat_template"] and cfg["eos_token_ids"] and cfg["gemma4_export"]["preset"] == preset

    # validation in a fresh process, as a user runs it
    v = subprocess.run([sys.executable, "-m", "gemma4_export.cli", "validate", str(r.path)], capture_output=True,
                       text=True, timeout=900)
    report = json.loads((out_dir / f"{r.path.name}.validation.json").read_text())
    assert v.returncode == 0, (report["failures"], v.stderr[-2000:])
    assert report["passed"] and report["tokenizer"]["mismatches"] == []
    assert report["checks"]["kv_cache"]["passed"]
    if preset == "fp32":  # float rounding only
        assert report["logits"]["max_logit_diff"] < 1e-3 and report["logits"]["kld_mean"] < 1e-7
        assert report["generation"]["exact_match_rate"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-e2b", "tiny-26b-a4b"])
@pytest.mark.parametrize("preset", ["fp16", "q4f16"])
def test_float16_graphs_compute_in_float16_and_validate(variant, preset, out_dir):
    """fp16 and q4f16 compute in float16, as fp16 providers run them: embeddings, per-layer inputs and the KV cache
    are float16, block scales float16, the logits leave in float32; each validates within its preset's limits."""
    r = api.export("onnx", variant, preset, out=out_dir / "half", force=True)
    check_against_plan(r.path, r.plan)
    embed, dec = _graphs(r.path)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = {i.name: i.type.tensor_type.elem_type for i in list(dec.graph.input) + list(dec.graph.output)}
    assert types["inputs_embeds"] == types["past_key_values.0.key"] == types["present.0.key"] == f16
    assert types["logits"] == f32
    assert all(o.type.tensor_type.elem_type == f16 for o in embed.graph.output)
    if preset == "q4f16":
        scales = [t for t in dec.graph.initializer if t.name.endswith(".scales")]
        assert scales and all(t.data_type == f16 for t in scales)
    report = api.validate(r.path)
    assert report.passed, report.failures
    assert report.checks["kv_cache"]["passed"]


@pytest.fixture(scope="module")
def e2b_fp32(out_dir):
    return ONNXRunner(api.export("onnx", "tiny-e2b", "fp32", out=out_dir / "r", force=True).path)


def test_cached_generation_past_the_sliding_window(e2b_fp32):
    """Token by token through the cache, well past the 64-token window and into the KV-shared layers, equals
    running the whole sequence each time."""
    prompt = list(range(300, 340))
    r = cache_consistency(e2b_fp32, [prompt], 80)
    assert r["passed"] and r["equal"] == 1, r
    # and the cached step's logits are the full run's, to float rounding
    logits, cache = e2b_fp32.run(np.array([prompt]), np.ones((1, 40)), np.arange(40)[None], e2b_fp32.empty_cache())
    step, _ = e2b_fp32.run(np.array([[7]]), np.ones((1, 41)), np.array([[40]]), cache)
    full = e2b_fp32.logits(prompt + [7])
    assert np.abs(step[0, -1] - full[-1]).max() < 1e-4
    # num_logits_to_keep: the last n positions' logits, the same numbers; 0 keeps them all
    for keep in (1, 3):
        part, _ = e2b_fp32.run(np.array([prompt]), np.ones((1, 40)), np.arange(40)[None], e2b_fp32.empty_cache(),
                               keep=keep)
        assert part.shape == (1, keep, logits.shape[-1]) and np.array_equal(part[0], logits[0, -keep:])
    assert logits.shape[1] == 40


@pytest.mark.slow
def test_cache_check_runs_int8_activations_at_float(out_dir):
    """A 4-bit graph's 8-bit matrices (the tied head, the PLE projections) run at accuracy_level 4, which rounds
    their inputs to int8; onnxruntime's kernels give a row last-bit differences with the run's row count, so one
    token through the cache and the whole sequence can round an input differently (up to 0.1 in tiny-e2b's logits
    on this machine). The cache check runs those nodes at float activations, and there the two runs agree to float
    rounding."""
    r = api.export("onnx", "tiny-e2b", "int4", out=out_dir / "acc", force=True)
    _, dec = _graphs(r.path)
    level4 = sum(1 for n in dec.graph.node if n.op_type == "MatMulNBits"
                 and any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute))
    assert level4 > 0
    runner = ONNXRunner(r.path)
    assert runner.float_activations() == level4
    prompt = list(range(300, 340))
    full = runner.logits(prompt)
    cache, worst = runner.empty_cache(), 0.0
    for i, t in enumerate(prompt):
        step, cache = runner.run(np.array([[t]]), np.ones((1, i + 1)), np.array([[i]]), cache)
        worst = max(worst, float(np.abs(step[0, 0] - full[i]).max()))
    assert worst < runner.tie, worst
    assert runner.float_activations() == level4  # the file on disk is unchanged: the graph as shipped
    report = api.validate(r.path, write=False, windows=1, prompts=2, towers=False)
    kv = report.checks["kv_cache"]
    assert kv["passed"] and kv["float_activations_nodes"] == level4, kv


def test_batch_with_left_padding(e2b_fp32):
    """Two sequences of different lengths in one batch, the shorter left-padded: each row's logits equal the
    sequence run alone (dynamic batch axis, padding mask, shifted positions)."""
    a, b = list(range(200, 230)), list(range(400, 418))
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    pos = np.array([list(range(len(a))), [0] * pad + list(range(len(b)))])
    out, cache = e2b_fp32.run(ids, mask, pos, e2b_fp32.empty_cache(2))
    assert np.abs(out[0] - e2b_fp32.logits(a)).max() < 1e-4
    assert np.abs(out[1, pad:] - e2b_fp32.logits(b)).max() < 1e-4
    # one cached step for both rows
    step, _ = e2b_fp32.run(np.array([[5], [6]]), np.concatenate([mask, [[1], [1]]], 1),
                           np.array([[len(a)], [len(b)]]), cache)
    assert np.abs(step[0, -1] - e2b_fp32.logits(a + [5])[-1]).max() < 1e-4
    assert np.abs(step[1, -1] - e2b_fp32.logits(b + [6])[-1]).max() < 1e-4


def test_external_data_in_several_files(out_dir, monkeypatch, e2b_fp32):
    """Past the per-file limit the weights go to X.onnx_data, X.onnx_data_1, ... (transformers.js's names, declared
    in config.json), no tensor split between two; onnxruntime loads them and the logits are unchanged."""
    from gemma4_export.targets import onnx as onnx_target

    monkeypatch.setattr(onnx_target, "DATA_LIMIT", 3_000_000)
    r = api.export("onnx", "tiny-e2b", "fp32", out=out_dir / "chunks", force=True)
    tjs = json.loads((r.path / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    n = tjs["decoder_model_merged.onnx"]
    assert n > 2
    files = sorted(p.name for p in (r.path / "onnx").glob("decoder_model_merged.onnx_data*"))
    assert files == sorted(["decoder_model_merged.onnx_data"] + [f"decoder_model_merged.onnx_data_{i}"
                                                                  for i in range(1, n)])
    assert all((r.path / "onnx" / f).stat().st_size <= 3_000_000 or f == files[0] for f in files[1:])
    m = onnx.load(str(r.path / "onnx/decoder_model_merged.onnx"), load_external_data=False)
    used = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert used == set(files)
    runner = ONNXRunner(r.path)
    ids = list(range(100, 140))
    assert np.array_equal(runner.logits(ids), e2b_fp32.logits(ids))


def test_moe_runs_only_the_experts_tokens_chose(out_dir, tmp_path):
    """One expert of layer 0 (of 4, top 2) poisoned with NaN in the written weights: a token that did not choose it
    gives exactly the clean logits (the expert was never computed), one that did gives NaN (the poisoned weights are
    the expert's). With every expert computed for every token, all would be NaN."""
    import shutil

    r = api.export("onnx", "tiny-26b-a4b", "fp32", out=out_dir / "moe", force=True)
    d = shutil.copytree(r.path, tmp_path / r.path.name)
    dec = d / graph_files("fp32")["decoder_model_merged"]
    m = onnx.load(str(dec), load_external_data=False)
    t = next(i for i in m.graph.initializer
             if i.name == "model.language_model.layers.0.experts.gate_up_proj.expert3")
    ext = {e.key: e.value for e in t.external_data}
    with open(dec.parent / ext["location"], "r+b") as f:
        f.seek(int(ext["offset"]))
        f.write(np.full(int(ext["length"]) // 4, np.nan, np.float32).tobytes())
    clean, poisoned = ONNXRunner(r.path), ONNXRunner(d)
    finite = nan = 0
    for tok in range(2, 42):
        a, b = clean.logits([tok]), poisoned.logits([tok])
        if np.isnan(b).any():
            nan += 1
        else:
            assert np.array_equal(a, b), tok
            finite += 1
    assert finite and nan, (finite, nan)


def _ctrl_c_at_third_weight(monkeypatch) -> None:
    """Ctrl-C when the export writes its third quantized weight."""
    from gemma4_export.targets import onnx_ops

    real, calls = onnx_ops.Graph.quant_weight, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(onnx_ops.Graph, "quant_weight", interrupted)


def test_several_presets_in_one_directory(out_dir, monkeypatch):
    """`into`: int4's graphs join an fp32 directory of the same checkpoint, as onnx-community repositories hold
    several dtypes; both validate, named by their graphs; config.json declares every data file; the wrong
    directory, a second int4 and other weights are refused; an interrupted join leaves the directory as it was."""
    base = api.export("onnx", "tiny-e2b", "fp32", out=out_dir / "multi", force=True).path
    before = {p.name: p.read_bytes() for p in (base / "onnx").iterdir()}
    r = api.export("onnx", "tiny-e2b", "int4", into=base)
    assert r.path == base and r.validate_as == base / "onnx/decoder_model_merged_q4.onnx"
    assert r.plan_file.name == f"{base.name}.int4.plan.json"
    for name, data in before.items():  # the fp32 graphs are untouched
        assert (base / "onnx" / name).read_bytes() == data
    tjs = json.loads((base / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    assert set(tjs) == {"embed_tokens.onnx", "decoder_model_merged.onnx", "embed_tokens_q4.onnx",
                        "decoder_model_merged_q4.onnx", "vision_encoder.onnx", "audio_encoder.onnx",
                        "vision_encoder_q4.onnx", "audio_encoder_q4.onnx"}  # each preset's encoders too
    doc = json.loads((base / CONFIG_FILE).read_text())
    assert set(doc["presets"]) == {"fp32", "int4"}
    ref = api.reference("tiny-e2b", windows=2, prompts=2)  # one short reference for both graphs
    for preset, graph in (("fp32", "decoder_model_merged.onnx"), ("int4", "decoder_model_merged_q4.onnx")):
        report = api.validate(base / "onnx" / graph, reference=ref)
        assert report.passed and report.preset == preset, report.failures
        assert (out_dir / "multi" / f"{base.name}.{preset}.validation.json").is_file()
    with pytest.raises(Gemma4ExportError, match="several presets"):
        api.validate(base)
    with pytest.raises(Gemma4ExportError, match="already holds int4"):
        api.export("onnx", "tiny-e2b", "int4", into=base)
    with pytest.raises(Gemma4ExportError, match="other weights"):
        api.export("onnx", "tiny-31b", "int4", into=base)
    with pytest.raises(Gemma4ExportError, match="not an ONNX directory"):
        api.export("onnx", "tiny-e2b", "int4", into=out_dir)
    with pytest.raises(Gemma4ExportError, match="for ONNX directories"):
        api.export("gguf", "tiny-e2b", "q8_0", into=base)

    files = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    _ctrl_c_at_third_weight(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        api.export("onnx", "tiny-e2b", "int8", into=base)
    assert {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in (out_dir / "multi").iterdir() if p.name.startswith(".")) == []


def test_ple_type_and_overrides_reach_the_graph(out_dir):
    r = api.export("onnx", "tiny-e2b", "int4", out=out_dir / "o", ple_type="INT8",
                    overrides=[r"layers\.0\.mlp\.down_proj=FP16"], force=True)
    quant = check_against_plan(r.path, r.plan)
    p = "model.language_model."
    assert quant[(p + "embed_tokens_per_layer.weight", "GatherBlockQuantized")] == 8
    assert (p + "layers.0.mlp.down_proj.weight", "MatMulNBits") not in quant
    assert quant[(p + "layers.1.mlp.down_proj.weight", "MatMulNBits")] == 4


def test_bad_choices_and_atomic_output(out_dir, monkeypatch):
    with pytest.raises(QuantError, match="unknown onnx preset"):
        api.export("onnx", "tiny-31b", "q4_k_m", out=out_dir)
    with pytest.raises(QuantError):
        api.export("onnx", "tiny-31b", "int4", overrides=["q_proj=Q4_K"], out=out_dir)
    with pytest.raises(Gemma4ExportError, match="unknown variant"):
        api.export("onnx", "tiny-7b", "int4", out=out_dir)
    first = api.export("onnx", "tiny-31b", "int8", out=out_dir / "a", force=True)
    with pytest.raises(OutputError, match="exists"):
        api.export("onnx", "tiny-31b", "int8", out=out_dir / "a")
    before = sorted(p.name for p in first.path.iterdir())

    # Ctrl-C in the middle of writing weights: the existing artifact is untouched, nothing half-written is left
    _ctrl_c_at_third_weight(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        api.export("onnx", "tiny-31b", "int8", out=out_dir / "a", force=True)
    assert sorted(p.name for p in first.path.iterdir()) == before
    assert sorted(p.name for p in (out_dir / "a").iterdir()) == [first.path.name, first.plan_file.name]


def test_malformed_artifacts_give_clear_errors(out_dir):
    from gemma4_export.validate.harness import validate_artifact

    r = api.export("onnx", "tiny-31b", "fp32", out=out_dir / "m", force=True)
    dec = r.path / graph_files("fp32")["decoder_model_merged"]
    dec.write_bytes(dec.read_bytes()[:200])
    with pytest.raises(Gemma4ExportError, match="onnxruntime could not load"):
        validate_artifact(r.path, write=False)
    (r.path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(Gemma4ExportError, match="unreadable"):
        validate_artifact(r.path, write=False)
    (r.path / CONFIG_FILE).write_text(json.dumps({"gemma4_export": {"target": "mlx"}}))
    with pytest.raises(Gemma4ExportError, match="not an ONNX model written by gemma4-export"):
        validate_artifact(r.path, write=False)


def test_cli_plan_shows_onnx_types():
    out = subprocess.run([sys.executable, "-m", "gemma4_export.cli", "plan", "--variant", "e2b", "--target", "onnx",
                          "--quant", "int4", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    p = "model.language_model."
    assert types[p + "layers.0.self_attn.q_proj.weight"] == "INT4"
    assert types[p + "embed_tokens.weight"] == "INT8"
    assert types[p + "layers.0.per_layer_input_gate.weight"] == "INT8"
    assert types[p + "layers.0.input_layernorm.weight"] == "FP32"
