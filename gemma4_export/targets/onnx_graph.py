"""The Gemma 4 text decoder as an ONNX graph, built node by node while its weights stream to the external data file.

Standard ONNX operators throughout (opset 21), plus onnxruntime's MatMulNBits and GatherBlockQuantized for
block-quantized weights. Hidden states are kept as [tokens, hidden] (batch and sequence flattened) so every linear
layer is one Gemm against the checkpoint's own [out, in] layout (transB) or one MatMulNBits, whose packed weight is
also laid out by output row: both stream row blocks straight from the checkpoint.

What the graph holds, following transformers' Gemma 4:
- embeddings scaled by sqrt(hidden); per-layer embeddings (PLE): table lookup * sqrt(ple_dim) plus the normed model
  projection * hidden^-0.5, both * 2^-0.5, one slice per layer through the gate, GELU, projection and norm;
- attention with scaling 1, q/k RMSNorm with weight, v RMSNorm without, RoPE per layer type (proportional RoPE on
  full layers: only the first partial_rotary_factor of each half rotates), grouped-query heads, a causal mask from
  the attention_mask, a sliding window on sliding layers; K==V full layers take the key projection as values;
- a KV cache input and output for each layer that owns one; KV-shared layers attend over their donor's present
  keys and values;
- the MoE block lowered to standard operators: router (RMSNorm, scale, projection, softmax, top-k, renormalise,
  per-expert scale) at full precision, then every expert computed as one wide matrix product whose outputs are
  weighted by the (mostly zero) routing weights and summed by a second product. Compute follows the total expert
  count, not the active one, in exchange for plain operators that every onnxruntime provider runs;
- final norm, the tied output head, softcapping.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..exporter.arch import Gemma4Arch

OPSET = 21
MS_DOMAIN = "com.microsoft"
BLOCK = 32  # MatMulNBits / GatherBlockQuantized block along the input dimension
QUANT_BITS = {"INT4": 4, "INT8": 8}
MASKED = -1e30  # score of a masked key: finite, so a fully masked (padding) row stays finite
ALIGN, BIG_ALIGN = 64, 4096

RowBlocks = Callable[[], Iterator[np.ndarray]]  # yields float32 row blocks of an [out, in] matrix, in order


@dataclass
class WeightFile:
    """The external data file: each tensor is given an aligned region and written there, block by block."""

    fd: int
    location: str
    size: int = 0

    def reserve(self, nbytes: int) -> int:
        align = BIG_ALIGN if nbytes >= (1 << 20) else ALIGN
        off = -(-self.size // align) * align
        self.size = off + nbytes
        return off

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n


@dataclass
class QuantNode:
    """A quantized weight as the graph holds it, for the check against the plan."""

    source: str
    op: str
    bits: int


@dataclass
class Graph:
    weights: WeightFile
    advance: Callable[[int], None] = lambda n: None
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    quantized: list[QuantNode] = field(default_factory=list)
    _count: int = 0
    _consts: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)  # quantized weights written: name -> (data, scales, offset, bits)
    float_types: dict = field(default_factory=dict)  # float weights written: name -> FP32 / FP16

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        from onnx import helper

        outs = [self._name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        """A small constant, stored inside the model; identical constants are shared."""
        from onnx import numpy_helper

        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = self._name("const")
            self.initializers.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def external(self, name: str, onnx_type: int, shape: tuple[int, ...], nbytes: int, at: int | None = None) -> int:
        """Declare an initializer held in the external data file; returns its offset there. `at` declares a second
        view of bytes already written (same bytes, another shape), instead of reserving new ones."""
        from onnx import TensorProto

        off = self.weights.reserve(nbytes) if at is None else at
        t = TensorProto(name=name, data_type=onnx_type, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.weights.location), ("offset", str(off)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        return off

    # -- weights -----------------------------------------------------------------------------------------------
    def float_weight(self, name: str, shape: tuple[int, ...], blocks: RowBlocks, type_name: str) -> str:
        """A float initializer (FP32, or FP16 cast to float32 in the graph), written block by block."""
        from onnx import TensorProto

        from . import encode_float

        f16 = type_name == "FP16"
        size = 2 if f16 else 4
        self.float_types[name] = type_name
        off = self.external(name, TensorProto.FLOAT16 if f16 else TensorProto.FLOAT, shape,
                            int(np.prod(shape)) * size)
        for b in blocks():
            data = encode_float(b, "F16" if f16 else "F32").tobytes()
            self.weights.write(off, data)
            off += len(data)
            self.advance(len(data))
        return name

    def quant_weight(self, name: str, rows: int, cols: int, blocks: RowBlocks, bits: int,
                     table: bool = False) -> tuple[str, str]:
        """Block-quantize an [rows, cols] matrix with onnxruntime's own quantizer (symmetric, blocks of 32 along
        a row): packed uint8 [rows, cols/32, 32*bits/8] (MatMulNBits' layout; the same bytes as [rows,
        cols*bits/8] for a lookup table) and float32 scales [rows, cols/32]."""
        from onnx import TensorProto
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        q = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, bits=bits))
        kb, blob = cols // BLOCK, BLOCK * bits // 8
        qname, sname = f"{name}.q{bits}", f"{name}.scales"
        shape = (rows, kb * blob) if table else (rows, kb, blob)
        qoff = self.external(qname, TensorProto.UINT8, shape, rows * kb * blob)
        soff = self.external(sname, TensorProto.FLOAT, (rows, kb), rows * kb * 4)
        self.tables[name] = (qname, sname, qoff, bits)
        for b in blocks():
            packed, scales, _ = q.qbits_block_quant(np.ascontiguousarray(b.T))  # the quantizer takes [in, out]
            self.weights.write(qoff, packed.tobytes())
            self.weights.write(soff, scales.astype(np.float32).tobytes())
            qoff, soff = qoff + packed.nbytes, soff + scales.nbytes
            self.advance(packed.nbytes + scales.nbytes)
        return qname, sname

    # -- layers ------------------------------------------------------------------------------------------------
    def linear(self, x: str, name: str, out_f: int, in_f: int, blocks: RowBlocks, type_name: str) -> str:
        """x [T, in] @ W^T for a checkpoint weight W [out, in]."""
        hint = name.removesuffix(".weight")
        if type_name in QUANT_BITS:
            bits = QUANT_BITS[type_name]
            qn, sn = self.quant_weight(name, out_f, in_f, blocks, bits)
            self.quantized.append(QuantNode(name, "MatMulNBits", bits))
            return self.op("MatMulNBits", [x, qn, sn], hint, domain=MS_DOMAIN, K=in_f, N=out_f, bits=bits,
                           block_size=BLOCK)
        w = self.float_weight(name, (out_f, in_f), blocks, type_name)
        if type_name == "FP16":
            w = self.op("Cast", [w], hint + ".cast", to=1)
        return self.op("Gemm", [x, w], hint, transB=1)

    def tied_head(self, x: str, name: str, rows: int, cols: int) -> str:
        """x [T, cols] @ table^T, on the lookup table's own bytes: a quantized table's packing is MatMulNBits'
        (blocks of 32 along each row), so the head is a second view of the same bytes, not a second copy."""
        from onnx import TensorProto

        if name in self.tables:
            data, scales, off, bits = self.tables[name]
            kb, blob = cols // BLOCK, BLOCK * bits // 8
            view = f"{name}.head.q{bits}"
            self.external(view, TensorProto.UINT8, (rows, kb, blob), rows * kb * blob, at=off)
            self.quantized.append(QuantNode(name, "MatMulNBits", bits))
            return self.op("MatMulNBits", [x, view, scales], "head", domain=MS_DOMAIN, K=cols, N=rows, bits=bits,
                           block_size=BLOCK)
        w = name
        if self.float_types.get(name) == "FP16":
            w = self.op("Cast", [name], "head.cast", to=1)
        return self.op("Gemm", [x, w], "head", transB=1)

    def embedding(self, ids: str, name: str, rows: int, cols: int, blocks: RowBlocks, type_name: str) -> str:
        """Row lookup ids -> [..., cols] float32."""
        hint = name.removesuffix(".weight")
        if type_name in QUANT_BITS:
            bits = QUANT_BITS[type_name]
            qn, sn = self.quant_weight(name, rows, cols, blocks, bits, table=True)
            self.quantized.append(QuantNode(name, "GatherBlockQuantized", bits))
            return self.op("GatherBlockQuantized", [qn, ids, sn], hint, domain=MS_DOMAIN, bits=bits,
                           block_size=BLOCK, gather_axis=0, quantize_axis=1)
        w = self.float_weight(name, (rows, cols), blocks, type_name)
        g = self.op("Gather", [w, ids], hint)
        return self.op("Cast", [g], hint + ".cast", to=1) if type_name == "FP16" else g

    def rms_norm(self, x: str, weight: str | None, eps: float, hint: str) -> str:
        """x * (mean(x^2) + eps)^-0.5 [* weight], over the last axis, as transformers computes it."""
        sq = self.op("Mul", [x, x], hint + ".sq")
        mean = self.op("ReduceMean", [sq, self.ints(-1)], hint + ".mean", keepdims=1)
        inv = self.op("Pow", [self.op("Add", [mean, self.const(eps)], hint + ".eps"), self.const(-0.5)],
                      hint + ".rsqrt")
        y = self.op("Mul", [x, inv], hint + ".normed")
        return self.op("Mul", [y, weight], hint) if weight else y

    def gelu(self, x: str, hint: str) -> str:
        return self.op("Gelu", [x], hint, approximate="tanh")


def rope_inv_freq(head_dim: int, theta: float, rope_type: str, partial: float) -> np.ndarray:
    """Inverse frequencies for one layer type, as transformers computes them (float32, half the head dim)."""
    if rope_type == "proportional":
        angles = int(partial * head_dim // 2)
        rot = 1.0 / (theta ** (np.arange(0, 2 * angles, 2, dtype=np.float32) / head_dim))
        return np.concatenate([rot, np.zeros(head_dim // 2 - angles, np.float32)]).astype(np.float32)
    if rope_type == "default" and partial == 1.0:
        return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    from ..errors import Gemma4ExportError

    raise Gemma4ExportError(f"RoPE type {rope_type!r} with partial factor {partial} is not supported")


@dataclass
class Weights:
    """What the decoder builder asks of the export: each checkpoint tensor's plan type and its float32 rows."""

    type_of: Callable[[str], str]
    blocks: Callable[[str], RowBlocks]  # rows of the tensor as stored, flattened to [rows, last dim]
    vector: Callable[[str], np.ndarray]  # a small tensor (norm weights, scalars, router scales), float32
    expert_down: Callable[[str], RowBlocks]  # experts.down_proj [E, H, I] as [H, E*I] rows
    prefix: str


def cache_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key",
            f"present.{layer}.value")


def build_decoder(g: Graph, a: Gemma4Arch, w: Weights) -> None:
    """Add the whole decoder to g: inputs, nodes, outputs."""
    from onnx import TensorProto, helper

    p = w.prefix
    h = a.hidden_size
    g.inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                 helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
                 helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    owners = [i for i in range(a.num_layers) if not a.is_kv_shared(i)]
    for i in owners:
        shape = ["batch", a.layer_kv_heads(i), "past_sequence", a.layer_head_dim(i)]
        pk, pv, _, _ = cache_names(i)
        g.inputs += [helper.make_tensor_value_info(pk, TensorProto.FLOAT, shape),
                     helper.make_tensor_value_info(pv, TensorProto.FLOAT, shape)]

    # sizes: B, S as 1-element int64 tensors; past length from the first cache input
    ids_shape = g.op("Shape", ["input_ids"], "shape.ids")
    B = g.op("Slice", [ids_shape, g.ints(0), g.ints(1)], "batch")
    S = g.op("Slice", [ids_shape, g.ints(1), g.ints(2)], "seq")
    past = g.op("Slice", [g.op("Shape", [cache_names(owners[0])[0]], "shape.past"), g.ints(2), g.ints(3)],
                "past_len")
    ids_flat = g.op("Reshape", ["input_ids", g.ints(-1)], "ids.flat")

    masks = _masks(g, a, S, past)
    rope = {kind: _rope_tables(g, a, kind) for kind in {a.layer_types[i] for i in range(a.num_layers)}}

    # embeddings
    emb_name = f"{p}embed_tokens.weight"
    x = g.embedding(ids_flat, emb_name, a.vocab_size, h, w.blocks(emb_name), w.type_of(emb_name))
    x = g.op("Mul", [x, g.const(math.sqrt(h))], "embed.scaled")
    ple = _per_layer_inputs(g, a, w, ids_flat, x) if a.has_ple else None

    kv: dict[int, tuple[str, str]] = {}
    for i in range(a.num_layers):
        x = _layer(g, a, w, i, x, B, S, masks, rope, kv, ple)

    x = g.rms_norm(x, g.const(w.vector(f"{p}norm.weight")), a.rms_norm_eps, "final_norm")
    logits = g.tied_head(x, emb_name, a.vocab_size, h)
    if a.final_logit_softcapping:
        c = g.const(a.final_logit_softcapping)
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c], "softcap.div")], "softcap.tanh"), c],
                      "softcap")
    shaped = g.op("Reshape", [logits, g.op("Concat", [B, S, g.ints(a.vocab_size)], "shape.logits", axis=0)],
                  "logits.shaped")
    g.nodes.append(helper.make_node("Identity", [shaped], ["logits"], name="logits"))
    g.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", a.vocab_size]))
    for i in owners:
        _, _, ok, ov = cache_names(i)
        shape = ["batch", a.layer_kv_heads(i), "total_sequence", a.layer_head_dim(i)]
        k, v = kv[i]
        g.nodes.append(helper.make_node("Identity", [k], [ok], name=ok))
        g.nodes.append(helper.make_node("Identity", [v], [ov], name=ov))
        g.outputs += [helper.make_tensor_value_info(ok, TensorProto.FLOAT, shape),
                      helper.make_tensor_value_info(ov, TensorProto.FLOAT, shape)]


def _masks(g: Graph, a: Gemma4Arch, S: str, past: str) -> dict[str, str]:
    """Boolean masks [B, 1, 1, S, T] per layer type: causal over cache positions, padding from attention_mask, and
    the sliding window (key > query - window) on sliding layers."""
    total = g.op("Add", [past, S], "total_len")
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    q = g.op("Add", [g.op("Range", [zero, g.op("Squeeze", [S], "s.scalar"), one], "q.range"), past], "q.pos")
    k = g.op("Range", [zero, g.op("Squeeze", [total], "t.scalar"), one], "k.pos")
    qc = g.op("Unsqueeze", [q, g.ints(1)], "q.col")  # [S, 1]
    causal = g.op("LessOrEqual", [k, qc], "causal")  # [S, T]
    pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.ints(1, 2, 3)], "pad.u")], "pad", to=9)
    full = g.op("And", [causal, pad], "mask.full")  # [B, 1, 1, S, T]
    out = {"full_attention": full}
    if "sliding_attention" in a.layer_types:
        lo = g.op("Sub", [qc, g.const(a.sliding_window, np.int64)], "window.lo")
        inside = g.op("Greater", [k, lo], "window")
        out["sliding_attention"] = g.op("And", [full, inside], "mask.sliding")
    return out


def _rope_tables(g: Graph, a: Gemma4Arch, kind: str) -> tuple[str, str]:
    """cos and sin [B, S, 1, head_dim] for one layer type, from position_ids."""
    full = kind == "full_attention"
    r = a.rope_full if full else a.rope_sliding
    hd = a.global_head_dim if full else a.head_dim
    inv = rope_inv_freq(hd, r.theta, r.rope_type, r.partial_rotary_factor)
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "pos.f", to=1), g.ints(-1)], "pos.u")
    freqs = g.op("Mul", [pos, g.const(inv)], f"rope.{kind}.freqs")
    emb = g.op("Concat", [freqs, freqs], f"rope.{kind}.emb", axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cos", [emb], f"rope.{kind}.cos"), g.ints(2)], f"rope.{kind}.cos.u")
    sin = g.op("Unsqueeze", [g.op("Sin", [emb], f"rope.{kind}.sin"), g.ints(2)], f"rope.{kind}.sin.u")
    return cos, sin


def _apply_rope(g: Graph, x: str, cos: str, sin: str, hd: int, hint: str) -> str:
    x1, x2 = g.op("Split", [x, g.ints(hd // 2, hd // 2)], hint + ".split", outputs=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], hint + ".neg"), x1], hint + ".rot", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], hint + ".cos"), g.op("Mul", [rot, sin], hint + ".sin")], hint)


def _per_layer_inputs(g: Graph, a: Gemma4Arch, w: Weights, ids: str, x: str) -> str:
    """[T, layers, ple_dim]: (table lookup * sqrt(P) + norm(projection(x) * H^-0.5)) * 2^-0.5."""
    p, L, P = w.prefix, a.num_layers, a.ple_dim
    tname = f"{p}embed_tokens_per_layer.weight"
    tok = g.embedding(ids, tname, a.vocab_size_per_layer_input, L * P, w.blocks(tname), w.type_of(tname))
    tok = g.op("Mul", [tok, g.const(math.sqrt(P))], "ple.tok.scaled")
    tok = g.op("Reshape", [tok, g.ints(-1, L, P)], "ple.tok")
    pname = f"{p}per_layer_model_projection.weight"
    proj = g.linear(x, pname, L * P, a.hidden_size, w.blocks(pname), w.type_of(pname))
    proj = g.op("Reshape", [g.op("Mul", [proj, g.const(a.hidden_size ** -0.5)], "ple.proj.scaled"),
                            g.ints(-1, L, P)], "ple.proj")
    proj = g.rms_norm(proj, g.const(w.vector(f"{p}per_layer_projection_norm.weight")), a.rms_norm_eps,
                      "ple.proj.norm")
    return g.op("Mul", [g.op("Add", [proj, tok], "ple.sum"), g.const(2.0 ** -0.5)], "ple")


def _lin(g: Graph, w: Weights, x: str, name: str, out_f: int, in_f: int) -> str:
    return g.linear(x, name, out_f, in_f, w.blocks(name), w.type_of(name))


def _norm(g: Graph, a: Gemma4Arch, w: Weights, x: str, name: str) -> str:
    return g.rms_norm(x, g.const(w.vector(name)), a.rms_norm_eps, name.removesuffix(".weight"))


def _layer(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str, B: str, S: str, masks: dict, rope: dict,
           kv: dict, ple: str | None) -> str:
    lp = f"{w.prefix}layers.{i}."
    h = a.hidden_size
    residual = x
    y = _norm(g, a, w, x, lp + "input_layernorm.weight")
    y = _attention(g, a, w, i, y, B, S, masks, rope, kv)
    y = _norm(g, a, w, y, lp + "post_attention_layernorm.weight")
    x = g.op("Add", [residual, y], f"layers.{i}.attn.residual")

    residual = x
    y = _norm(g, a, w, x, lp + "pre_feedforward_layernorm.weight")
    wd = a.mlp_width(i)
    gate = g.gelu(_lin(g, w, y, lp + "mlp.gate_proj.weight", wd, h), f"layers.{i}.mlp.act")
    up = _lin(g, w, y, lp + "mlp.up_proj.weight", wd, h)
    y = _lin(g, w, g.op("Mul", [gate, up], f"layers.{i}.mlp.glu"), lp + "mlp.down_proj.weight", h, wd)
    if a.moe:
        y1 = _norm(g, a, w, y, lp + "post_feedforward_layernorm_1.weight")
        y2 = _moe(g, a, w, i, residual)
        y2 = _norm(g, a, w, y2, lp + "post_feedforward_layernorm_2.weight")
        y = g.op("Add", [y1, y2], f"layers.{i}.moe.sum")
    y = _norm(g, a, w, y, lp + "post_feedforward_layernorm.weight")
    x = g.op("Add", [residual, y], f"layers.{i}.mlp.residual")

    if ple is not None:
        residual = x
        sl = g.op("Gather", [ple, g.const(i, np.int64)], f"layers.{i}.ple.slice", axis=1)  # [T, P]
        y = g.gelu(_lin(g, w, x, lp + "per_layer_input_gate.weight", a.ple_dim, h), f"layers.{i}.ple.act")
        y = _lin(g, w, g.op("Mul", [y, sl], f"layers.{i}.ple.gated"), lp + "per_layer_projection.weight", h,
                 a.ple_dim)
        y = _norm(g, a, w, y, lp + "post_per_layer_input_norm.weight")
        x = g.op("Add", [residual, y], f"layers.{i}.ple.residual")
    return g.op("Mul", [x, g.const(w.vector(lp + "layer_scalar"))], f"layers.{i}.scaled")


def _heads(g: Graph, x: str, B: str, n: int, hd: int, hint: str) -> str:
    """[T, n*hd] -> [B, S, n, hd]."""
    return g.op("Reshape", [x, g.op("Concat", [B, g.ints(-1, n, hd)], hint + ".shape", axis=0)], hint)


def _attention(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str, B: str, S: str, masks: dict, rope: dict,
               kv: dict) -> str:
    lp = f"{w.prefix}layers.{i}.self_attn."
    h, nh, hd = a.hidden_size, a.num_heads, a.layer_head_dim(i)
    kind = a.layer_types[i]
    cos, sin = rope[kind]
    t = f"layers.{i}.attn"
    q = _heads(g, _lin(g, w, x, lp + "q_proj.weight", nh * hd, h), B, nh, hd, t + ".q")
    q = g.rms_norm(q, g.const(w.vector(lp + "q_norm.weight")), a.rms_norm_eps, t + ".q_norm")
    q = g.op("Transpose", [_apply_rope(g, q, cos, sin, hd, t + ".q_rope")], t + ".q_t", perm=[0, 2, 1, 3])
    if a.is_kv_shared(i):
        k_all, v_all = kv[a.kv_donor(i)]
        kvh = a.layer_kv_heads(a.kv_donor(i))
    else:
        kvh = a.layer_kv_heads(i)
        k_raw = _heads(g, _lin(g, w, x, lp + "k_proj.weight", kvh * hd, h), B, kvh, hd, t + ".k")
        v = (_heads(g, _lin(g, w, x, lp + "v_proj.weight", kvh * hd, h), B, kvh, hd, t + ".v")
             if a.has_v_proj(i) else k_raw)  # K==V: the key projection is also the value projection
        k = g.rms_norm(k_raw, g.const(w.vector(lp + "k_norm.weight")), a.rms_norm_eps, t + ".k_norm")
        k = g.op("Transpose", [_apply_rope(g, k, cos, sin, hd, t + ".k_rope")], t + ".k_t", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.rms_norm(v, None, a.rms_norm_eps, t + ".v_norm")], t + ".v_t", perm=[0, 2, 1, 3])
        pk, pv, _, _ = cache_names(i)
        k_all = g.op("Concat", [pk, k], t + ".k_all", axis=2)
        v_all = g.op("Concat", [pv, v], t + ".v_all", axis=2)
        kv[i] = (k_all, v_all)
    groups = nh // kvh
    # grouped-query attention without repeating K/V: q [B, kvh, groups, S, hd] against k [B, kvh, 1, T, hd]
    q5 = g.op("Reshape", [q, g.op("Concat", [B, g.ints(kvh, groups, -1, hd)], t + ".q5.shape", axis=0)], t + ".q5")
    k5 = g.op("Unsqueeze", [k_all, g.ints(2)], t + ".k5")
    v5 = g.op("Unsqueeze", [v_all, g.ints(2)], t + ".v5")
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], t + ".kT", perm=[0, 1, 2, 4, 3])], t + ".scores")
    scores = g.op("Where", [masks[kind], scores, g.const(MASKED)], t + ".masked")
    probs = g.op("Softmax", [scores], t + ".probs", axis=-1)
    o = g.op("MatMul", [probs, v5], t + ".ctx")  # [B, kvh, groups, S, hd]
    o = g.op("Reshape", [o, g.op("Concat", [B, g.ints(nh, -1, hd)], t + ".ctx.shape", axis=0)], t + ".ctx4")
    o = g.op("Reshape", [g.op("Transpose", [o], t + ".ctx_t", perm=[0, 2, 1, 3]), g.ints(-1, nh * hd)],
             t + ".ctx2")
    return _lin(g, w, o, lp + "o_proj.weight", h, nh * hd)


def _moe(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str) -> str:
    """The expert block on the residual stream x [T, H]: router at full precision, experts as dense products."""
    lp = f"{w.prefix}layers.{i}."
    m, h = a.moe, a.hidden_size
    E, I, K = m.num_experts, m.intermediate_size, m.top_k
    t = f"layers.{i}.moe"
    r = g.rms_norm(x, None, a.rms_norm_eps, t + ".router.norm")
    r = g.op("Mul", [r, g.const(w.vector(lp + "router.scale") * np.float32(h ** -0.5))], t + ".router.scaled")
    probs = g.op("Softmax", [_lin(g, w, r, lp + "router.proj.weight", E, h)], t + ".router.probs", axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.ints(K)], t + ".router.topk", outputs=2, axis=-1)
    top_w = g.op("Div", [top_w, g.op("ReduceSum", [top_w, g.ints(-1)], t + ".router.sum", keepdims=1)],
                 t + ".router.renorm")
    top_w = g.op("Mul", [top_w, g.op("Gather", [g.const(w.vector(lp + "router.per_expert_scale")), top_i],
                                     t + ".router.expert_scale")], t + ".router.weights")
    zeros = g.op("ConstantOfShape", [g.op("Shape", [probs], t + ".router.shape")], t + ".router.zeros",
                 value=_zero_tensor())
    dense = g.op("ScatterElements", [zeros, top_i, top_w], t + ".router.dense", axis=1)  # [T, E]

    y = _norm(g, a, w, x, lp + "pre_feedforward_layernorm_2.weight")
    gu = _lin(g, w, y, lp + "experts.gate_up_proj", E * 2 * I, h)  # all experts at once: [T, E*2I]
    gate, up = g.op("Split", [g.op("Reshape", [gu, g.ints(-1, E, 2, I)], t + ".gu"), g.ints(1, 1)],
                    t + ".gu.split", outputs=2, axis=2)
    act = g.op("Mul", [g.gelu(gate, t + ".act"), up], t + ".glu")  # [T, E, 1, I]
    act = g.op("Mul", [act, g.op("Unsqueeze", [dense, g.ints(2, 3)], t + ".weights")], t + ".weighted")
    act = g.op("Reshape", [act, g.ints(-1, E * I)], t + ".flat")
    name = lp + "experts.down_proj"
    return g.linear(act, name, h, E * I, w.expert_down(name), w.type_of(name))  # sums over experts


def _zero_tensor():
    from onnx import numpy_helper

    return numpy_helper.from_array(np.zeros(1, np.float32))
