"""Measured sensitivity and the mixed-precision choice under a size budget."""

from __future__ import annotations

import itertools

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
    with pytest.raises(QuantError, match="GGUF types"):
        api.plan("tiny-31b", "mlx", "4bit", target_bpw=5.0)
    size = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path, max_size=4_500_000)
    assert size.path.stat().st_size <= 4_500_000 and size.path.name == "tiny-31b-q4_k_m-4.5MB.gguf"
