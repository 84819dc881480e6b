"""ggml's own quantizers, called directly: `ggml_quantize_chunk` from the libggml that llama-cpp-python ships.

This is the function llama.cpp's `llama_model_quantize` calls for every tensor (llama-quant.cpp), with the same
arguments: float32 rows, the row length, and the tensor's importance vector (an imatrix entry, or NULL). Rows are
quantized independently, so a tensor can be quantized in blocks of rows, on several threads (ctypes releases the
GIL for the call), and the bytes are those llama.cpp writes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import Gemma4ExportError

# Rows per thread task: small enough to spread a block over the cores, large enough that the call dominates.
MIN_TASK_ELEMENTS = 1 << 16


class GGMLError(Gemma4ExportError):
    pass


@cache
def _lib():
    try:
        import llama_cpp
    except ImportError:
        raise GGMLError("quantized GGUF presets need llama-cpp-python: pip install 'gemma4-export[gguf]'") from None
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = libdir / names.get(sys.platform, "libggml-base.so")
    if not path.exists():
        found = sorted(libdir.glob("*ggml-base*"))
        if not found:
            raise GGMLError(f"no libggml-base in {libdir}: llama-cpp-python's build is missing ggml")
        path = found[0]
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def requires_imatrix(type_name: str) -> bool:
    """Types ggml cannot quantize without importance weights (the 1- and 2-bit IQ types)."""
    return bool(_lib().ggml_quantize_requires_imatrix(int(GGMLQuantizationType[type_name])))


def row_bytes(type_name: str, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return n_per_row // block * size


class Quantizer:
    """Quantize float32 row blocks to one ggml type on `threads` threads."""

    def __init__(self, threads: int | None = None):
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggml-quantize") if self.threads > 1 else None
        self.lib = _lib()
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="ggml-quantize-ahead")

    def close(self) -> None:
        self._ahead.shutdown(cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown()

    def submit(self, type_name: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> Future:
        """`quantize` started in the background: the caller writes the previous block meanwhile. `rows` must stay
        unchanged until the future is done."""
        return self._ahead.submit(self.quantize, type_name, rows, imatrix)

    def gptq(self, type_name: str, rows: np.ndarray, imatrix: np.ndarray | None, factors) -> np.ndarray:
        """Rows moved by GPTQ's error feedback (quant.weighted.gptq_values) with this type's own quantizer and
        `imatrix` deciding each super-block; what `quantize` then writes. `factors`: a Hessian's (first channel, U)
        blocks for these rows' matrix."""
        from gguf.quants import dequantize

        from ..quant.weighted import gptq_values

        qt = GGMLQuantizationType[type_name]
        block = GGML_QUANT_SIZES[qt][0]

        def qd(w: np.ndarray, first: int) -> np.ndarray:
            imat = None if imatrix is None else imatrix[first:first + w.shape[1]]
            return dequantize(self.quantize(type_name, w, imat), qt).reshape(w.shape)
        return gptq_values(rows, factors, block, qd, min(32, block))

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quantize(self, type_name: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """rows: float32 [n, n_per_row]; imatrix: float32 [n_per_row] or None. Returns the packed bytes (uint8)."""
        t = int(GGMLQuantizationType[type_name])
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, per = rows.shape
        if imatrix is None and self.lib.ggml_quantize_requires_imatrix(t):
            raise GGMLError(f"{type_name} needs importance weights (calibration), and none were given")
        imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat is not None and imat.shape != (per,):
            raise GGMLError(f"importance vector of {imat.shape} for rows of {per}")
        rb = row_bytes(type_name, per)
        out = np.empty(n * rb, dtype=np.uint8)
        self.lib.ggml_quantize_init(t)  # the IQ types' grids; a no-op for the others
        src_p, dst_p = rows.ctypes.data, out.ctypes.data
        imat_p = imat.ctypes.data if imat is not None else None

        def run(r0: int, r1: int) -> int:
            return self.lib.ggml_quantize_chunk(t, src_p + r0 * per * 4, dst_p + r0 * rb, 0, r1 - r0, per, imat_p)

        step = max(1, min(-(-n // self.threads), max(1, MIN_TASK_ELEMENTS // per)))
        spans = [(r, min(n, r + step)) for r in range(0, n, step)]
        if self.pool is None or len(spans) == 1:
            done = sum(run(a, b) for a, b in spans)
        else:
            done = sum(self.pool.map(lambda s: run(*s), spans))
        if done != out.nbytes:
            raise GGMLError(f"ggml_quantize_chunk wrote {done} bytes for {type_name}, expected {out.nbytes}")
        return out
