"""Measured sensitivity and the mixed-precision choice under a size budget."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.errors import QuantError
from gemma4_export.exporter.tensors import Role, TensorSpec
from gemma4_export.quant import calibrate as cal
from gemma4_export.quant import sensitivity as S

pytest.importorskip("llama_cpp")


def _spec(name, rows, cols, role=Role.MLP_DOWN):
    return TensorSpec(name, (rows, cols), role, 0)


def test_allocate_is_the_exact_optimum_within_the_budget():
    classes = {"a": [_spec("a", 256, 256)], "b": [_spec("b", 512, 256)], "c": [_spec("c", 1024, 256)]}
    types = ("Q2_K", "Q4_K", "Q6_K", "Q8_0")
    rng = np.random.default_rng(0)
    kld = {}
    for c in classes:  # more bits, less KLD, at a different rate per class
        k = np.sort(rng.random(len(types)))[::-1] * rng.random() * 1e-2
        kld[c] = dict(zip(types, map(float, k)))
    sens = S.Sensitivity(kld, 100)
    sizes = {c: {t: S.class_bytes(classes[c], t) for t in types} for c in classes}
    for budget in (sum(min(v.values()) for v in sizes.values()) + 1, 300_000, 500_000, 700_000, 10**7):
        got = S.allocate(sens, classes, budget)
        assert sum(o.bytes for o in got.values()) <= budget
        best = min((sum(kld[c][t] for c, t in zip(classes, combo)), combo)
                   for combo in itertools.product(types, repeat=3)
                   if sum(sizes[c][t] for c, t in zip(classes, combo)) <= budget)
        assert sum(o.kld for o in got.values()) == pytest.approx(best[0], rel=1e-9)
    with pytest.raises(QuantError, match="smallest types"):
        S.allocate(sens, classes, 1000)


def test_measured_kld_equals_the_whole_model_with_that_class_quantized():
    """The one-pass measurement of a class at a type against the whole transformers model with exactly that class
    quantized and dequantized (same kernels, same imatrix), on the same tokens."""
    import torch
    import transformers

    src = api.open_source("tiny-31b", need_weights=True)
    imp = cal.importance_for(src, chunks=2)
    calib = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=96, chunks=2)
    sens = S.measure(src, imp, calib.chunks, ("Q4_K", "Q8_0"))
    assert set(sens.kld) >= {"attn_q", "attn_v", "mlp_down", "token_embd"}
    for c, d in sens.kld.items():  # more bits cost less, for every class
        assert 0 < d["Q8_0"] < d["Q4_K"], c
    model = transformers.AutoModelForCausalLM.from_pretrained(src.checkpoint.dir, dtype=torch.float32)
    ids = torch.tensor(calib.chunks)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.double(), -1)
    qd = S._QD(imp, src.checkpoint.text_prefix)
    prefix = src.checkpoint.text_prefix
    try:
        for cls, module_of in (("mlp_down", lambda i: f"layers.{i}.mlp.down_proj"), ("token_embd", None)):
            saved = {}
            with torch.no_grad():
                lm = model.get_decoder() if hasattr(model, "get_decoder") else model.model
                if module_of is None:
                    w = lm.embed_tokens.weight
                    saved[w] = w.data.clone()
                    w.data = qd(f"{prefix}embed_tokens.weight", w.data, "Q4_K")
                else:
                    for i in range(src.arch.num_layers):
                        w = lm.get_submodule(module_of(i)).weight
                        saved[w] = w.data.clone()
                        w.data = qd(f"{prefix}{module_of(i)}.weight", w.data, "Q4_K")
                q = torch.log_softmax(model(ids).logits.double(), -1)
                for w, d in saved.items():
                    w.data = d
            direct = float((base.exp() * (base - q)).sum(-1).clamp(min=0).mean())
            assert sens.kld[cls]["Q4_K"] == pytest.approx(direct, rel=2e-3), cls
    finally:
        qd.close()


@pytest.mark.slow
def test_target_bpw_plan_fits_and_says_why(tmp_path):
    p = api.plan("tiny-31b", "gguf", "q4_k_m", target_bpw=5.0)
    assert p.bits_per_weight <= 5.0 and p.bits_per_weight > 4.6
    chosen = [e for e in p.kept if e.rule == "target-size"]
    assert chosen and all("costs KLD" in e.reason and "target 5 bits per weight" in e.reason for e in chosen)
    assert {e.type for e in p.kept if e.role == Role.NORM.value} == {"F32"}  # never traded
    assert p.to_json()["sensitivity"]["tokens"] == S.SENS_CHUNK * S.SENS_CHUNKS
    r = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path, target_bpw=5.0)
    assert r.path.name == "tiny-31b-q4_k_m-5bpw.gguf"
    assert r.plan.bits_per_weight <= 5.0
    with pytest.raises(QuantError, match="smallest types"):
        api.plan("tiny-31b", "gguf", "q4_k_m", target_bpw=1.6)
    size = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path, max_size=4_500_000)
    assert size.path.stat().st_size <= 4_500_000 and size.path.name == "tiny-31b-q4_k_m-4.5MB.gguf"


def test_target_specs_and_their_cache_keys():
    """Each target brings its own candidates (MLX at the preset's group size), byte table and quantizer; the cache
    key names the target, and GGUF's is the one it always was."""
    from gemma4_export.quant.types import MLX_TYPES, ONNX_TYPES
    from gemma4_export.targets.registry import get_target

    g = S.target_spec(get_target("gguf"), get_target("gguf").preset("q4_k_m"))
    assert g.candidates == S.CANDIDATES and g.key == "" and g.make_qd is S._QD
    m = S.target_spec(get_target("mlx"), get_target("mlx").preset("4bit"))
    assert m.candidates == ("Q2G64", "Q3G64", "Q4G64", "Q5G64", "Q6G64", "Q8G64", "BF16") and m.key == "mlx"
    assert m.max_tensor_bytes == 4 * 2**30
    assert S.target_spec("mlx", get_target("mlx").preset("qat")).candidates[2] == "Q4G32"
    o = S.target_spec(get_target("onnx"), get_target("onnx").preset("int4"))
    assert o.candidates == ("INT4", "INT8", "FP16") and o.key == "onnx"
    assert S.target_spec("onnx", get_target("onnx").preset("q4f16")).key == "onnx16"  # float16 block scales
    specs = [_spec("a", 512, 256)]
    assert S.class_bytes(specs, "Q3G64", MLX_TYPES) == 512 * 256 * 3 // 8 + 512 * 4 * 2 * 2  # codes, bf16 scale+bias
    assert S.class_bytes(specs, "INT4", ONNX_TYPES) == 512 * 256 // 2 + 512 * 8 * 4  # nibbles, float32 scales
    with pytest.raises(QuantError, match="no measured choice"):
        S.target_spec("tflite")


def test_mlx_and_onnx_quantize_dequantize_is_what_their_quantizers_store():
    """Without calibration the measurement's MLX quantize-dequantize is mx.quantize on the bf16 weights (every
    width, read back by mx.dequantize), and its ONNX one onnxruntime's own block quantizer."""
    import torch

    mx = pytest.importorskip("mlx.core")
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from gemma4_export.quant.weighted import int_dequant

    w = torch.from_numpy(np.random.default_rng(3).standard_normal((48, 256)).astype(np.float32))
    qd = S._MLXQD(None, "")
    for bits in (2, 3, 4, 5, 6, 8):
        got = qd("x", w, f"Q{bits}G64").numpy()
        wq, sc, bi = mx.quantize(mx.array(w.numpy()).astype(mx.bfloat16), group_size=64, bits=bits)
        ref = mx.dequantize(wq, sc.astype(mx.float32), bi.astype(mx.float32), group_size=64, bits=bits)
        np.testing.assert_array_equal(got, np.array(ref))
    assert np.array_equal(qd("x", w, "BF16").numpy(), w.to(torch.bfloat16).float().numpy())
    qo = S._ONNXQD(None, "")
    for bits in (4, 8):
        ort = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits))
        packed, scales, _ = ort.qbits_block_quant(np.ascontiguousarray(w.numpy().T))
        np.testing.assert_array_equal(qo("x", w, f"INT{bits}").numpy(), int_dequant(packed, scales, bits))
    assert np.array_equal(qo("x", w, "FP16").numpy(), w.half().float().numpy())


def _checkpoint_weight(src, name):
    import torch

    from gemma4_export.exporter.checkpoint import to_f32

    info = src.checkpoint.info(name)
    rows = int(np.prod(info.shape[:-1]))
    return torch.from_numpy(to_f32(src.checkpoint.rows(name, 0, rows), info.dtype).reshape(info.shape))


def _sized_checks(p, target, bpw, candidates):
    assert bpw - 0.5 < p.bits_per_weight <= bpw
    chosen = [e for e in p.kept if e.rule == "target-size"]
    assert chosen and {e.type for e in chosen} <= set(candidates)
    assert all("costs KLD" in e.reason and f"target {bpw:g} bits per weight" in e.reason and "measured:" in e.reason
               for e in chosen)
    sens = p.to_json()["sensitivity"]
    assert sens["target"] == target and sens["types"] == list(candidates)
    for e in chosen:  # the reason quotes the measured number of its class at its type
        cls = next(c for c, d in sens["kld"].items() if f"class {c} at {e.type} " in e.reason)
        assert f"costs KLD {sens['kld'][cls][e.type]:.2e}" in e.reason
    return chosen


@pytest.mark.slow
def test_target_bpw_and_max_size_for_mlx(tmp_path):
    """MLX: the measured choice over its affine widths (the new 3 and 5 bits among them) and bf16 fits the budget,
    writes exactly the plan's bytes in the quantization the measurement applied, and mlx-lm loads and runs it."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx

    from gemma4_export.quant import weighted as W
    from gemma4_export.targets.mlx import mlx_paths
    from gemma4_export.targets.registry import get_target

    cands = S.target_spec("mlx", get_target("mlx").preset("4bit")).candidates
    p = api.plan("tiny-31b", "mlx", "4bit", target_bpw=5.0)
    _sized_checks(p, "mlx", 5.0, cands)
    assert {e.type for e in p.kept if e.role == Role.NORM.value} == {"BF16"}  # never traded
    # the tied head is traded like any class (plans are made for mlx's Metal arithmetic, validate/mlxrt.py)
    head, = (e for e in p.kept if e.role == Role.TOKEN_EMBD.value)
    assert "minimise the summed KLD" in head.reason, head
    r = api.export("mlx", "tiny-31b", "4bit", tmp_path, target_bpw=5.0)
    assert r.path.name == "tiny-31b-mlx-4bit-5bpw" and r.plan.bits_per_weight <= 5.0
    assert [(e.name, e.type) for e in r.plan.kept] == [(e.name, e.type) for e in p.kept]
    f = r.path / "model.safetensors"
    head = int.from_bytes(f.read_bytes()[:8], "little")
    assert f.stat().st_size - 8 - head == r.plan.total_bytes  # the byte table is the writer's
    cfg = json.loads((r.path / "config.json").read_text())["quantization"]
    # every quantized tensor as written is what the measurement quantized: the calibrated search, dequantized
    src = api.open_source("tiny-31b", need_weights=True)
    qd = S._MLXQD(cal.importance_for(src, hessians=True), src.checkpoint.text_prefix)
    tensors = mx.load(str(f))
    seen = set()
    for e in r.plan.kept:
        if e.role not in ("mlp_down", "attn_k", "attn_v", "token_embd") or e.type in seen or e.type == "BF16":
            continue
        seen.add(e.type)
        bits, group = (int(x) for x in e.type[1:].split("G"))
        (path, _, shape), = mlx_paths(e, src.checkpoint.text_prefix)
        stem = path.removesuffix(".weight")
        assert cfg[stem] == {"group_size": group, "bits": bits}
        written = W.mlx_dequant(np.array(tensors[f"{stem}.weight"]),
                                np.array(tensors[f"{stem}.scales"].view(mx.uint16)),
                                np.array(tensors[f"{stem}.biases"].view(mx.uint16)), bits, group)
        measured = qd(e.name, _checkpoint_weight(src, e.name), e.type).numpy().reshape(written.shape)
        np.testing.assert_array_equal(written, measured)
    assert len(seen) >= 2
    src.checkpoint.close()
    rep = api.validate(r.path, "tiny-31b", windows=2, prompts=2, new_tokens=16, towers=False, write=False)
    assert rep.runtime and rep.logits is not None and rep.logits.kld_mean < 0.05, rep.failures
    size = api.export("mlx", "tiny-31b", "4bit", tmp_path, max_size=2_300_000)
    assert size.path.name == "tiny-31b-mlx-4bit-2.3MB"
    assert api.artifact_bytes(size.path) <= 2_300_000
    assert any(e.rule == "target-size" for e in size.plan.kept)
    # text only: the budget is the text's, not lessened by towers the directory does not hold
    text = api.export("mlx", "tiny-31b", "4bit", tmp_path / "text", max_size=2_300_000, towers=False)
    assert 0.95 * 2_300_000 <= api.artifact_bytes(text.path) <= 2_300_000
    assert text.plan.total_bytes > size.plan.total_bytes


@pytest.mark.slow
def test_target_bpw_for_onnx(tmp_path):
    """ONNX: INT4 / INT8 blocks and FP16, chosen by measurement, written as measured, run by onnxruntime."""
    import onnx
    from onnx import numpy_helper

    from gemma4_export.quant import weighted as W
    from gemma4_export.targets.onnx import DECODER, graph_files
    from gemma4_export.targets.registry import get_target

    cands = S.target_spec("onnx", get_target("onnx").preset("int4")).candidates
    p = api.plan("tiny-31b", "onnx", "int4", target_bpw=6.0)
    chosen = _sized_checks(p, "onnx", 6.0, cands)
    assert len({e.type for e in chosen}) >= 2
    r = api.export("onnx", "tiny-31b", "int4", tmp_path, target_bpw=6.0)
    assert r.path.name == "tiny-31b-onnx-int4-6bpw" and r.plan.bits_per_weight <= 6.0
    src = api.open_source("tiny-31b", need_weights=True)
    qd = S._ONNXQD(cal.importance_for(src, hessians=True), src.checkpoint.text_prefix)
    model = onnx.load(str(r.path / graph_files("int4")[DECODER]))
    inits = {i.name: i for i in model.graph.initializer}
    seen = set()
    for e in r.plan.kept:
        if e.type in seen or e.type not in ("INT4", "INT8") or e.role not in ("mlp_down", "attn_q", "attn_k"):
            continue
        bits = int(e.type[3:])
        q = inits.get(f"{e.name}.q{bits}")
        if q is None:
            continue
        seen.add(e.type)
        packed, scales = numpy_helper.to_array(q, str(r.path / "onnx")), numpy_helper.to_array(
            inits[f"{e.name}.scales"], str(r.path / "onnx"))
        written = W.int_dequant(packed.reshape(scales.shape[0], scales.shape[1], -1), scales, bits)
        np.testing.assert_array_equal(written, qd(e.name, _checkpoint_weight(src, e.name), e.type).numpy())
    assert seen
    src.checkpoint.close()
    rep = api.validate(r.validate_as, "tiny-31b", windows=2, prompts=2, new_tokens=16, towers=False, write=False)
    assert rep.logits is not None and rep.logits.kld_mean < 0.05, rep.failures
