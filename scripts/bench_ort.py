"""onnxruntime's own weight-only quantizers (HQQ, k-quant, GPTQ) on our ONNX graphs, for scripts/bench_quality.py.

onnxruntime's `MatMulNBitsQuantizer` rewrites MatMul nodes whose second input is a float initializer. Our graphs
have none: a float linear is `Gemm(x, W, transB=1)`, a quantized one MatMulNBits from the start. So the artifact it
quantizes is made from two of ours, both exported from the same checkpoint:
  - the int4 directory made `--no-calibrate` (onnxruntime's round-to-nearest, the benchmark's baseline), for the
    graph, the lookup tables and every 8-bit tensor;
  - the fp32 directory, for the float weights: each 4-bit MatMulNBits of the decoder becomes `MatMul(x, W^T)` with
    the fp32 export's W (the same node name in both graphs), and onnxruntime's quantizer turns those back into
    MatMulNBits with its own algorithm.
Everything but the 4-bit linears is byte for byte the round-to-nearest artifact, so a row differs from the baseline
in the algorithm alone. GPTQ reads the decoder's inputs from the fp32 embedding graph on the calibration tokens
ours uses (the shipped calibration set), so both calibrations see the same activations at the decoder's input.

The directory's combined graph (model_q4.onnx: embedding and decoder in one) is rewritten to reference the new
decoder's weights, so the directory stays whole and its size counts what it would ship.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

DECODER, EMBED, COMBINED = "decoder_model_merged", "embed_tokens", "model"


def _graphs(d: Path, suffix: str) -> dict[str, Path]:
    return {k: d / "onnx" / f"{k}{suffix}.onnx" for k in (DECODER, EMBED, COMBINED)}


def _all_graphs(graph):
    """A graph and every graph nested in its nodes (the If branches that hold the MoE experts)."""
    import onnx

    yield graph
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_graphs(g)


def _float_linears(model) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """fp32 graph: node name -> its Gemm(x, W, transB=1) node, at any depth, and the weights they read."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    gemms = {}
    for g in _all_graphs(model.graph):
        for n in g.node:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            if n.op_type == "Gemm" and len(n.input) == 2 and trans_b == 1 and n.input[1] in inits:
                gemms[n.name] = n
    used = {g.input[1] for g in gemms.values()}
    return gemms, {k: numpy_helper.to_array(v) for k, v in inits.items() if k in used}


def _keep_used(model, dropped: set[str]) -> None:
    """Drop the main graph's initializers in `dropped` that no node, at any depth, reads any more."""
    used = {i for g in _all_graphs(model.graph) for n in g.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _as_matmuls(q4, fp32, nested: bool = True) -> list[str]:
    """In graph `q4`, replace every 4-bit MatMulNBits that is a Gemm in `fp32` by MatMul(x, W^T) on fp32's W, and drop
    the initializers only they used. Returns the nodes' names (onnxruntime's quantizer takes these; it may rename a
    node it quantizes, so the rest of this module follows a node by its output). Nodes are replaced in place, so
    the nested graphs being walked stay the graph's own. `nested=False`: the main graph's nodes only."""
    from onnx import helper, numpy_helper

    gemms, weights = _float_linears(fp32)
    done, dropped = [], set()
    for graph in list(_all_graphs(q4.graph)) if nested else [q4.graph]:
        for n in graph.node:
            bits = next((a.i for a in n.attribute if a.name == "bits"), None)
            g = gemms.get(n.name)
            if n.op_type != "MatMulNBits" or bits != 4 or g is None:
                continue
            w = weights[g.input[1]]
            k = next(a.i for a in n.attribute if a.name == "K")
            if w.shape[1] != k:
                raise ValueError(f"{n.name}: fp32 weight {w.shape} against K={k}")
            wt = g.input[1] + ".T"
            q4.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), wt))
            dropped.update(n.input[1:])
            done.append(n.name)
            n.CopyFrom(helper.make_node("MatMul", [n.input[0], wt], list(n.output), name=n.name))
    _keep_used(q4, dropped)
    return done


class _Feeds:
    """The decoder's inputs on each calibration chunk: the fp32 embedding graph's outputs, full attention mask,
    positions from 0, an empty KV cache, every position's logits. onnxruntime's CalibrationDataReader protocol
    (get_next, iteration)."""

    def __init__(self, embed_graph: Path, decoder, chunks: list[np.ndarray]):
        import onnxruntime as ort

        from gemma4_export.validate.onnxrt import providers_for

        self.items, sess = [], ort.InferenceSession(str(embed_graph), providers=providers_for("cpu"))
        names = [o.name for o in sess.get_outputs()]
        shapes = {i.name: i.type.tensor_type.shape for i in decoder.graph.input}
        for ids in chunks:
            ids = np.asarray(ids, np.int64)[None]
            feed = dict(zip(names, sess.run(None, {"input_ids": ids})))
            t = ids.shape[1]
            feed["attention_mask"] = np.ones((1, t), np.int64)
            feed["position_ids"] = np.arange(t, dtype=np.int64)[None]
            feed["num_logits_to_keep"] = np.array(0, np.int64)  # every position: a quantized head sees every token
            for name, shape in shapes.items():
                if name.startswith("past_key_values."):
                    dims = [d.dim_value for d in shape.dim]
                    feed[name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
            missing = set(shapes) - set(feed)
            if missing:
                raise ValueError(f"no calibration feed for the decoder's inputs {sorted(missing)}")
            self.items.append({k: feed[k] for k in shapes})
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item

    def __deepcopy__(self, memo):  # onnxruntime copies the reader before iterating; the arrays need no copy
        c = object.__new__(_Feeds)
        c.items, c.i = self.items, 0
        return c


ALGORITHMS = {
    # algorithm: (block size, symmetric). HQQ's zero points are float, as its scales: at blocks of 64 they take the
    # bytes our symmetric blocks of 32 give their scales alone, so the artifact is the same size. k-quant and GPTQ
    # are asymmetric with 4-bit zero points at blocks of 32: their linears 2.5% larger than ours (0.3-1.6% of
    # the tiny variants' directories).
    # GPTQ runs asymmetric, the quantizer's default: with is_symmetric=True onnxruntime 1.32 packs GPTQ's values by
    # quantizing them again with a scale of its own (quant_tensor's "uint" range, 2 max|q| / 15, where GPTQ's grid
    # step was 2 max|w| / 15 with eight levels below zero), which moves them by up to half a step: on a random
    # 256 x 64 matrix the output error went from 0.096 to 0.123, and tiny-e2b's KLD doubled (0.0072 against
    # round-to-nearest's 0.0034). The asymmetric packing gives GPTQ's values back exactly.
    # The third field: whether the algorithm reaches MatMuls nested in If branches (the MoE experts). HQQ does;
    # k-quant and GPTQ go through onnxruntime's copy of neural-compressor, which walks the main graph only, so there
    # the experts keep the round-to-nearest artifact's blocks.
    "hqq": (64, False, True),
    "k_quant": (32, False, False),
    "gptq": (32, False, False),
}


def quantize_with_onnxruntime(algo: str, rtn_dir: Path, fp32_dir: Path, out: Path,
                              calibration: list[np.ndarray] | None = None) -> Path:
    """Write `out`: the round-to-nearest int4 directory with its 4-bit linears quantized by onnxruntime's `algo`."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    block, sym, nested = ALGORITHMS[algo]
    src, f32 = _graphs(rtn_dir, "_q4"), _graphs(fp32_dir, "")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(rtn_dir, out)
    dst = _graphs(out, "_q4")
    q4, fp = onnx.load(str(src[DECODER])), onnx.load(str(f32[DECODER]))
    replaced = _as_matmuls(q4, fp, nested)
    outs = {n.output[0] for g in _all_graphs(q4.graph) for n in g.node if n.op_type == "MatMul" and n.name in replaced}
    del fp
    if algo == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif algo == "k_quant":
        cfg = mq.KQuantWeightOnlyQuantConfig()
    else:
        if not calibration:
            raise ValueError("GPTQ needs calibration chunks")
        cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(f32[EMBED], q4, calibration))
    qz = mq.MatMulNBitsQuantizer(q4, bits=4, block_size=block, is_symmetric=sym, nodes_to_include=replaced,
                                 algo_config=cfg)
    qz.process()
    model = qz.model.model
    left = [n.name for g in _all_graphs(model.graph) for n in g.node
            if n.output[0] in outs and n.op_type != "MatMulNBits"]
    if left:
        raise RuntimeError(f"onnxruntime's {algo} left {len(left)} linears unquantized, e.g. {left[0]}")
    for p in (dst[DECODER], dst[DECODER].with_name(dst[DECODER].name + "_data"), dst[COMBINED]):
        p.unlink(missing_ok=True)
    data = dst[DECODER].name + "_data"
    onnx.save_model(model, str(dst[DECODER]), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data)
    _rewrite_combined(src[COMBINED], dst[DECODER], dst[COMBINED], outs)
    return out


def _rewrite_combined(old: Path, decoder: Path, new: Path, outputs: set[str]) -> None:
    """The combined graph with the nodes that make `outputs` (at any depth) taken from the new decoder graph, and the
    initializers too (their external data: the decoder's file, as in the original)."""
    import onnx

    comb = onnx.load(str(old), load_external_data=False)
    dec = onnx.load(str(decoder), load_external_data=False)
    dec_nodes = {n.output[0]: n for g in _all_graphs(dec.graph) for n in g.node if n.output}
    dec_inits = {t.name: t for t in dec.graph.initializer}
    old_inputs = set()
    for g in list(_all_graphs(comb.graph)):
        for n in g.node:
            if n.output and n.output[0] in outputs:
                old_inputs.update(n.input[1:])
                n.CopyFrom(dec_nodes[n.output[0]])
    need = {i for o in outputs for i in dec_nodes[o].input[1:] if i}
    # the decoder's data file was written anew, so every tensor it holds moved: each initializer the decoder has is
    # taken from it (the embedding's, in their own file, stay)
    inits = [dec_inits.get(t.name, t) for t in comb.graph.initializer if t.name not in need]
    inits += [dec_inits[k] for k in sorted(need)]
    del comb.graph.initializer[:]
    comb.graph.initializer.extend(inits)
    _keep_used(comb, old_inputs)
    onnx.save_model(comb, str(new))
