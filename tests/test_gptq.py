"""GPTQ's error feedback (quant.weighted.gptq) over the targets' own block formats, and the inputs' second moments
it runs on (quant.calibrate, hessians=True): in format, equal to the plain search where the inputs are
uncorrelated, lower output error where they are not, and the same whatever the row blocks."""

from __future__ import annotations

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.quant import calibrate as cal
from gemma4_export.quant.weighted import (Hessian, gptq, int_blocks, int_dequant, mlx_affine, mlx_dequant,
                                          weighted_error)


def _correlated(rows=16, cols=256, tokens=2000, seed=0):
    """A weight and inputs whose channels are strongly correlated (a few shared factors, as activations are)."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((tokens, 8))
    x = factors @ rng.standard_normal((8, cols)) + 0.3 * rng.standard_normal((tokens, cols))
    x *= np.exp(0.7 * rng.standard_normal(cols))  # uneven channel scales
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    h = (x.T @ x).astype(np.float32)
    return w, x, h


def _hessian(h, block=None):
    cols = h.shape[0]
    b = block or cols
    blocks = np.zeros((1, cols // b, b, b), np.float32)
    for k in range(cols // b):
        blocks[0, k] = h[k * b:(k + 1) * b, k * b:(k + 1) * b]
    return Hessian(blocks, cols)


def _out_err(w, deq, x):
    return float((((w - deq).astype(np.float64) @ x.T) ** 2).sum())


def _onnx(w, imp, hess=None, mats=None):
    return int_dequant(*int_blocks(w, imp, 4, 32, hess, mats), 4)


def _mlx(w, imp, hess=None, mats=None):
    return mlx_dequant(*mlx_affine(w, imp, 4, 64, hess, mats), 4, 64)


@pytest.mark.parametrize("quant", [lambda w, imp, hess=None: int_blocks(w, imp, 4, 32, hess),
                                   lambda w, imp, hess=None: mlx_affine(w, imp, 4, 64, hess)], ids=["onnx", "mlx"])
def test_uncorrelated_inputs_give_the_plain_search(quant):
    """With a diagonal Hessian nothing is fed back: the codes are those of the importance-weighted search alone, and
    the refit of the scales (and biases) can only lower the weighted error."""
    w, x, h = _correlated()
    d = np.diag(np.diag(h))
    imp = np.diag(h) / len(x)
    fed, plain = quant(w, imp, _hessian(d)), quant(w, imp)
    np.testing.assert_array_equal(fed[0], plain[0])
    deq = [int_dequant(*q, 4) if len(q) == 2 else mlx_dequant(*q, 4, 64) for q in (fed, plain)]
    assert weighted_error(w, deq[0], imp) <= weighted_error(w, deq[1], imp)


@pytest.mark.parametrize("fmt", [_onnx, _mlx])
def test_refit_lowers_the_output_error(fmt, monkeypatch):
    """Refitting the scales (and biases) to the layer's output once every code is fixed lowers the output error
    below GPTQ's own choice of them, row by row never raising it."""
    from gemma4_export.quant import weighted

    w, x, h = _correlated(rows=32)
    imp = np.diag(h) / len(x)
    hess = _hessian(h)
    refit = fmt(w, imp, hess)
    monkeypatch.setattr(weighted, "refit_groups", lambda w, q, s, b, *a, **k: (s, b))
    alone = fmt(w, imp, hess)
    rows = [[_out_err(w[r:r + 1], d[r:r + 1], x) for r in range(len(w))] for d in (refit, alone)]
    assert all(a <= b * (1 + 1e-6) for a, b in zip(*rows))
    assert sum(rows[0]) < 0.7 * sum(rows[1])


@pytest.mark.parametrize("fmt", [_onnx, _mlx])
def test_feedback_lowers_the_output_error(fmt):
    """On correlated inputs the layer's output error sum |(W - Wq) x|^2 drops well below the diagonal search's, and
    a Hessian kept only in blocks keeps part of the gain."""
    w, x, h = _correlated()
    imp = np.diag(h) / len(x)
    plain = _out_err(w, fmt(w, imp), x)
    full = _out_err(w, fmt(w, imp, _hessian(h)), x)
    halves = _out_err(w, fmt(w, imp, _hessian(h, 128)), x)  # two blocks of two mlx groups or four int4 blocks
    assert full < 0.7 * plain
    assert full < halves < plain


def test_row_blocks_and_experts_give_the_same_result():
    """Rows are independent: two row blocks give the whole matrix's result, and rows of two experts with their own
    Hessians (`mats`) give what each expert's own call gives."""
    w, x, h = _correlated(rows=12)
    imp = np.diag(h) / len(x)
    hess = _hessian(h)
    whole = int_blocks(w, imp, 4, 32, hess)
    top, bottom = int_blocks(w[:5], imp, 4, 32, hess), int_blocks(w[5:], imp, 4, 32, hess)
    for k in range(2):
        np.testing.assert_array_equal(whole[k], np.concatenate([top[k], bottom[k]]))
    _, x2, h2 = _correlated(seed=1)
    both = Hessian(np.stack([h[None], h2[None]]), 256)
    imps = np.stack([imp, np.diag(h2) / len(x2)])
    mats = np.repeat([0, 1], 6)
    got = mlx_affine(w, imps[mats], 4, 32, both, mats)
    for e in range(2):
        one = mlx_affine(w[6 * e:6 * e + 6], imps[e], 4, 32, _hessian([h, h2][e]))
        for k in range(3):
            np.testing.assert_array_equal(got[k][6 * e:6 * e + 6], one[k])
    side = both.side_by_side()  # the two matrices' columns side by side: each block only within its own
    assert [s for s, _ in side.factors(0)] == [0, 256]


def test_gptq_refuses_blocks_that_split_a_group():
    w, x, h = _correlated()
    with pytest.raises(ValueError):
        gptq(w, _hessian(h, 64).factors(0), 256, lambda wg, first: ((wg,), wg))


def test_hessians_follow_the_budget():
    """One Hessian per distinct input (q, k and v share theirs), blocks as wide as the budget allows, and expert
    tensors only where theirs fit too."""
    widths = {"blk.0.attn_q.weight": (1, 1536), "blk.0.attn_k.weight": (1, 1536), "blk.0.attn_v.weight": (1, 1536),
              "blk.0.ffn_down.weight": (1, 12288), "blk.0.ffn_down_exps.weight": (8, 704)}
    assert cal.hessian_plan(widths, 1 << 40) == (12288, set(widths))  # everything whole
    whole = (1536 ** 2 + 12288 ** 2 + 8 * 704 ** 2) * 4
    assert cal.hessian_plan(widths, whole) == (12288, set(widths))  # q, k and v counted once
    b, names = cal.hessian_plan(widths, 200 << 20)
    assert b in cal.HESSIAN_BLOCKS and b < 12288 and names == set(widths)
    assert (1536 + 12288 + 8 * 704) * b * 4 <= 200 << 20
    b, names = cal.hessian_plan({**widths, "blk.0.ffn_gate_up_exps.weight": (128, 2816)}, 200 << 20)
    assert names == {n for n in widths if "exps" not in n}  # 128 experts' Hessians do not fit: diagonal only


def test_second_moments_hold_the_imatrix_on_their_diagonal(tmp_path, monkeypatch):
    """The collected Hessians (dense and expert matrices) have the imatrix's sums on their diagonal, are
    symmetric, and come back equal from the cache, read one matrix at a time (a damaged cache file is measured
    again); a small budget splits them into blocks."""
    monkeypatch.setenv("GEMMA4_EXPORT_CACHE", str(tmp_path))
    src = api.open_source("tiny-26b-a4b", need_weights=True)
    calib = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=128, chunks=2)
    whole = None  # the unblocked statistics, to compare the cache with
    for budget, blocked in ((cal.HESSIAN_BUDGET, False), (1 << 19, True)):
        imp = cal.collect(src, calib, hessians=True, budget=budget)
        if whole is None:
            whole = imp
        dense = {k for k in imp.sums if "exps" not in k}
        assert set(imp.hessians) == (dense if blocked else set(imp.sums))  # a small budget leaves the experts out
        for name, (h, width) in imp.hessians.items():
            n_mat, nb, b, _ = h.shape
            assert n_mat == imp.sums[name].shape[0] and width == imp.sums[name].shape[1]
            assert (b < width) == blocked or width <= 128
            diag = np.concatenate([np.diag(h[m, k]) for m in range(n_mat) for k in range(nb)]).reshape(n_mat, -1)
            np.testing.assert_allclose(diag[:, :width], imp.sums[name], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(h, np.swapaxes(h, -1, -2), rtol=1e-5, atol=1e-5)
    imp = cal.importance_for(src, chunk=128, chunks=2, hessians=True)
    q, k = (imp.hessians[f"blk.0.attn_{r}.weight"][0] for r in "qk")
    assert q is k  # one array for a shared input
    for damaged in (False, True):
        again = cal.importance_for(src, chunk=128, chunks=2, hessians=True)
        assert bool(again.meta.get("cached")) != damaged and again.hessian_block == imp.hessian_block
        assert set(again.hessians) == set(whole.hessians)
        for name, (h, w) in whole.hessians.items():
            stored = again.hessians[name][0]
            assert isinstance(stored, cal.StoredArray) and w == again.hessians[name][1]  # not read yet
            np.testing.assert_allclose(again.hessian(name).blocks, h, rtol=1e-6, atol=1e-6)
        assert again.hessians["blk.0.attn_v.weight"][0] is again.hessians["blk.0.attn_q.weight"][0]
        path = again.hessians["blk.0.attn_q.weight"][0].path
        with open(path, "r+b") as f:  # cut off the last tensor's bytes
            f.truncate(path.stat().st_size - 4)
    src.checkpoint.close()


def test_second_moments_go_to_the_cache_as_each_layer_ends(tmp_path, monkeypatch):
    """Calibrating writes each layer's second moments to the cache file when that layer is done (the streamed model
    runs every chunk through a layer before the next), so it holds one layer's, not all; the file equals the
    in-memory collection. A write that fails (a full disk) keeps them in memory instead, equal too, and leaves no
    file behind."""
    import errno

    from gemma4_export.progress import Silent
    from gemma4_export.validate.streamed import StreamedModel

    src = api.open_source("tiny-e2b", need_weights=True)  # PLE projection, KV-shared layers, a tied head
    calib = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=128, chunks=2)
    memory = cal.collect(src, calib, hessians=True)
    events: list[tuple[str, object]] = []
    run_layer, write = StreamedModel.run_layer, cal._HessianFile.write
    monkeypatch.setattr(StreamedModel, "run_layer", lambda self, i, *a: (events.append(("run", i)),
                                                                         run_layer(self, i, *a))[1])

    def logged(self, key, h):
        events.append(("write", key))
        return write(self, key, h)
    monkeypatch.setattr(cal._HessianFile, "write", logged)
    final = tmp_path / "h.safetensors"
    imp = cal.collect(src, calib, hessians=True, hessian_path=final)
    assert set(imp.hessians) == set(memory.hessians) and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    for name, (h, width) in imp.hessians.items():
        assert isinstance(h, cal.StoredArray) and h.path == final and width == memory.hessians[name][1]
        np.testing.assert_array_equal(h.load(), memory.hessians[name][0])
    layer_of = {}  # key -> the layer that ran last before it was written
    last = None
    for kind, v in events:
        if kind == "run":
            last = v
        else:
            layer_of[v] = last
    n_layers = src.arch.num_layers
    for key, at in layer_of.items():
        if key.startswith("blk."):
            assert at == int(key.split(".")[1]), (key, at)  # right after its own layer, before the next runs
        elif key == "per_layer_model_proj.weight":
            assert at == 0  # it reads the embeddings, before the first layer
        else:
            assert key == "token_embd.weight" and at == n_layers - 1  # the head, after the last
    assert {k.split(".")[1] for k in layer_of if k.startswith("blk.")} == {str(i) for i in range(n_layers)}

    notes, calls = [], []

    class Notes(Silent):
        def note(self, text):
            notes.append(text)

    def full(self, key, h):
        calls.append(key)
        if len(calls) == 8:  # in the second layer's writes: the first layer's are in the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, key, h)
    monkeypatch.setattr(cal._HessianFile, "write", full)
    final.unlink()
    imp = cal.collect(src, calib, reporter=Notes(), hessians=True, hessian_path=final)
    assert len(notes) == 1 and "kept in memory" in notes[0] and "No space" in notes[0]
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the partial file
    assert len(calls) == 8 and calls[-1].startswith("blk.1.") and "blk.0.ffn_down.weight" in calls
    for name, (h, _) in imp.hessians.items():
        assert isinstance(h, np.ndarray)
        np.testing.assert_array_equal(h, memory.hessians[name][0])
    assert imp.hessians["blk.0.attn_q.weight"][0] is imp.hessians["blk.0.attn_k.weight"][0]
    monkeypatch.setattr(cal._HessianFile, "write", write)
    stored = cal.read_hessians(cal.write_hessians(imp, final))  # those held in memory, written in the same format
    assert stored.keys() == imp.hessians.keys() and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    for name, (h, width) in stored.items():
        assert width == imp.hessians[name][1]
        np.testing.assert_array_equal(h.load(), imp.hessians[name][0])
    src.checkpoint.close()


def test_chunk_groups_add_up_to_one_pass(tmp_path, monkeypatch):
    """Calibrating the chunks in groups (each group's sequences held at once, the model read once per group) gives
    the one pass's statistics: the same sums and counts, the same second moments where they stay in memory, and to
    float32 rounding where each group's are added to the cache file's. The groups are as few as keep the sequences
    under GROUP_BYTES, or under one layer's weights where that is more. A write failing in a later group keeps the
    statistics in memory, whole."""
    import errno

    from gemma4_export.progress import Silent
    from gemma4_export.validate.streamed import StreamedModel

    src = api.open_source("tiny-e2b", need_weights=True)  # PLE projection, KV-shared layers, a tied head
    calib = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=128, chunks=4)
    one = cal.collect(src, calib, hessians=True)
    starts: list[int] = []
    start = StreamedModel.start
    monkeypatch.setattr(StreamedModel, "start", lambda self, seqs, *a, **k: (starts.append(len(seqs)),
                                                                            start(self, seqs, *a, **k))[1])

    def same(imp, exact):
        assert imp.hessians.keys() == one.hessians.keys() and imp.sums.keys() == one.sums.keys()
        for name in one.sums:
            np.testing.assert_array_equal(imp.counts[name], one.counts[name])
            np.testing.assert_allclose(imp.sums[name], one.sums[name], rtol=1e-6)
        for name, (h, width) in one.hessians.items():
            got = imp.hessians[name][0]
            got = got.load() if isinstance(got, cal.StoredArray) else got
            if exact:
                np.testing.assert_array_equal(got, h)
            else:
                np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-6 * np.abs(h).max())
                assert not np.array_equal(got, np.zeros_like(got))

    same(cal.collect(src, calib, hessians=True, groups=3), exact=True)
    assert starts == [1, 2, 1]
    path = tmp_path / "h.safetensors"
    same(cal.collect(src, calib, hessians=True, hessian_path=path, groups=3), exact=False)
    assert starts[3:] == [1, 2, 1] and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    model = StreamedModel(src.checkpoint.dir)  # the rule: each group's chunks under the bound, or half a layer
    small = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=64, chunks=8)
    chunk = model.token_bytes() * 64
    assert model.token_bytes() > 4 * 256 * 11  # hidden + 10 layers' PLE
    assert chunk < model.layer_bytes() // 2 < 2 * chunk  # half a layer holds one chunk, not two
    for bound, sizes in ((8 * chunk, [8]), (4 * chunk, [4, 4]), (3 * chunk, [3, 2, 3]), (3 * chunk - 1, [2] * 4),
                         (1, [1] * 8)):  # the last: by half the layer
        monkeypatch.setattr(cal, "GROUP_BYTES", bound)
        del starts[:]
        cal.collect(src, small)
        assert starts == sizes, bound

    notes, calls = [], []

    class Notes(Silent):
        def note(self, text):
            notes.append(text)

    write = cal._HessianFile.write
    keys = len({cal._input_key(n) for n in one.hessians})

    def full(self, key, h):
        calls.append(key)
        if len(calls) == keys + 8:  # in the second group's writes, mid-layer
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, key, h)
    monkeypatch.setattr(cal._HessianFile, "write", full)
    path.unlink()
    imp = cal.collect(src, calib, reporter=Notes(), hessians=True, hessian_path=path, groups=2)
    assert len(notes) == 1 and "kept in memory" in notes[0] and list(tmp_path.iterdir()) == []
    assert len(calls) == keys + 8
    same(imp, exact=False)
    assert imp.hessians["blk.0.attn_q.weight"][0] is imp.hessians["blk.0.attn_k.weight"][0]
    src.checkpoint.close()


def test_a_real_layer_loses_less(tmp_path, monkeypatch):
    """tiny-31b's own weights and calibration activations: each attention and MLP matrix's output error on the
    calibration inputs (W - Wq) H (W - Wq)^T is lower with the feedback, at int4 blocks of 32, mlx 4-bit and
    ggml's Q4_K (whose 256-wide super-blocks are each a whole row here: the feedback runs in 32-channel steps)."""
    from gemma4_export.exporter.checkpoint import to_f32

    monkeypatch.setenv("GEMMA4_EXPORT_CACHE", str(tmp_path))
    src = api.open_source("tiny-31b", need_weights=True)
    imp = cal.importance_for(src, chunks=2, hessians=True)
    ck, prefix = src.checkpoint, src.checkpoint.text_prefix
    ratios = []
    for spec in ck.expected:
        if spec.layer != 2 or not spec.name.endswith("proj.weight"):
            continue
        hess = imp.hessian_for(spec.name, prefix)
        if hess is None:
            continue
        info = ck.info(spec.name)
        w = to_f32(ck.rows(spec.name, 0, info.shape[0]), info.dtype).reshape(info.shape)
        h = hess.blocks[0, 0].astype(np.float64)
        iv = imp.for_tensor(spec.name, prefix)[0]
        for fmt in (_onnx, _mlx, _ggml_q4_k):
            err = [float(np.einsum("ij,jk,ik->", w - d, h, w - d)) for d in (fmt(w, iv), fmt(w, iv, hess))]
            ratios.append(err[1] / err[0])
    ck.close()
    assert len(ratios) >= 15 and max(ratios) < 1 and np.median(ratios) < 0.8, ratios


def _ggml_q4_k(w, imp, hess=None):
    """ggml's Q4_K with the imatrix, as the GGUF export writes it: after GPTQ's feedback when given the Hessian."""
    pytest.importorskip("llama_cpp")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from gemma4_export.targets.ggml_quant import Quantizer

    with Quantizer() as q:
        rows = w if hess is None else q.gptq("Q4_K", w, imp, hess.factors(0))
        return dequantize(q.quantize("Q4_K", rows, imp), GGMLQuantizationType.Q4_K).reshape(w.shape)
