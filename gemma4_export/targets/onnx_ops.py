"""ONNX graph primitives: a graph under construction whose weights stream into one external data file as they are
added. Standard ONNX operators (opset 21), plus onnxruntime's MatMulNBits and GatherBlockQuantized for
block-quantized weights. Hidden states are kept as [tokens, hidden] (batch and sequence flattened) so every linear
layer is one Gemm against the checkpoint's own [out, in] layout (transB) or one MatMulNBits, whose packed weight is
also laid out by output row: both stream row blocks straight from the checkpoint. The Gemma 4 decoder built from
these is onnx_decoder.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


OPSET = 21
MS_DOMAIN = "com.microsoft"
BLOCK = 32  # MatMulNBits / GatherBlockQuantized block along the input dimension
QUANT_BITS = {"INT4": 4, "INT8": 8}
MASKED = -1e30  # score of a masked key: finite, so a fully masked (padding) row stays finite
MASKED_F16 = -65504.0  # the same in float16 (its lowest finite value)
ALIGN, BIG_ALIGN = 64, 4096

RowBlocks = Callable[[], Iterator[np.ndarray]]  # yields float32 row blocks of an [out, in] matrix, in order


CHUNK = 1 << 40  # a virtual offset's stride per data file: offset = file index * CHUNK + offset in that file


@dataclass
class WeightFile:
    """The external data of one graph: each tensor is given an aligned region and written there, block by block.
    With `limit`, the data goes into several files of at most that size each (`X.onnx_data`, `X.onnx_data_1`, ...,
    as transformers.js names them; a browser cannot hold one buffer over 2 GB), a tensor never split between two
    (one larger than the limit has a file to itself). Offsets handed out are virtual: file index * CHUNK + offset."""

    directory: str
    location: str
    limit: int | None = None
    sizes: list = field(default_factory=lambda: [0])
    _fds: dict = field(default_factory=dict)

    def name(self, index: int) -> str:
        return self.location if index == 0 else f"{self.location}_{index}"

    @property
    def files(self) -> list[str]:
        return [self.name(i) for i in range(len(self.sizes))]

    def reserve(self, nbytes: int) -> int:
        align = BIG_ALIGN if nbytes >= (1 << 20) else ALIGN
        off = -(-self.sizes[-1] // align) * align
        if self.limit is not None and self.sizes[-1] and off + nbytes > self.limit:
            self.sizes.append(0)
            off = 0
        self.sizes[-1] = off + nbytes
        return (len(self.sizes) - 1) * CHUNK + off

    def where(self, virtual: int) -> tuple[str, int]:
        """(file name, offset in it) of a virtual offset."""
        return self.name(virtual // CHUNK), virtual % CHUNK

    def write(self, offset: int, data: bytes | memoryview) -> None:
        index, offset = divmod(offset, CHUNK)
        fd = self._fds.get(index)
        if fd is None:
            fd = self._fds[index] = os.open(os.path.join(self.directory, self.name(index)),
                                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Close the files, first creating any that got no bytes (a file of only empty tensors)."""
        for i in range(len(self.sizes)):
            if i not in self._fds:
                self._fds[i] = os.open(os.path.join(self.directory, self.name(i)),
                                       os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
    # checkpoint name -> importance [n_mat, in] from the calibration (None: no statistics); see quant_weight
    importance: Callable[[str], np.ndarray | None] | None = None
    # checkpoint name -> quant.weighted.Hessian (the inputs' second moments, for GPTQ's error feedback), or None
    hessian: Callable[[str], object] | None = None
    int8_activations: bool = False  # 8-bit MatMulNBits at accuracy_level 4 (see matmul_nbits)
    # compute in float16 (activations, KV cache, float weights, block scales), for providers that compute in fp16;
    # RMSNorm statistics, RoPE angles and weights the plan keeps at FP32 (the router) stay in float32
    half: bool = False
    lattice: frozenset = frozenset()  # checkpoint names written on their QAT lattice (plan method "lattice")

    @property
    def ft(self) -> int:
        """The ONNX element type activations have: FLOAT16 when computing in half precision, else FLOAT."""
        return 10 if self.half else 1

    @property
    def np_f(self):
        return np.float16 if self.half else np.float32

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

    def const(self, value, dtype=None) -> str:
        """A small constant, stored inside the model; identical constants are shared. Floats take the compute type
        unless `dtype` says otherwise."""
        from onnx import numpy_helper

        a = np.asarray(value, dtype=dtype or self.np_f)
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
        location, local = self.weights.where(off)
        t = TensorProto(name=name, data_type=onnx_type, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(local)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        return off

    # -- weights -----------------------------------------------------------------------------------------------
    def float_weight(self, name: str, shape: tuple[int, ...], blocks: RowBlocks, type_name: str) -> str:
        """A float initializer (FP32, or FP16 cast to float32 in the graph), written block by block."""
        from onnx import TensorProto

        f16 = type_name == "FP16"
        size = 2 if f16 else 4
        self.float_types[name] = type_name
        off = self.external(name, TensorProto.FLOAT16 if f16 else TensorProto.FLOAT, shape,
                            int(np.prod(shape)) * size)
        self._write_float(name, int(np.prod(shape)) * size, blocks, type_name, off)
        return name

    def _write_float(self, name: str, nbytes: int, blocks: RowBlocks, type_name: str, off: int | None = None) -> int:
        from . import encode_float

        start = off = self.weights.reserve(nbytes) if off is None else off
        for b in blocks():
            data = encode_float(b, "F16" if type_name == "FP16" else "F32").tobytes()
            self.weights.write(off, data)
            off += len(data)
            self.advance(len(data))
        return start

    def quant_weight(self, name: str, rows: int, cols: int, blocks: RowBlocks, bits: int,
                     table: bool = False) -> tuple[str, str]:
        """Block-quantize an [rows, cols] matrix, symmetric, blocks of 32 along a row: packed uint8 [rows, cols/32,
        32*bits/8] (MatMulNBits' layout; the same bytes as [rows, cols*bits/8] for a lookup table) and float32
        scales [rows, cols/32]. Without calibration statistics for it: onnxruntime's own quantizer (round to
        nearest). With them: quant.weighted.int_blocks, the same layout with each block's scale chosen to minimise
        the importance-weighted error (a lookup table, which no imatrix covers, with even weights)."""
        from onnx import TensorProto

        kb, blob = cols // BLOCK, BLOCK * bits // 8
        qname, sname = f"{name}.q{bits}", f"{name}.scales"
        shape = (rows, kb * blob) if table else (rows, kb, blob)
        qoff = self.external(qname, TensorProto.UINT8, shape, rows * kb * blob)
        soff = self.external(sname, self.ft, (rows, kb), rows * kb * self._scale_size)
        self.tables[name] = (qname, sname, qoff, bits)
        self._write_quant(name, rows, cols, blocks, bits, qoff, soff, table)
        return qname, sname

    def _write_quant(self, name: str, rows: int, cols: int, blocks: RowBlocks, bits: int, qoff: int, soff: int,
                     table: bool = False) -> None:
        quant = self._quantizer(name, rows, cols, bits, table)
        first = 0
        for b in blocks():
            packed, scales = quant(first, b)
            first += len(b)
            self.weights.write(qoff, packed.tobytes())
            self.weights.write(soff, scales.astype(self.np_f).tobytes())
            qoff, soff = qoff + packed.nbytes, soff + len(scales.reshape(-1)) * self._scale_size
            self.advance(packed.nbytes + len(scales.reshape(-1)) * self._scale_size)

    def expert_weights(self, name: str, experts: int, rows: int, cols: int, blocks: RowBlocks, type_name: str
                       ) -> list[tuple[str, str | None]]:
        """An expert tensor [E, rows, cols] (the checkpoint's layout; `blocks` yields its rows flattened to
        [E*rows, cols]) written once, and declared as E initializers, one per expert, each a view of that expert's
        bytes: [(weight, scales or None)] for MatMulNBits or Gemm. Every block of 32 lies within one expert's row,
        so each expert has its own scales and, when calibrating, its own importance vector."""
        from onnx import TensorProto

        views: list[tuple[str, str | None]] = []
        n = experts * rows
        if type_name in QUANT_BITS:
            bits = QUANT_BITS[type_name]
            kb, blob = cols // BLOCK, BLOCK * bits // 8
            qoff = self.weights.reserve(n * kb * blob)
            soff = self.weights.reserve(n * kb * self._scale_size)
            self._write_quant(name, n, cols, blocks, bits, qoff, soff)
            self.quantized.append(QuantNode(name, "MatMulNBits", bits))
            for e in range(experts):
                q, sc = f"{name}.expert{e}.q{bits}", f"{name}.expert{e}.scales"
                self.external(q, TensorProto.UINT8, (rows, kb, blob), rows * kb * blob, at=qoff + e * rows * kb * blob)
                ss = rows * kb * self._scale_size
                self.external(sc, self.ft, (rows, kb), ss, at=soff + e * ss)
                views.append((q, sc))
            return views
        f16 = type_name == "FP16"
        size = 2 if f16 else 4
        off = self._write_float(name, n * cols * size, blocks, type_name)
        for e in range(experts):
            v = f"{name}.expert{e}"
            self.external(v, TensorProto.FLOAT16 if f16 else TensorProto.FLOAT, (rows, cols), rows * cols * size,
                          at=off + e * rows * cols * size)
            views.append((v, None))
        return views

    def expert_linear(self, x: str, view: tuple[str, str | None], out_f: int, in_f: int, type_name: str,
                      hint: str) -> str:
        """x [n, in] @ W_e^T on one expert's view (expert_weights)."""
        w, scales = view
        if type_name in QUANT_BITS:
            return self.matmul_nbits(x, w, scales, in_f, out_f, QUANT_BITS[type_name], hint)
        return self._gemm(x, w, type_name, hint)

    def _gemm(self, x: str, w: str, type_name: str, hint: str) -> str:
        """x @ w^T for a float initializer w: in the weight's own precision when it is the compute type, else
        through casts (FP16 weights in a float32 graph; FP32 weights, the router, in a float16 graph: computed in
        float32, the result cast back)."""
        wt = 10 if type_name == "FP16" else 1
        if wt == self.ft:
            return self.op("Gemm", [x, w], hint, transB=1)
        if not self.half:
            return self.op("Gemm", [x, self.op("Cast", [w], hint + ".cast", to=1)], hint, transB=1)
        y = self.op("Gemm", [self.op("Cast", [x], hint + ".in32", to=1), w], hint, transB=1)
        return self.op("Cast", [y], hint + ".out16", to=10)

    @property
    def _scale_size(self) -> int:
        return 2 if self.half else 4

    def matmul_nbits(self, x: str, weight: str, scales: str, in_f: int, out_f: int, bits: int, hint: str) -> str:
        """MatMulNBits. With `int8_activations`, 8-bit weights run at accuracy_level 4 (the activations quantized
        to int8 per block for the dot products): onnxruntime's CPU kernel for 8-bit weights at the default level
        dequantizes the whole matrix on every run, about 100x slower (the real 26B-A4B's int8 output head took 2.8 s
        per decoded token). 4-bit weights keep float32 activations."""
        fast = {"accuracy_level": 4} if bits == 8 and self.int8_activations else {}
        return self.op("MatMulNBits", [x, weight, scales], hint, domain=MS_DOMAIN, K=in_f, N=out_f, bits=bits,
                       block_size=BLOCK, **fast)

    @contextmanager
    def subgraph(self) -> Iterator[list]:
        """Nodes added inside go to a list of their own (an If branch's body); constants and initializers stay in
        the main graph, which a branch reads from the outer scope."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def _quantizer(self, name: str, rows: int, cols: int, bits: int, table: bool = False):
        """(first row, float32 row block) -> (packed, scales) for one weight. A lookup table (the embedding graph's
        copy of a tied head) gets no error feedback: its rows are read alone, not multiplied by the head's inputs."""
        if name in self.lattice:  # a QAT tensor: its trained steps and integers (quant/lattice.py)
            from ..quant.lattice import f16_round, int4_lattice

            if bits != 4:
                raise ValueError(f"{name}: the lattice is written at 4 bits, not {bits}")
            rd = f16_round if self.half else (lambda d: d)
            return lambda first, b: int4_lattice(b, rd)
        imat = self.importance(name) if self.importance is not None else None
        if imat is None and self.importance is not None:  # calibrating, but no statistics: a lookup table
            imat = np.ones((1, cols), np.float32)  # the same search, each block's own error weighted evenly
        if imat is None:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            q = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                                                        bits=bits))

            def rtn(first, b):
                packed, scales, _ = q.qbits_block_quant(np.ascontiguousarray(b.T))  # the quantizer takes [in, out]
                return packed, scales
            return rtn
        from ..quant.weighted import int_blocks

        if imat.shape[1] != cols:  # experts' down projections as one [H, E*I] matrix: the experts side by side
            imat = imat.reshape(1, -1)
        if imat.shape[1] != cols or rows % imat.shape[0]:
            raise ValueError(f"{name}: importance {list(imat.shape)} does not fit [{rows}, {cols}]")
        per = rows // imat.shape[0]  # rows of one matrix (an expert's, for expert tensors)
        hess = self.hessian(name) if self.hessian is not None and not table else None
        if hess is not None and hess.width != cols:
            hess = hess.side_by_side()
        if hess is not None and (hess.width != cols or hess.n_mat not in (1, imat.shape[0])):
            raise ValueError(f"{name}: Hessian of {hess.n_mat} x {hess.width} does not fit [{rows}, {cols}]")

        def weighted(first, b):
            sel = np.arange(first, first + len(b))
            imp = imat[0] if imat.shape[0] == 1 else imat[sel // per]
            return int_blocks(b, imp, bits, BLOCK, hess, sel // per)
        return weighted

    # -- layers ------------------------------------------------------------------------------------------------
    def linear(self, x: str, name: str, out_f: int, in_f: int, blocks: RowBlocks, type_name: str,
               hint: str | None = None) -> str:
        """x [T, in] @ W^T for a checkpoint weight W [out, in]."""
        hint = hint or name.removesuffix(".weight")
        if type_name in QUANT_BITS:
            bits = QUANT_BITS[type_name]
            qn, sn = self.quant_weight(name, out_f, in_f, blocks, bits)
            self.quantized.append(QuantNode(name, "MatMulNBits", bits))
            return self.matmul_nbits(x, qn, sn, in_f, out_f, bits, hint)
        w = self.float_weight(name, (out_f, in_f), blocks, type_name)
        return self._gemm(x, w, type_name, hint)

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
            return self.matmul_nbits(x, view, scales, cols, rows, bits, "head")
        return self._gemm(x, name, self.float_types.get(name, "FP32"), "head")

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
        return self._to_compute(self.op("Gather", [w, ids], hint), type_name, hint + ".cast")

    def _to_compute(self, x: str, type_name: str, hint: str) -> str:
        """A float weight's values (FP16 or FP32 storage) as the compute type."""
        return x if (type_name == "FP16") == self.half else self.op("Cast", [x], hint, to=self.ft)

    def rms_norm(self, x: str, weight: str | None, eps: float, hint: str) -> str:
        """x * (mean(x^2) + eps)^-0.5 [* weight], over the last axis, as transformers computes it."""
        x32 = self.op("Cast", [x], hint + ".f32", to=1) if self.half else x  # x*x overflows float16
        sq = self.op("Mul", [x32, x32], hint + ".sq")
        mean = self.op("ReduceMean", [sq, self.ints(-1)], hint + ".mean", keepdims=1)
        inv = self.op("Pow", [self.op("Add", [mean, self.const(eps, np.float32)], hint + ".eps"),
                              self.const(-0.5, np.float32)], hint + ".rsqrt")
        y = self.op("Mul", [x32, inv], hint + ".normed")
        if self.half:
            y = self.op("Cast", [y], hint + ".f16", to=10)
        return self.op("Mul", [y, weight], hint) if weight else y

    def gelu(self, x: str, hint: str) -> str:
        return self.op("Gelu", [x], hint, approximate="tanh")
