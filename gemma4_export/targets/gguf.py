"""GGUF target: Gemma 4 text decoder for llama.cpp.

One streaming pass: each checkpoint tensor is read in blocks of rows, renamed to llama.cpp's Gemma 4 name, and
written once in the plan's type. Float types are encoded here (or copied file to file when the bytes are the
checkpoint's own); quantized types go through ggml's own quantizer (`ggml_quantize_chunk`, the function
llama.cpp's `llama_model_quantize` calls) on every core, with each matrix's importance vector from the calibration
(quant/calibrate.py) passed as llama.cpp passes an imatrix entry. No intermediate float file is written, and memory
follows the row block, not the tensor. The result is read back and every tensor's type checked against the plan
before the file is renamed into place.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import (GGML_QUANT_VERSION, MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, Keys,
                  LlamaFileType)

from .. import __version__, llama_log
from ..errors import Gemma4ExportError
from ..exporter.arch import Gemma4Arch
from ..exporter.checkpoint import Checkpoint
from ..exporter.source import ModelSource
from ..exporter.tensors import Tensor, parse_hf_name
from ..exporter.tokenizer import TokenizerInfo, read_tokenizer
from ..progress import Reporter
from ..quant.plan import Plan, PlanEntry
from ..quant.presets import Preset
from ..quant.types import GGUF_TYPES
from . import encode_float
from .gguf_file import FileRange, GGUFWriter, read_gguf
from .registry import Platform, Target, register

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA4]  # "gemma4"

# Canonical key -> llama.cpp tensor (gguf-py's names, so they follow llama.cpp's) and suffix. An unmapped text tensor
# is an error, never skipped.
K = Tensor
GGUF_TENSORS: dict[Tensor, tuple[MODEL_TENSOR, str]] = {
    K.TOKEN_EMBD: (MODEL_TENSOR.TOKEN_EMBD, "weight"),
    K.OUTPUT: (MODEL_TENSOR.OUTPUT, "weight"),
    K.PLE_TABLE: (MODEL_TENSOR.PER_LAYER_TOKEN_EMBD, "weight"),
    K.PLE_MODEL_PROJ: (MODEL_TENSOR.PER_LAYER_MODEL_PROJ, "weight"),
    K.PLE_PROJ_NORM: (MODEL_TENSOR.PER_LAYER_PROJ_NORM, "weight"),
    K.OUTPUT_NORM: (MODEL_TENSOR.OUTPUT_NORM, "weight"),
    K.ATTN_NORM: (MODEL_TENSOR.ATTN_NORM, "weight"),
    K.ATTN_POST_NORM: (MODEL_TENSOR.ATTN_POST_NORM, "weight"),
    K.FFN_PRE_NORM: (MODEL_TENSOR.FFN_PRE_NORM, "weight"),
    K.FFN_POST_NORM: (MODEL_TENSOR.FFN_POST_NORM, "weight"),
    K.FFN_PRE_NORM_2: (MODEL_TENSOR.FFN_PRE_NORM_2, "weight"),
    K.FFN_POST_NORM_1: (MODEL_TENSOR.FFN_POST_NORM_1, "weight"),
    K.FFN_POST_NORM_2: (MODEL_TENSOR.FFN_POST_NORM_2, "weight"),
    K.ATTN_Q: (MODEL_TENSOR.ATTN_Q, "weight"),
    K.ATTN_K: (MODEL_TENSOR.ATTN_K, "weight"),
    K.ATTN_V: (MODEL_TENSOR.ATTN_V, "weight"),
    K.ATTN_OUT: (MODEL_TENSOR.ATTN_OUT, "weight"),
    K.ATTN_Q_NORM: (MODEL_TENSOR.ATTN_Q_NORM, "weight"),
    K.ATTN_K_NORM: (MODEL_TENSOR.ATTN_K_NORM, "weight"),
    K.FFN_GATE: (MODEL_TENSOR.FFN_GATE, "weight"),
    K.FFN_UP: (MODEL_TENSOR.FFN_UP, "weight"),
    K.FFN_DOWN: (MODEL_TENSOR.FFN_DOWN, "weight"),
    # MoE: the router's matrix, its input scale, and the per-expert output scale (applied after ffn_down_exps).
    K.ROUTER: (MODEL_TENSOR.FFN_GATE_INP, "weight"),
    K.ROUTER_SCALE: (MODEL_TENSOR.FFN_GATE_INP, "scale"),
    K.ROUTER_EXPERT_SCALE: (MODEL_TENSOR.FFN_DOWN_EXP, "scale"),
    K.EXPERTS_GATE_UP: (MODEL_TENSOR.FFN_GATE_UP_EXP, "weight"),
    K.EXPERTS_DOWN: (MODEL_TENSOR.FFN_DOWN_EXP, "weight"),
    K.PLE_GATE: (MODEL_TENSOR.PER_LAYER_INP_GATE, "weight"),
    K.PLE_PROJ: (MODEL_TENSOR.PER_LAYER_PROJ, "weight"),
    K.PLE_POST_NORM: (MODEL_TENSOR.PER_LAYER_POST_NORM, "weight"),
    K.LAYER_SCALAR: (MODEL_TENSOR.LAYER_OUT_SCALE, "weight"),
}
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
FLOAT_TYPES = {"F32", "F16", "BF16"}


class ExportError(Gemma4ExportError):
    pass


def gguf_name(name: str, prefix: str) -> str:
    parsed = parse_hf_name(name, prefix)
    if parsed is None or parsed[0] not in GGUF_TENSORS:
        raise ExportError(f"no GGUF name for tensor '{name}': it is not a known Gemma 4 text tensor")
    key, bid = parsed
    tensor, suffix = GGUF_TENSORS[key]
    return f"{TENSOR_NAMES[tensor].format(bid=bid if bid is not None else 0)}.{suffix}"


def get_target_preset(plan: Plan) -> Preset:
    from ..quant.rules import get_preset

    return get_preset(plan.preset, "gguf")


def file_type(preset: Preset) -> int:
    """The preset's general.file_type, as llama-quantize names it."""
    return int(LlamaFileType[preset.file_type])


# ---- metadata --------------------------------------------------------------------------------------------------


def _rope_freqs(a: Gemma4Arch) -> np.ndarray:
    """Proportional RoPE on full layers rotates only the first partial_rotary_factor of each half of the head, with
    frequencies over the whole head dim. ggml's NeoX RoPE rotates the first n_rot dims, so llama.cpp takes n_rot =
    the head dim and a frequency-factor tensor: 1 for the rotated pairs, 1e30 (no rotation) for the rest."""
    r = a.rope_full
    half = a.global_head_dim // 2
    if r.rope_type == "proportional":
        n_rot = int(a.global_head_dim * r.partial_rotary_factor / 2)
    elif r.rope_type == "default" and r.partial_rotary_factor == 1.0:
        n_rot = half
    else:
        raise ExportError(f"full-attention RoPE type {r.rope_type!r} (factor {r.partial_rotary_factor}) has no "
                          "llama.cpp Gemma 4 form")
    return np.array([1.0] * n_rot + [1e30] * (half - n_rot), dtype=np.float32)


def write_metadata(w: GGUFWriter, a: Gemma4Arch, tok: TokenizerInfo, src: ModelSource, preset: Preset,
                   license_: str | None, importance=None) -> None:
    k = lambda key: key.format(arch=ARCH)  # noqa: E731
    w.string(Keys.General.ARCHITECTURE, ARCH)
    w.string(Keys.General.TYPE, "model")
    w.string(Keys.General.NAME, src.name)
    if src.hub_id:  # never a local path (ModelSource.provenance)
        w.string(Keys.General.SOURCE_REPO_URL, f"https://huggingface.co/{src.hub_id}")
    if license_:
        w.string(Keys.General.LICENSE, license_)
    w.string(Keys.General.QUANTIZED_BY, f"gemma4-export {__version__}")
    w.u32(Keys.General.FILE_TYPE, file_type(preset))
    w.u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    if importance is not None:  # the keys llama-quantize writes when it is given an imatrix
        w.string("quantize.imatrix.file", (importance.path.name if importance.path else "imatrix.gguf")[:127])
        w.string("quantize.imatrix.dataset", (importance.datasets[0] if importance.datasets else "")[:127])
        w.u32("quantize.imatrix.entries_count", importance.entries)
        w.u32("quantize.imatrix.chunks_count", importance.chunk_count)
    w.string("gemma4_export.version", __version__)
    w.string("gemma4_export.preset", preset.name)
    prov = src.provenance()
    if "adapter" in prov:  # a LoRA merged in: the base it was merged into, and the adapter's directory name
        w.string("gemma4_export.base", prov["base"])
        w.string("gemma4_export.adapter", prov["adapter"])
    if "source_digest" in prov:  # the weights it came from, to match a stored reference
        w.string("gemma4_export.source_digest", prov["source_digest"])

    w.u32(k(Keys.LLM.CONTEXT_LENGTH), a.max_position_embeddings)
    w.u32(k(Keys.LLM.EMBEDDING_LENGTH), a.hidden_size)
    w.u32(k(Keys.LLM.BLOCK_COUNT), a.num_layers)
    widths = [a.mlp_width(i) for i in range(a.num_layers)]
    if len(set(widths)) == 1:
        w.u32(k(Keys.LLM.FEED_FORWARD_LENGTH), widths[0])
    else:  # double-wide MLP on the KV-shared layers
        w.array(k(Keys.LLM.FEED_FORWARD_LENGTH), widths, GGUFValueType.INT32)
    w.u32(k(Keys.Attention.HEAD_COUNT), a.num_heads)
    kv = [a.layer_kv_heads(i) for i in range(a.num_layers)]
    if len(set(kv)) == 1:
        w.u32(k(Keys.Attention.HEAD_COUNT_KV), kv[0])
    else:  # separate global KV heads on full layers
        w.array(k(Keys.Attention.HEAD_COUNT_KV), kv, GGUFValueType.INT32)
    w.u32(k(Keys.Attention.KEY_LENGTH), a.global_head_dim)
    w.u32(k(Keys.Attention.VALUE_LENGTH), a.global_head_dim)
    w.u32(k(Keys.Attention.KEY_LENGTH_SWA), a.head_dim)
    w.u32(k(Keys.Attention.VALUE_LENGTH_SWA), a.head_dim)
    w.f32(k(Keys.Attention.LAYERNORM_RMS_EPS), a.rms_norm_eps)
    w.u32(k(Keys.Attention.SLIDING_WINDOW), a.sliding_window)
    w.array(k(Keys.Attention.SLIDING_WINDOW_PATTERN), list(a.sliding_pattern), GGUFValueType.BOOL)
    w.u32(k(Keys.Attention.SHARED_KV_LAYERS), a.num_kv_shared_layers)
    w.u32(k(Keys.LLM.EMBD_LENGTH_PER_LAYER_INP), a.ple_dim)
    # Always written: llama.cpp assumes 30.0 when the key is missing, so a model without softcapping says 0.
    w.f32(k(Keys.LLM.FINAL_LOGIT_SOFTCAPPING), a.final_logit_softcapping or 0.0)
    w.f32(k(Keys.Rope.FREQ_BASE), a.rope_full.theta)
    w.f32(k(Keys.Rope.FREQ_BASE_SWA), a.rope_sliding.theta)
    w.u32(k(Keys.Rope.DIMENSION_COUNT), a.global_head_dim)  # with rope_freqs, see _rope_freqs
    w.u32(k(Keys.Rope.DIMENSION_COUNT_SWA), int(a.head_dim * a.rope_sliding.partial_rotary_factor))
    if a.moe:
        w.u32(k(Keys.LLM.EXPERT_COUNT), a.moe.num_experts)
        w.u32(k(Keys.LLM.EXPERT_USED_COUNT), a.moe.top_k)
        w.u32(k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), a.moe.intermediate_size)

    w.string(Keys.Tokenizer.MODEL, "gemma4")
    w.array(Keys.Tokenizer.LIST, tok.tokens, GGUFValueType.STRING)
    w.array(Keys.Tokenizer.SCORES, [-1000.0] * tok.vocab_size, GGUFValueType.FLOAT32)
    w.array(Keys.Tokenizer.TOKEN_TYPE, tok.types, GGUFValueType.INT32)
    w.array(Keys.Tokenizer.MERGES, tok.merges, GGUFValueType.STRING)
    w.u32(Keys.Tokenizer.BOS_ID, tok.bos_id)
    w.u32(Keys.Tokenizer.EOS_ID, tok.eos_id)
    w.u32(Keys.Tokenizer.UNK_ID, tok.unk_id)
    w.u32(Keys.Tokenizer.PAD_ID, tok.pad_id)
    if tok.mask_id is not None:
        w.u32(Keys.Tokenizer.MASK_ID, tok.mask_id)
    w.boolean(Keys.Tokenizer.ADD_BOS, tok.add_bos)
    w.boolean(Keys.Tokenizer.ADD_EOS, False)
    w.boolean(Keys.Tokenizer.ADD_PREFIX, False)
    if tok.chat_template:
        w.string(Keys.Tokenizer.CHAT_TEMPLATE, tok.chat_template)


def read_license(directory: Path | None) -> str | None:
    """The `license:` of a hub model card's front matter, when the checkpoint has one."""
    if directory is None or not (directory / "README.md").is_file():
        return None
    text = (directory / "README.md").read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    m = re.search(r"^license:\s*(\S+)\s*$", text.split("---", 2)[1], re.M)
    return m.group(1).strip("'\"") if m else None


# ---- conversion ------------------------------------------------------------------------------------------------


def _encode(block: np.ndarray, src_dtype: str, out_type: str) -> np.ndarray:
    """One block of rows from the checkpoint's stored dtype to the intermediate/final float type."""
    if src_dtype == "BF16" and out_type == "BF16":
        return block  # bit-exact copy
    from ..exporter.checkpoint import to_f32

    try:
        return encode_float(to_f32(block, src_dtype), out_type)
    except ValueError:
        raise ExportError(f"cannot write {out_type} directly") from None


def _staged_type(e: PlanEntry, src_dtype: str) -> str:
    """The type a tensor has in the converted file: its final type if float, else its source float type."""
    if e.type in FLOAT_TYPES:
        return e.type
    return {"BF16": "BF16", "F16": "F16"}.get(src_dtype, "F32")


def convert(ck: Checkpoint, src: ModelSource, plan: Plan, preset: Preset, out: Path, staged: bool,
            reporter: Reporter, block_bytes: int = 32 << 20, importance=None, threads: int | None = None
            ) -> dict[str, str]:
    """Write the GGUF in one pass: float tensors encoded (or copied byte for byte), quantized ones through ggml's
    own quantizer in blocks of rows, each row block with its matrix's importance vector when `importance` (a
    quant.calibrate.Importance) has one. With `staged`, quantized tensors are written in their source float type
    instead (the input `llama_quantize` takes). Returns {gguf name: plan type} for the kept tensors."""
    a = src.arch
    if staged and any(e.method == "lattice" for e in plan.kept):
        raise ExportError("llama.cpp's quantizer cannot write a QAT lattice (its Q4_0 recomputes every step): "
                          "stage a plan made with qat='off'")
    tok = read_tokenizer(ck.dir, a.vocab_size)
    w = GGUFWriter()
    write_metadata(w, a, tok, src, preset, read_license(ck.dir), None if staged else importance)
    if tok.vocab_size != a.vocab_size:
        raise ExportError(f"tokenizer has {tok.vocab_size} tokens for {a.vocab_size} embedding rows")
    generated: dict[str, np.ndarray] = {}
    sources: dict[str, PlanEntry] = {}
    wanted: dict[str, str] = {}
    if any(a.is_full(i) for i in range(a.num_layers)):
        generated[ROPE_FREQS] = _rope_freqs(a)
        w.add_tensor(ROPE_FREQS, generated[ROPE_FREQS].shape, "F32")
        wanted[ROPE_FREQS] = "F32"
    for e in plan.kept:
        info = ck.info(e.name)
        name = gguf_name(e.name, ck.text_prefix)
        w.add_tensor(name, info.shape, _staged_type(e, info.dtype) if staged else e.type)
        sources[name] = e
        wanted[name] = e.type
    total = sum(t.nbytes for t in w.tensors)

    def blocks_for(entry) -> Iterator[np.ndarray]:
        if entry.name in generated:
            task.advance(entry.nbytes)
            yield generated[entry.name]
            return
        e = sources[entry.name]
        info = ck.info(e.name)
        src_dtype = info.dtype
        if e.method == "lattice":
            yield from _lattice_blocks(ck, e, block_bytes, task)
            return
        if entry.type not in FLOAT_TYPES:
            yield from _quantized_blocks(ck, e, entry.name, importance, quantizer, block_bytes, task)
            return
        if src_dtype == entry.type and info.file is not None:  # same bytes: copy file to file, never via memory
            task.advance(info.nbytes)
            yield FileRange(info.file, info.start, info.nbytes)
            return
        for _, block in ck.iter_rows(e.name, block_bytes):
            enc = _encode(block, src_dtype, entry.type)
            task.advance(enc.nbytes)
            yield enc

    what = "convert" if staged or all(t in FLOAT_TYPES for t in wanted.values()) else f"quantize {preset.name}"
    quantizer = None if staged else _quantizer(wanted, threads)
    try:
        with reporter.task(f"{what} {src.name}", total) as task, open(out, "wb", buffering=0) as f:
            w.write(f, blocks_for)
    finally:
        if quantizer is not None:
            quantizer.close()
    return wanted


def _quantizer(wanted: dict[str, str], threads: int | None):
    if all(t in FLOAT_TYPES for t in wanted.values()):
        return None
    from .ggml_quant import Quantizer

    return Quantizer(threads)


def _lattice_blocks(ck: Checkpoint, e: PlanEntry, block_bytes: int, task) -> Iterator[np.ndarray]:
    """A QAT tensor as Q4_0 blocks on its trained lattice (quant/lattice.py): the trained step as the fp16 scale and
    the trained integers as the nibbles, instead of ggml's extremum / -8."""
    from ..exporter.checkpoint import f32_row_blocks
    from ..quant.lattice import q4_0_bytes

    if e.type != "Q4_0":
        raise ExportError(f"{e.name}: the lattice is written as Q4_0, the plan says {e.type}")
    for _, rows in f32_row_blocks(ck, e.name, block_bytes, ring=2):
        q = q4_0_bytes(rows)
        task.advance(q.nbytes)
        yield q


def _quantized_blocks(ck: Checkpoint, e: PlanEntry, name: str, importance, quantizer, block_bytes: int, task
                      ) -> Iterator[np.ndarray]:
    """One tensor quantized in blocks of rows. An expert tensor [E, R, C] is E matrices of R rows, each with its own
    importance vector (llama.cpp's imatrix holds one per expert); a block never spans two of them. Where the
    calibration has the matrix's Hessian, GPTQ's error feedback runs first (Quantizer.gptq)."""
    from ..exporter.checkpoint import f32_row_blocks, prefetched

    info = ck.info(e.name)
    per_matrix = math.prod(info.shape[1:-1]) if len(info.shape) > 2 else info.shape[0]
    n_mat = info.numel // info.shape[-1] // per_matrix
    imat = importance.weights(name) if importance is not None else None
    if imat is not None and imat.shape != (n_mat, info.shape[-1]):
        raise ExportError(f"the imatrix entry for {name} is {list(imat.shape)}, the tensor needs "
                          f"[{n_mat}, {info.shape[-1]}]: it was computed for another model")
    hess = importance.hessian(name) if importance is not None else None
    if hess is not None and (hess.width != info.shape[-1] or hess.n_mat not in (1, n_mat)):
        raise ExportError(f"the Hessian of {name} is {hess.n_mat} x {hess.width}, the tensor needs "
                          f"{n_mat} x {info.shape[-1]}")
    # A pipeline that keeps every core on ggml's kernels: block k+2 is read and widened to float32 (about block_bytes)
    # while block k+1 is quantized and block k's bytes are written. Four ring buffers: k and k+1 held here, k+2
    # queued, k+3 being filled.
    pending: deque = deque()
    blocks = prefetched(f32_row_blocks(ck, e.name, block_bytes, ring=4))
    try:
        for r0, rows in blocks:
            i = 0
            while i < len(rows):
                m = (r0 + i) // per_matrix
                j = min(len(rows), (m + 1) * per_matrix - r0)
                part, vec = rows[i:j], imat[m] if imat is not None else None
                if hess is not None:  # GPTQ's error feedback moves the rows; ggml then quantizes them as usual
                    part = quantizer.gptq(e.type, part, vec, hess.factors(m))
                pending.append(quantizer.submit(e.type, part, vec))
                i = j
            while len(pending) > 1 or (pending and pending[0].done()):
                q = pending.popleft().result()
                task.advance(q.nbytes)
                yield q
        while pending:
            q = pending.popleft().result()
            task.advance(q.nbytes)
            yield q
    finally:
        for f in pending:
            f.cancel()
        for f in pending:  # a running one still reads its rows: let it finish before the buffers go
            if not f.cancelled():
                f.exception()
        blocks.close()


# ---- quantization through llama.cpp ----------------------------------------------------------------------------


def llama_quantize(src_path: Path, dst_path: Path, plan: Plan, preset: Preset, names: dict[str, str],
                   reporter: Reporter, threads: int | None = None, max_buf: int = 256 << 20,
                   importance=None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) over a float GGUF, one explicit type per tensor and, with
    `importance`, its imatrix vectors: the reference the one-pass writer is tested against."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("quantized GGUF presets need llama-cpp-python: pip install 'gemma4-export[gguf]'") from None
    llama_log.capture()
    llama_log.clear()
    from gguf import GGMLQuantizationType

    overrides = [(n, t) for n, t in names.items() if t not in FLOAT_TYPES]
    patterns = [ctypes.create_string_buffer(f"^{re.escape(n)}$".encode()) for n, _ in overrides]
    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, ((_, t), p) in enumerate(zip(overrides, patterns)):
        arr[i].pattern = ctypes.cast(p, ctypes.c_char_p)
        arr[i].type = int(GGMLQuantizationType[t])
    arr[len(overrides)].pattern = None
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = file_type(preset)
    params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    params.max_buf_size = max_buf
    keep = []  # the imatrix arrays and names must outlive the call
    if importance is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance.sums) + 1))()
        for i, name in enumerate(sorted(importance.sums)):
            vec = np.ascontiguousarray(importance.weights(name).reshape(-1), dtype=np.float32)
            keep += [vec, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = vec.size
        entries[len(importance.sums)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    result: dict[str, int | BaseException] = {}

    def run():
        try:
            result["rc"] = llama_cpp.llama_model_quantize(str(src_path).encode(), str(dst_path).encode(),
                                                          ctypes.byref(params))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result["rc"] = e

    th = threading.Thread(target=run, daemon=True, name="llama-quantize")
    with reporter.task(f"quantize {plan.preset} (llama.cpp)", plan.total_bytes) as task:
        th.start()
        while th.is_alive():
            th.join(0.2)
            if dst_path.exists():
                task.update(min(dst_path.stat().st_size, plan.total_bytes))
    rc = result.get("rc")
    if isinstance(rc, BaseException):
        raise rc
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed (code {rc}) on {src_path.name}; its last log lines:\n"
                          + llama_log.recent())


def check_types(path: Path, wanted: dict[str, str]) -> None:
    """Every tensor in the file has exactly the plan's type, and the file has exactly the planned tensors."""
    g = read_gguf(path, arrays=False)
    got = {n: t.type for n, t in g.tensors.items()}
    problems = [f"{n}: plan {wanted[n]}, file {got.get(n, 'missing')}" for n in wanted if got.get(n) != wanted[n]]
    problems += [f"{n}: in the file but not in the plan" for n in got if n not in wanted]
    if problems:
        raise ExportError(f"{path.name} does not match its plan:\n  " + "\n  ".join(problems[:20]))


# ---- the target -----------------------------------------------------------------------------------------------


@register
class GGUFTarget(Target):
    name = "gguf"
    description = "one .gguf file for llama.cpp"
    runtime_name = "llama-cpp-python"
    extra = "gguf"
    types = GGUF_TYPES
    default_preset = "q4_k_m"
    artifact_kind = "file"
    color = "#1f77b4"
    devices_help = "cpu, cuda or mps (GPU offload)"
    lattice_type = "Q4_0"
    lattice_form = "Q4_0 blocks: fp16 step, nibbles k + 8"

    def artifact_name(self, source: str, preset: Preset, group_size: int | None = None) -> str:
        return f"{source}-{preset.name}.gguf"

    def _quantized(self, plan: Plan) -> bool:
        return any(e.type not in FLOAT_TYPES for e in plan.kept)

    def overhead_bytes(self, source, plan) -> int:
        """The header: metadata (the tokenizer's vocabulary is most of it), the tensor table, alignment padding."""
        from ..quant.types import GGUF_TYPES

        a, ck = source.arch, source.checkpoint
        w = GGUFWriter()
        write_metadata(w, a, read_tokenizer(ck.dir, a.vocab_size), source, get_target_preset(plan), read_license(ck.dir))
        for e in plan.kept:
            w.add_tensor(gguf_name(e.name, ck.text_prefix), e.shape, "F32")
        w.add_tensor(ROPE_FREQS, (a.global_head_dim // 2,), "F32")
        pads = len(w.tensors) * 32
        return len(w.header_bytes()) + pads + 4096  # 4 KB: the imatrix keys written with calibration

    def write(self, job) -> None:
        """One pass: every tensor streamed from the checkpoint in blocks of rows, encoded or quantized by ggml's own
        kernels (with the calibration's importance weights when the job has them), and written once. The file is
        then read back and every tensor's type checked against the plan."""
        t0 = time.perf_counter()
        names = convert(job.checkpoint, job.source, job.plan, job.preset, job.path, False, job.reporter,
                        importance=job.importance, threads=job.options.get("threads"))
        job.seconds["convert" if not self._quantized(job.plan) else "quantize"] = time.perf_counter() - t0
        check_types(job.path, names)

    towers_kind = "file"
    tower_choices = ("f16", "q8_0", "f32")

    def tower_policy(self, choice: str | None, preset: Preset | None = None):
        from .gguf_mmproj import mmproj_policy

        return mmproj_policy(choice or "f16")

    def check_towers(self, config: dict) -> None:
        from .gguf_mmproj import check_towers

        check_towers(config)

    def tower_artifact_name(self, source: str, tower_plan) -> str:
        from .gguf_mmproj import mmproj_name

        return mmproj_name(source, tower_plan.preset.removeprefix("mmproj-"))

    def write_towers(self, job, path: Path) -> None:
        from .gguf_mmproj import mmproj_policy, write_mmproj

        t0 = time.perf_counter()
        policy = mmproj_policy(job.tower_plan.preset.removeprefix("mmproj-"))
        write_mmproj(job.checkpoint, job.source.config, job.tower_plan, path, job.source.name, policy, job.reporter,
                     threads=job.options.get("threads"), digest=job.source.provenance().get("source_digest"))
        job.seconds["projector"] = time.perf_counter() - t0

    def tower_runner(self, artifact: Path, towers: Path | None, device: str, src):
        from .gguf_mmproj import find_mmproj
        from ..validate.mtmd import MtmdRunner

        mm = towers or find_mmproj(artifact)
        if mm is None:
            return None
        return MtmdRunner(artifact, mm, device=device, image_id=src.config.get("image_token_id", -1),
                          audio_id=src.config.get("audio_token_id", -1))

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf" and not path.name.startswith("mmproj-")

    def artifact_info(self, path: Path):
        from ..validate.llamacpp import artifact_info

        return artifact_info(path)

    def make_runner(self, path: Path, spec, device: str, preset: str):
        from ..validate.llamacpp import make_runner

        return make_runner(path, spec, device, preset)

    def probe(self) -> dict | None:
        import llama_cpp

        return {"gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}

    def skip_reason(self, device: str, platform: Platform) -> str | None:
        facts = platform.runtime(self.name)
        if facts is None:
            return self.not_installed()
        if device != "cpu" and not facts.get("gpu_offload"):
            flag = "-DGGML_CUDA=on" if device == "cuda" else "-DGGML_METAL=on"
            return f"this llama-cpp-python build has no GPU offload (rebuild it with CMAKE_ARGS={flag})"
        return None

    def backend(self, device: str) -> str:
        return "llama.cpp, CPU" if device == "cpu" else f"llama.cpp, all layers offloaded ({device})"
