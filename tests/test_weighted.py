"""Importance-weighted quantizers: mlx's affine layout and onnxruntime's MatMulNBits layout reproduced exactly, and
the weighted search beating each runtime's own round-to-nearest on the weighted objective."""

import numpy as np
import pytest

from gemma4_export.quant.weighted import (
    int_blocks,
    int_dequant,
    mlx_affine,
    mlx_dequant,
    pack_mlx,
    unpack_mlx,
    weighted_error,
)
from gemma4_export.targets import bf16_bits


def _data(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * np.exp(0.5 * rng.standard_normal((rows, 1)))).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal(cols)).astype(np.float32)
    return w, imp


def _f32(bf16):
    return (bf16.astype(np.uint32) << 16).view(np.float32)


def _group_err(w, deq, imp, group):
    d = (w.astype(np.float64) - deq) ** 2 * (1.0 if imp is None else imp)
    return d.reshape(w.shape[0], -1, group).sum(-1)


# -- mlx ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pack_mlx_matches_mx_quantize(bits):
    mx = pytest.importorskip("mlx.core")
    w, _ = _data(6, 128)
    wq, s, b = mx.quantize(mx.array(w), group_size=32, bits=bits)
    s, b = np.array(s)[..., None], np.array(b)[..., None]
    q = np.clip(np.rint((w.reshape(6, 4, 32) - b) / s), 0, 2**bits - 1).reshape(6, 128).astype(np.uint8)
    assert np.array_equal(pack_mlx(q, bits), np.array(wq))
    assert np.array_equal(unpack_mlx(np.array(wq), bits), q)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_mx_dequantize_reads_our_triple(bits, group):
    mx = pytest.importorskip("mlx.core")
    w, imp = _data(8, 256, seed=bits)
    wq, s, b = mlx_affine(w, imp, bits, group)
    assert wq.dtype == np.uint32 and wq.shape == (8, 256 * bits // 32)
    assert s.dtype == b.dtype == np.uint16 and s.shape == b.shape == (8, 256 // group)
    deq = mlx_dequant(wq, s, b, bits, group)
    sb, bb = mx.array(s).view(mx.bfloat16), mx.array(b).view(mx.bfloat16)
    # with the bf16 values widened to float32, mlx computes exactly scale*q + bias
    ours32 = mx.dequantize(mx.array(wq), sb.astype(mx.float32), bb.astype(mx.float32), group_size=group, bits=bits)
    assert np.array_equal(np.array(ours32), deq)
    # as stored (bf16), mlx's result is ours up to bf16 arithmetic
    ours16 = np.array(mx.dequantize(mx.array(wq), sb, bb, group_size=group, bits=bits).astype(mx.float32))
    q = unpack_mlx(wq, bits).reshape(8, -1, group)
    bound = 2.0**-7 * (np.abs(_f32(s)[..., None] * q) + np.abs(_f32(b))[..., None]).reshape(8, 256) + 1e-30
    assert np.all(np.abs(ours16 - deq) <= bound)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (6, 64), (8, 128)])
def test_mlx_weighted_beats_mx_quantize(bits, group):
    mx = pytest.importorskip("mlx.core")
    w, imp = _data(16, 512, seed=bits + group)
    ref = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=group, bits=bits), group_size=group, bits=bits))
    deq = mlx_dequant(*mlx_affine(w, imp, bits, group), bits, group)
    assert weighted_error(w, deq, imp) < 0.8 * weighted_error(w, ref, imp)

    # never worse, group by group, than the min/max candidate (round-to-nearest, bf16-rounded), which is in the set
    nmax = 2**bits - 1
    g = w.reshape(16, -1, group)
    mn, mxv = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s0, b0 = _f32(bf16_bits((mxv - mn) / nmax)), _f32(bf16_bits(mn))
    q0 = np.clip(np.rint((g - b0) / s0), 0, nmax)
    minmax = (s0 * q0 + b0).reshape(w.shape)
    assert np.all(_group_err(w, deq, imp, group) <= _group_err(w, minmax, imp, group) * (1 + 1e-5) + 1e-12)

    # unweighted: no worse than mx.quantize's own (float32 scales) error
    plain = mlx_dequant(*mlx_affine(w, None, bits, group), bits, group)
    assert weighted_error(w, plain, None) <= weighted_error(w, ref, None)


def test_mlx_affine_degenerate_groups():
    w, imp = _data(4, 64)
    w[0] = 0.5  # constant groups
    w[1, :32] = 0.0
    imp[32:] = 0.0  # a group with no importance at all falls back to uniform weights
    wq, s, b = mlx_affine(w, imp, 4, 32)
    deq = mlx_dequant(wq, s, b, 4, 32)
    assert np.all(np.isfinite(deq))
    assert np.array_equal(deq[0], w[0]) and np.array_equal(deq[1, :32], w[1, :32])
    assert weighted_error(w[:, 32:], deq[:, 32:], None) < 0.1 * weighted_error(w[:, 32:], 0 * w[:, 32:], None)


# -- onnxruntime MatMulNBits -------------------------------------------------------------------------------------

def _ort_quantizer_bits():
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )
    return lambda bits: DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True,
                                                                                bits=bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_int_blocks_rtn_is_onnxruntime(bits):
    quantizer = _ort_quantizer_bits()(bits)
    w, _ = _data(48, 256, seed=3)
    w[0, :32] = 0.0  # all-zero block
    w[1, :32] = np.linspace(-1, 1, 32)  # |max| == |min|: onnxruntime takes the min
    w[2] = np.round(w[2] * 4) / 4  # exact halves after scaling
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(w.T))
    ours_p, ours_s = int_blocks(w, None, bits)
    assert ours_p.shape == packed.shape and ours_p.dtype == np.uint8
    assert np.array_equal(ours_p, packed)
    assert np.array_equal(ours_s.view(np.uint32), scales.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("bits", [4, 8])
def test_int_blocks_weighted_beats_rtn(bits):
    w, imp = _data(32, 256, seed=4)
    rtn = int_dequant(*int_blocks(w, None, bits), bits)
    deq = int_dequant(*int_blocks(w, imp, bits), bits)
    assert weighted_error(w, deq, imp) < 0.8 * weighted_error(w, rtn, imp)
    assert np.all(_group_err(w, deq, imp, 32) <= _group_err(w, rtn, imp, 32) * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_blocks_run_in_matmulnbits(bits):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w, imp = _data(24, 128, seed=5)
    packed, scales = int_blocks(w, imp, bits)
    rows, cols = w.shape
    node = helper.make_node("MatMulNBits", ["x", "wq", "scales"], ["y"], domain="com.microsoft", K=cols, N=rows,
                            bits=bits, block_size=32)
    graph = helper.make_graph(
        [node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(packed, "wq"), numpy_helper.from_array(scales, "scales")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(6).standard_normal((5, cols)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ int_dequant(packed, scales, bits).T.astype(np.float64)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bad_input():
    w, imp = _data(2, 64)
    with pytest.raises(ValueError):
        int_blocks(w, -imp, 4)
    with pytest.raises(ValueError):
        mlx_affine(w[:, :48], None, 4, 32)
    with pytest.raises(ValueError):
        mlx_affine(w, None, 7, 32)


def test_per_row_importance_equals_quantizing_each_row_group_alone():
    """An expert tensor's rows carry their expert's own statistics: one call with an importance vector per row
    gives what separate calls per expert give."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal((2, 64))).astype(np.float32)
    rows = np.repeat(imp, 4, axis=0)
    p, s = int_blocks(w, rows, 4)
    for e in range(2):
        pe, se = int_blocks(w[4 * e: 4 * e + 4], imp[e], 4)
        np.testing.assert_array_equal(p[4 * e: 4 * e + 4], pe)
        np.testing.assert_array_equal(s[4 * e: 4 * e + 4], se)
    pytest.importorskip("mlx.core")
    q, sc, b = mlx_affine(w, rows, 4, 32)
    for e in range(2):
        qe, se, be = mlx_affine(w[4 * e: 4 * e + 4], imp[e], 4, 32)
        np.testing.assert_array_equal(q[4 * e: 4 * e + 4], qe)
        np.testing.assert_array_equal(sc[4 * e: 4 * e + 4], se)
