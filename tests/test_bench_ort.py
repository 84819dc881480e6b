"""scripts/bench_ort.py: onnxruntime's own quantizers on our graph, as the quality benchmark compares them with ours.
The artifact must differ from the round-to-nearest one in the 4-bit linears alone, and run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from gemma4_export import api  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_ort import quantize_with_onnxruntime  # noqa: E402

GRAPH = "onnx/decoder_model_merged_q4.onnx"


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from gemma4_export.validate.onnxrt import ONNXRunner

    r = ONNXRunner(path)
    t = ids.shape[1]
    logits, _ = r.run(ids, np.ones((1, t), np.int64), np.arange(t)[None], r.empty_cache())
    return logits[0]


def test_hqq_changes_the_4bit_linears_alone(tmp_path):
    rtn = api.export("onnx", variant="tiny-e2b", preset="int4", out=tmp_path / "rtn", calibrate=False, towers=False)
    fp32 = api.export("onnx", variant="tiny-e2b", preset="fp32", out=tmp_path / "fp32", towers=False)
    out = quantize_with_onnxruntime("hqq", rtn.path, fp32.path, tmp_path / "hqq" / rtn.path.name)

    old = onnx.load(str(rtn.path / GRAPH))
    new = onnx.load(str(out / GRAPH))
    four = {n.output[0] for n in old.graph.node if n.op_type == "MatMulNBits"
            and any(a.name == "bits" and a.i == 4 for a in n.attribute)}
    assert len(four) > 20
    changed = {n.output[0]: n for n in new.graph.node if n.output and n.output[0] in four}
    for n in changed.values():  # onnxruntime's HQQ: blocks of 64 with float zero points
        attrs = {a.name: a.i for a in n.attribute}
        assert n.op_type == "MatMulNBits" and attrs["bits"] == 4 and attrs["block_size"] == 64 and len(n.input) == 4
    assert len(changed) == len(four)

    # every other node and initializer as in the round-to-nearest graph, byte for byte
    rest = [n for n in old.graph.node if not (n.output and n.output[0] in four)]
    assert [n.SerializeToString() for n in rest] == \
        [n.SerializeToString() for n in new.graph.node if not (n.output and n.output[0] in four)]
    used_by_four = {i for n in old.graph.node if n.output and n.output[0] in four for i in n.input[1:]}

    def content(t):  # type, shape and bytes (onnx's save marks data_location explicitly: the same tensor)
        return t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes()
    old_inits = {t.name: content(t) for t in old.graph.initializer if t.name not in used_by_four}
    new_inits = {t.name: content(t) for t in new.graph.initializer}
    assert old_inits and all(new_inits.get(k) == v for k, v in old_inits.items())
    emb = "onnx/embed_tokens_q4.onnx_data"
    assert (out / emb).read_bytes() == (rtn.path / emb).read_bytes()

    # it runs, as close to the fp32 graph as round-to-nearest is (a different 4-bit rounding, not a broken one)
    ids = np.array([[2, 10, 20, 30, 40, 50, 60, 70]], np.int64)
    ref, q_rtn, q_hqq = (_logits(p, ids) for p in (fp32.path, rtn.path, out))
    e_rtn, e_hqq = (float(np.abs(q - ref).mean()) for q in (q_rtn, q_hqq))
    assert 0 < e_hqq < 2 * e_rtn, (e_hqq, e_rtn)

    # the combined graph (embedding and decoder in one) reads the new decoder's weights and gives the same logits
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "onnx/model_q4.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif i.name == "num_logits_to_keep":
            feeds[i.name] = np.array(0, np.int64)
        else:
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    combined = sess.run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(combined, q_hqq, rtol=0, atol=1e-4)


def test_the_experts_in_if_branches_are_reached(tmp_path):
    """tiny-26b-a4b's experts sit in If branches: HQQ's graph has them as MatMul too; the algorithms that walk the
    main graph only (k-quant, GPTQ) get the main graph's linears, and the experts stay round-to-nearest."""
    from bench_ort import _all_graphs, _as_matmuls

    rtn = api.export("onnx", variant="tiny-26b-a4b", preset="int4", out=tmp_path / "rtn", calibrate=False,
                     towers=False)
    fp32 = api.export("onnx", variant="tiny-26b-a4b", preset="fp32", out=tmp_path / "fp32", towers=False)

    def four_bit(graph) -> int:
        return sum(n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)
                   for n in graph.node)

    for nested in (True, False):
        q4 = onnx.load(str(rtn.path / GRAPH))
        fp = onnx.load(str(fp32.path / GRAPH.replace("_q4", "")))
        top, inner = four_bit(q4.graph), sum(four_bit(g) for g in list(_all_graphs(q4.graph))[1:])
        assert top > 0 and inner > 0
        blocks = {i for g in (list(_all_graphs(q4.graph)) if nested else [q4.graph]) for n in g.node
                  if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)
                  for i in n.input[1:]}
        replaced = _as_matmuls(q4, fp, nested)
        assert len(replaced) == top + (inner if nested else 0)
        graphs = list(_all_graphs(q4.graph))
        assert four_bit(graphs[0]) == 0 and sum(four_bit(g) for g in graphs[1:]) == (0 if nested else inner)
        # the float weights are the fp32 export's, transposed, and the replaced blocks' initializers are gone
        inits = {t.name for t in q4.graph.initializer}
        assert blocks and not blocks & inits
        assert sum(t.name.endswith(".T") for t in q4.graph.initializer) == len(replaced)
