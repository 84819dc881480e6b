"""QAT checkpoints on their 4-bit lattice (quant/lattice.py): detection, the codes each target writes, the plan, and
the exports validated in their runtimes: on the exactly-on-lattice form, the `qat` export of every target stays
within its float preset's limits, and the plain 4-bit exports do not."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MLX_QUANT_PROMPTS, MLX_QUANT_WINDOWS
from gemma4_export import api
from gemma4_export.quant import lattice as L
from gemma4_export.quant.weighted import _bf16_round, int_dequant, mlx_dequant


def _lattice(rows=64, cols=256, seed=0, levels=(-8, 7)):
    rng = np.random.default_rng(seed)
    d = np.exp(rng.normal(-6, 0.3, (rows, cols // 32))).astype(np.float32)
    k = rng.integers(levels[0], levels[1] + 1, (rows, cols)).astype(np.float32)
    return (k.reshape(rows, -1, 32) * d[..., None]).reshape(rows, cols), k, d


def test_detection_finds_the_lattice_and_its_steps():
    w, k, d = _lattice()
    kk, dd, on, err = L.fit_groups(w)
    assert on.all() and err.max() < 1e-4
    np.testing.assert_allclose((kk.reshape(64, -1, 32) * dd[..., None]).reshape(w.shape), w, rtol=1e-6, atol=0)
    # stored in bfloat16, as a QAT release is: still on it, within bf16 rounding
    f = L.measure(iter([_bf16_round(w)]), len(w))
    assert f.share == 1.0 and 0 < f.worst < L.TOL
    # integers 8..-7 are the same lattice with the step's sign flipped
    _, _, on, _ = L.fit_groups(-w)
    assert on.all()
    # groups of all zeros are on every lattice
    z = np.zeros((2, 64), np.float32)
    assert L.fit_groups(z)[2].all()


def test_detection_rejects_weights_off_the_lattice():
    rng = np.random.default_rng(1)
    g = rng.normal(0, 0.02, (128, 256)).astype(np.float32)
    f = L.measure(iter([g]), len(g))
    assert f.on == 0
    # 17 levels do not fit a 4-bit lattice, and a lattice of 5 bits is not one either
    w, _, _ = _lattice(levels=(-16, 15), seed=2)
    assert L.fit_groups(w)[2].mean() < 0.01
    # a tensor where one group in 8 is perturbed: the share says so
    w, _, d = _lattice(seed=3)
    w2 = w.copy()
    w2[:, ::256] += 0.45 * d[:, ::8]  # a value in one group in 8 moved to between two lattice points
    f = L.measure(iter([w2]), len(w2))
    assert abs(f.share - 7 / 8) < 1e-9


def test_q4_0_rule_is_not_the_trained_step():
    """Where the extremum is not -8 d, ggml's Q4_0 (extremum / -8) misses the trained step; the detection counts it."""
    w, k, d = _lattice(levels=(-7, 7), seed=4)  # no group reaches -8: the extremum is +-7 d
    f = L.measure(iter([w]), len(w))
    assert f.share == 1.0 and f.q4_0_rule == 0


def _codes_equal(deq, w):
    np.testing.assert_array_equal(deq.astype(np.float32), w.astype(np.float32))


def test_every_target_writes_the_lattice_exactly():
    """The exactly-on-lattice form (steps of 4 significant bits) is reproduced bit for bit by each target's format:
    GGUF Q4_0 (dequantized by the gguf package), MLX affine groups of 32, MatMulNBits blocks (fp32 and fp16 scales)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w, _, _ = _lattice(seed=5)
    s = L.snap(_bf16_round(w))
    assert np.array_equal(_bf16_round(s), s)
    q = L.q4_0_bytes(s)
    _codes_equal(dequantize(q.reshape(len(s), -1), GGMLQuantizationType.Q4_0).reshape(s.shape), s)
    wq, sc, bi = L.mlx_lattice(s)
    _codes_equal(mlx_dequant(wq, sc, bi, 4, 32), s)
    try:  # and as mlx itself dequantizes, in bfloat16: scale x q must be exact there too
        import mlx.core as mx
    except ImportError:
        mx = None
    if mx is not None:
        deq = mx.dequantize(mx.array(wq), mx.array(sc).view(mx.bfloat16), mx.array(bi).view(mx.bfloat16),
                            group_size=32, bits=4)
        _codes_equal(np.array(deq.astype(mx.float32)), s)
    packed, scales = L.int4_lattice(s)
    _codes_equal(int_dequant(packed, scales, 4), s)
    packed, scales = L.int4_lattice(s, L.f16_round)
    _codes_equal(int_dequant(packed, scales.astype(np.float16).astype(np.float32), 4), s)
    # plain Q4_0 of the same weights is not the lattice
    pytest.importorskip("llama_cpp")  # the gguf extra
    from gemma4_export.targets.ggml_quant import Quantizer

    with Quantizer(1) as qz:
        plain = qz.quantize("Q4_0", s)
    assert not np.array_equal(dequantize(plain.reshape(len(s), -1), GGMLQuantizationType.Q4_0).reshape(s.shape), s)


def test_snap_moves_nearly_on_lattice_weights_exactly_on_it():
    w, _, _ = _lattice(seed=6)
    s = L.snap(_bf16_round(w))
    _, _, on, err = L.fit_groups(s)
    assert on.all() and err.max() < 1e-5
    assert np.abs(s - w).max() < 0.05 * np.abs(w).max()


# ---- the plan ----------------------------------------------------------------------------------------------------

def test_plan_writes_the_qat_checkpoints_lattice_tensors_on_it():
    p = api.plan("tiny-e2b-qat", "gguf", "qat")
    lat = [e for e in p.kept if e.method == "lattice"]
    roles = {e.role for e in lat}
    assert lat and all(e.type == "Q4_0" and e.rule == "qat-lattice" for e in lat)
    assert roles >= {"attn_q", "attn_o", "mlp_gate", "mlp_down"} and "token_embd" not in roles
    assert all("on a 4-bit lattice" in e.reason for e in lat)
    by = p.by_name()
    assert by["model.language_model.embed_tokens.weight"].type == "Q6_K"  # off the lattice: the q4_0 policy
    assert p.qat["mode"] == "auto" and p.qat["tensors"]["model.language_model.embed_tokens.weight"]["on"] == 0
    # the same lattice tensors in every target's 4-bit form, none when turned off or on a plain checkpoint
    for target, t in (("mlx", "Q4G32"), ("onnx", "INT4")):
        q = api.plan("tiny-e2b-qat", target, "qat")
        assert {e.name for e in q.kept if e.method == "lattice"} == {e.name for e in lat}
        assert all(e.type == t for e in q.kept if e.method == "lattice")
    assert not any(e.method for e in api.plan("tiny-e2b-qat", "gguf", "qat", qat="off").kept)
    assert not any(e.method for e in api.plan("tiny-e2b", "gguf", "q4_k_m").kept)
    # in a 4-bit preset the lattice is used automatically; not in an 8-bit one
    assert any(e.method for e in api.plan("tiny-e2b-qat", "gguf", "q4_k_m").kept)
    assert not any(e.method for e in api.plan("tiny-e2b-qat", "gguf", "q8_0").kept)
    j = p.to_json()
    assert j["qat"]["tensors"] and sum(1 for t in j["tensors"] if t.get("method") == "lattice") == len(lat)


def test_qat_modes_decide_a_tensor_nearly_on_the_lattice():
    """auto takes a tensor with at least AUTO_SHARE of its groups on the lattice; on takes any with some; off none;
    and a plan's reason says how far a tensor is from it."""
    from gemma4_export.quant.plan import qat_choice
    from gemma4_export.quant.rules import get_preset
    from gemma4_export.targets.registry import get_target

    p, t = get_preset("qat", "gguf"), get_target("gguf")
    nearly = L.LatticeFit(groups=1000, on=950, q4_0_rule=400, worst=0.04, rows_read=10, rows=10)
    full = L.LatticeFit(groups=1000, on=1000, q4_0_rule=400, worst=0.04, rows_read=10, rows=10)
    assert qat_choice(nearly, p, t, "auto") is None
    typ, rule, why, method = qat_choice(nearly, p, t, "on")
    assert (typ, rule, method) == ("Q4_0", "qat-lattice", "lattice")
    assert "95.00% of 1000 groups" in why and "worst value 0.040" in why and "Q4_0's rule" in why
    assert qat_choice(full, p, t, "auto")[0] == "Q4_0" and qat_choice(full, p, t, "off") is None
    assert qat_choice(full, get_preset("q8_0", "gguf"), t, "auto") is None


def test_qat_on_needs_a_four_bit_preset():
    from gemma4_export.errors import QuantError

    with pytest.raises(QuantError, match="not a 4-bit one"):
        api.plan("tiny-e2b-qat", "gguf", "q8_0", qat="on")
    with pytest.raises(QuantError, match="choose auto, on or off"):
        api.plan("tiny-e2b-qat", "gguf", "qat", qat="maybe")


def test_llama_cpps_quantizer_is_never_handed_a_lattice(tmp_path):
    """The staged conversion (the input of llama.cpp's own quantizer, the reference the one-pass writer is checked
    against) refuses a plan with lattice tensors instead of letting llama.cpp recompute their steps."""
    from gemma4_export.exporter.source import ModelSource
    from gemma4_export.progress import Silent
    from gemma4_export.quant.rules import get_preset
    from gemma4_export.targets import gguf as G

    src = ModelSource.open("tiny-e2b-qat")
    try:
        p = api.plan("tiny-e2b-qat", "gguf", "qat")
        with pytest.raises(G.ExportError, match="cannot write a QAT lattice"):
            G.convert(src.checkpoint, src, p, get_preset("qat", "gguf"), tmp_path / "staged.gguf", True, Silent())
    finally:
        src.checkpoint.close()


# MLX's qat preset keeps the tied head as trained (bf16: it is not on the lattice), where the 4bit preset makes it
# 8-bit; the plain 4-bit export it is held against keeps it too, so that both hold the same tensors in the same types
# off the lattice.
MLX_BF16_HEAD = [r"embed_tokens\.weight$=BF16"]


def test_the_qat_export_is_no_larger_than_plain_four_bit_with_groups_of_32():
    for target, plain in (("gguf", "q4_0"), ("onnx", "int4")):
        assert api.plan("tiny-e2b-qat", target, "qat").total_bytes <= api.plan("tiny-e2b-qat", target, plain,
                                                                                qat="off").total_bytes
    qat = api.plan("tiny-e2b-qat", "mlx", "qat")
    plain = api.plan("tiny-e2b-qat", "mlx", "4bit", qat="off", group_size=32, overrides=MLX_BF16_HEAD)
    assert qat.by_name()["model.language_model.embed_tokens.weight"].type == "BF16"
    assert qat.total_bytes <= plain.total_bytes


# ---- end to end, in the runtimes ---------------------------------------------------------------------------------

# Each target's float preset, whose limits a faithful export of an exactly-on-lattice checkpoint is held to (ONNX has
# no bf16 preset: its fp16 one), and its plain 4-bit preset, which is not faithful.
FLOAT_LIMITS = {"gguf": "bf16", "mlx": "bf16", "onnx": "fp16"}
PLAIN = {"gguf": "q4_0", "mlx": "4bit", "onnx": "int4"}


@pytest.fixture(scope="module")
def exact_forms(tmp_path_factory):
    from gemma4_export.exporter.variants import get_variant

    made = {}

    def exact(variant: str):
        if variant not in made:
            d = tmp_path_factory.mktemp("qat") / f"{variant}-exact"
            fits = L.snap_checkpoint(get_variant(variant).local_dir, d)
            assert sum(1 for f in fits.values() if f.share == 1.0) >= 50  # the trained matrices were on it already
            made[variant] = d
        return made[variant]
    return exact


def _mlx_float32_kld(path, ckpt) -> float:
    """Mean KLD of the MLX artifact against transformers on 200 held-out tokens, with mlx computing in float32: every
    bfloat16 parameter (scales and biases included) widened, so that what is measured is the artifact's weights, not
    mlx's bfloat16 arithmetic (its CPU quantized matmul accumulates in bfloat16: ten times a dense bf16 matmul's
    error on the same weights)."""
    import mlx.core as mx
    import torch
    import transformers
    from mlx.utils import tree_map

    from gemma4_export.validate.mlxrt import MLXRunner
    from gemma4_export.validate.texts import heldout_text

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = [2] + tok(heldout_text(), add_special_tokens=False)["input_ids"][:199]
    runner = MLXRunner(path)
    runner.model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.bfloat16 else p,
                                 runner.model.parameters()))
    got = torch.from_numpy(runner.logits(ids)).double()
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double()
    p = want.log_softmax(-1)
    return float((p.exp() * (p - got.log_softmax(-1))).sum(-1).mean())


def _gguf_weights_are_the_checkpoints(path, ckpt) -> None:
    """Every Q4_0 tensor of the GGUF, dequantized by the gguf package, equals the checkpoint's tensor exactly."""
    import torch  # noqa: F401 - safetensors' pt reader
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from gemma4_export.targets.gguf import gguf_name

    src = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if k.startswith("model.language_model."):
                    src[gguf_name(k, "model.language_model.")] = sf.get_tensor(k).float().numpy()
    n = 0
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name == "Q4_0":
            deq = dequantize(t.data, t.tensor_type)
            np.testing.assert_array_equal(deq, src[t.name].reshape(deq.shape), err_msg=t.name)
            n += 1
    assert n >= 50


@pytest.mark.slow
@pytest.mark.parametrize("target,variant", [("gguf", "tiny-e2b-qat"), ("mlx", "tiny-e2b-qat"), ("onnx", "tiny-e2b-qat"),
                                            ("gguf", "tiny-26b-a4b-qat"), ("onnx", "tiny-26b-a4b-qat")])
def test_faithful_export_of_a_lattice_checkpoint_is_lossless(target, variant, exact_forms, tmp_path):
    """The exactly-on-lattice form of each tiny QAT checkpoint (every tensor a 4-bit preset quantizes moved onto its
    lattice, steps of 4 significant bits): the qat export validates within the target's float preset's limits, and
    the plain 4-bit export of the same checkpoint (groups of 32) does not."""
    from gemma4_export.errors import Gemma4ExportError
    from gemma4_export.targets.registry import get_target
    from gemma4_export.validate.harness import check
    from gemma4_export.validate.thresholds import thresholds_for

    try:
        get_target(target).require()
    except Gemma4ExportError as e:  # the target's extra is not installed
        pytest.skip(str(e))
    exact_qat = exact_forms(variant)
    # mlx: the shorter evaluation of quantized MLX (conftest.MLX_QUANT_WINDOWS); the float32 comparison below holds
    # mlx's weights to the float limits on its own
    mlx = {"windows": MLX_QUANT_WINDOWS, "prompts": MLX_QUANT_PROMPTS}
    ref = api.reference(model_dir=exact_qat, **(mlx if target == "mlx" else {}))
    moe = "26b" in variant
    # llama.cpp multiplies quantized weights by activations rounded to 8 bits (Q8_0), and on the MoE model that
    # rounding flips expert choices whatever the weights: measured on this checkpoint, the bf16 GGUF 1.1e-4 KLD, the
    # q8_0 GGUF 1.6e-3, the qat GGUF (weights exact, read back below) 8.2e-4. So there the limits are q8_0's.
    limits = thresholds_for(target, "q8_0" if target == "gguf" and moe else FLOAT_LIMITS[target])
    faithful = api.export(target, model_dir=exact_qat, preset="qat", out=tmp_path, calibrate=False)
    assert all(e.method == "lattice" for e in faithful.plan.kept if not get_target(target).types[e.type].is_float)
    if target == "gguf":
        _gguf_weights_are_the_checkpoints(faithful.path, exact_qat)
    rep = api.validate(faithful.validate_as, model_dir=exact_qat, write=False, reference=ref)
    print(f"\n{target} qat: {faithful.bytes / 1e6:.3f} MB KLD {rep.logits.kld_mean:.3g} top-1 "
          f"{rep.logits.top1_agreement:.4f} greedy exact {rep.generation.exact_match_rate:.3f}")
    assert rep.passed, rep.failures
    plain = api.export(target, model_dir=exact_qat, preset=PLAIN[target], out=tmp_path, calibrate=False, qat="off",
                       **({"group_size": 32, "overrides": MLX_BF16_HEAD} if target == "mlx" else {}))
    rp = api.validate(plain.validate_as, model_dir=exact_qat, write=False, reference=ref)
    print(f"{target} {PLAIN[target]}: {plain.bytes / 1e6:.3f} MB KLD {rp.logits.kld_mean:.3g}")
    assert faithful.bytes <= plain.bytes
    if target != "mlx":
        assert check(rep, limits) == [], check(rep, limits)
        assert check(rp, limits), "a plain 4-bit export met the float limits: the test cannot tell the two apart"
        assert rp.logits.kld_mean > 5 * rep.logits.kld_mean
        return
    # mlx computes in bfloat16, and its CPU quantized matmul accumulates in bfloat16, so any quantized MLX model
    # is off by ~1e-3 KLD there whatever its weights (the bf16 preset, with dense matmuls, by 3e-4). The artifact's
    # weights are held to the float limits by running both exports with mlx computing in float32.
    kq, kp = _mlx_float32_kld(faithful.path, exact_qat), _mlx_float32_kld(plain.path, exact_qat)
    print(f"mlx, float32 compute: qat KLD {kq:.3g}, 4bit g32 KLD {kp:.3g}")
    assert kq < 1e-8 and kp > 1e-4
    assert rep.logits.kld_mean < rp.logits.kld_mean
