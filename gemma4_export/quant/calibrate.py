"""Calibration: importance statistics measured on the fp32 model, for quantizers that weight their error.

For every weight matrix, the mean squared activation of each of its input channels over a calibration set: what
llama.cpp's `llama-imatrix` records, and what its quantizers (and ours for MLX and ONNX) weight the rounding error
by. The activations come from the streamed fp32 model (validate/streamed.py: transformers' own modules, one decoder
layer in memory at a time), so calibrating a 31B checkpoint needs no more memory than its reference does.

- Dense matrices count every token; MoE experts count, per expert, the tokens routed to it (the expert's down
  projection sees the expert's own GELU-gated activations, recomputed from its weights for the routed tokens).
- The output head (the tied token embedding, or an untied `output.weight`) records the final normed hidden states.
- Lookup tables (the token embedding as a lookup, the PLE table) take no matrix input; what they get instead is
  each token's frequency on the calibration set (`token_counts`).

With `hessians=True` (the default for every target's own calibration) each matrix input's second moments are
collected too, sum over tokens of x x^T, for GPTQ's error feedback (quant.weighted.gptq): one per distinct input
(q, k and v share theirs), whole where HESSIAN_BUDGET allows (the tiny models; on the published sizes, blocks of
128 to 1,024 channels) and per expert where the experts' fit too; cached beside the imatrix.

The statistics are keyed by llama.cpp's tensor names and written as a llama.cpp GGUF imatrix file
(`write_imatrix`), which `llama-quantize --imatrix` reads unchanged. `importance_for` caches that file per
checkpoint digest and calibration text, so a second export of the same checkpoint reads it instead of recomputing.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import Staging
from ..errors import Gemma4ExportError
from ..exporter.tokenizer import tokenizer_file
from ..progress import Reporter, Silent

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
# Tokens per calibration chunk (each starts with BOS): longer than the real models' 512-token sliding window, so
# the sliding layers see full windows and the global layers see past them.
DEFAULT_CHUNK = 1024
DEFAULT_CHUNKS = 16


def default_chunks() -> int:
    """DEFAULT_CHUNKS, or the environment's GEMMA4_EXPORT_CALIBRATION_CHUNKS (the test suite sets a small number:
    it checks the machinery on many throwaway checkpoints, each calibrated afresh)."""
    v = os.environ.get("GEMMA4_EXPORT_CALIBRATION_CHUNKS")
    try:
        return max(1, int(v)) if v else DEFAULT_CHUNKS
    except ValueError:
        raise CalibrationError(f"GEMMA4_EXPORT_CALIBRATION_CHUNKS={v!r}: give a whole number") from None
DATASET_NAME = "gemma4-export calibration set (code, prose in 12 languages, chat turns)"
# Types made only with calibration: at about 2.6 bits per weight plain rounding loses too much (llama.cpp warns the
# same way for Q2_K without an imatrix, and refuses the IQ1/IQ2 types).
NEEDS_CALIBRATION = frozenset({"Q2_K"})
# The inputs' second moments (quant.weighted.Hessian, for GPTQ's error feedback) are kept block-diagonal, in blocks
# as wide as fit this many bytes of float32 over all matrices (the whole width on the tiny models and where it fits):
# calibrating writes each layer's to the cache beside the imatrix as the layer ends (and holds them only where it
# cannot).
HESSIAN_BUDGET = 2 << 30
HESSIAN_BLOCKS = (8192, 4096, 2048, 1024, 512, 256, 128)
# Rows of a matrix input squared in float64 at a time (a whole chunk's input to E2B's double-wide down projection is
# 100 MB in float64).
SQUARE_ROWS = 256
# The calibration chunks run through the layers in as few groups as keep each group's sequences (hidden states,
# per-layer inputs, the keys and values KV-shared layers read) under this many bytes, or under half the largest
# layer's float32 weights where that is more: splitting pays while the sequences are large next to the layer. Each
# further group reads the model again and adds its second moments to the file's. E2B's 16 chunks hold 49 MB each
# beside a 0.26 GB layer: 8 groups of 2; 26B-A4B's 11.5 MB each (hidden states alone): 2 groups of 8, which keeps
# its calibration under 1 GB (one group peaked at 0.97 GB on two of its layers, and the 30 layers' statistics add
# 53 MB). A further pass costs a read and upcast of the layers, little beside the tokens' compute.
GROUP_BYTES = 128 << 20


class CalibrationError(Gemma4ExportError):
    pass


# ---- the calibration text ----------------------------------------------------------------------------------------


def _documents(tokenizer) -> dict[str, list[str]]:
    """The shipped set's documents by kind; chat turns rendered with the checkpoint's own chat template, or, for a
    tokenizer saved without one (a base model's, a raw-text fine-tune's), as their plain text."""
    with gzip.open(CALIBRATION_DIR / "code.txt.gz", "rb") as f:
        code = f.read().decode("utf-8")
    files = ["# file:" + p for p in code.split("# file:") if p.strip()]
    prose = [d.strip() for d in (CALIBRATION_DIR / "prose.txt").read_text(encoding="utf-8").split("<|doc|>")
             if d.strip()]
    chats = json.loads((CALIBRATION_DIR / "chat.json").read_text(encoding="utf-8"))
    bos = getattr(tokenizer, "bos_token", None) or ""
    rendered = []
    for conv in chats:
        if not getattr(tokenizer, "chat_template", None):
            rendered.append("\n\n".join(m["content"] for m in conv))
            continue
        text = tokenizer.apply_chat_template(conv, tokenize=False)
        rendered.append(text[len(bos):] if bos and text.startswith(bos) else text)  # each chunk has its own BOS
    return {"code": files, "prose": prose, "chat": rendered}


def shipped_text(tokenizer) -> str:
    """The shipped calibration set as one text: its code files, prose documents and chat conversations interleaved
    (a fixed shuffle of each kind, then taken in turn), so that any prefix of it mixes all three."""
    kinds = _documents(tokenizer)
    rng = random.Random(0)
    for docs in kinds.values():
        rng.shuffle(docs)
    out, queues = [], [list(v) for v in kinds.values()]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return "\n\n".join(out)


@dataclass(frozen=True)
class CalibrationSet:
    """Token chunks to calibrate on, with what they came from."""

    chunks: list[list[int]]
    dataset: str  # what the text was: the shipped set, or the user's file name
    text_sha256: str

    @property
    def chunk_size(self) -> int:
        return len(self.chunks[0]) if self.chunks else 0

    @property
    def key(self) -> str:
        """Identifies the token chunks (text, tokenizer's ids, chunking) for the cache."""
        h = hashlib.sha256(np.asarray(self.chunks, dtype=np.int32).tobytes()).hexdigest()
        return h[:16]


def calibration_set(directory: Path, bos: int, text_file: str | Path | None = None, chunk: int = DEFAULT_CHUNK,
                    chunks: int | None = None) -> CalibrationSet:
    """Cut the calibration text (the shipped set, or `text_file`) into `chunks` chunks of `chunk` tokens, each
    BOS then chunk-1 tokens of text, as llama-imatrix cuts its input."""
    import transformers

    tokenizer_file(directory)  # a clear error for a checkpoint saved without its tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    tok.model_max_length = 1 << 30
    if text_file is None:
        text, name = shipped_text(tok), DATASET_NAME
    else:
        p = Path(text_file)
        if not p.is_file():
            raise CalibrationError(f"--calibration {p}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CalibrationError(f"--calibration {p}: not UTF-8 text") from None
        name = p.name
    chunks = default_chunks() if chunks is None else chunks
    if chunk < 2 or chunks < 1:
        raise CalibrationError(f"calibration chunks of {chunk} tokens x {chunks}: need at least 2 tokens x 1")
    ids = tok.encode(text, add_special_tokens=False)
    body = chunk - 1
    n = min(chunks, len(ids) // body)
    if n == 0:
        raise CalibrationError(f"calibration text {name!r} gives {len(ids)} tokens; one chunk needs {body}")
    out = [[bos] + ids[i * body: (i + 1) * body] for i in range(n)]
    return CalibrationSet(out, name, hashlib.sha256(text.encode("utf-8")).hexdigest())


# ---- the statistics ----------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Per-matrix input statistics, keyed by llama.cpp tensor name: `sums[name]` float32 [n_mat, n_in] (sum over
    tokens of each input channel's square; n_mat is the number of experts for an expert tensor, else 1) and
    `counts[name]` float32 [n_mat] (the tokens that reached it)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    token_counts: np.ndarray | None = None  # int64 [vocab]: how often each token occurs in the calibration set
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the imatrix file it was read from or written to
    # per matrix float32 [n_mat, nb, B, B] and its input width: the block-diagonal second moments (collect with
    # hessians=True; an imatrix file has none). Read from the cache, each is a StoredArray, mapped when asked for.
    hessians: dict[str, tuple[np.ndarray | StoredArray, int]] | None = None

    def hessian(self, name: str):
        """quant.weighted.Hessian of a matrix (by llama.cpp name), or None. A new one each call: its second moments
        (mapped from the cache file) and factors (float64) live as long as the caller's tensor, not the whole
        export, so an export's memory follows its largest Hessian, not their sum."""
        from .weighted import Hessian

        if not self.hessians or name not in self.hessians:
            return None
        h, width = self.hessians[name]
        return Hessian(h.load() if isinstance(h, StoredArray) else h, width)

    def hessian_for(self, hf_name: str, prefix: str):
        """`hessian` for a checkpoint tensor name."""
        from ..targets.gguf import gguf_name

        try:
            return self.hessian(gguf_name(hf_name, prefix))
        except Gemma4ExportError:
            return None

    @property
    def hessian_block(self) -> int | None:
        """The Hessians' block width (the widest matrix input where it is whole), or None without them."""
        return max(h.shape[2] for h, _ in self.hessians.values()) if self.hessians else None

    def describe_hessians(self) -> dict:
        """What the plan records: the block width, how many matrices have a Hessian, how many do not (experts left
        to the diagonal statistics where theirs do not fit the budget)."""
        if not self.hessians:
            return {}
        return {"hessian_block": self.hessian_block, "matrices": len(self.hessians),
                "diagonal_only": sorted(set(self.sums) - set(self.hessians))[:8],
                "diagonal_only_count": len(set(self.sums) - set(self.hessians)),
                "bytes": sum(h.nbytes for h in {id(h): h for h, _ in self.hessians.values()}.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def weights(self, name: str) -> np.ndarray | None:
        """float32 [n_mat, n_in]: the mean squared activation of each input channel, or None when the matrix has
        no statistics. This is exactly the vector llama-quantize derives from the file (sums / counts; an expert
        that no calibration token reached gets all ones), so an export here and `llama-quantize --imatrix` on the
        same file quantize identically."""
        if name not in self.sums:
            return None
        s, c = self.sums[name], self.counts[name]
        out = np.ones_like(s, dtype=np.float32)
        seen = c > 0
        out[seen] = s[seen] / c[seen, None]
        return out

    def for_tensor(self, hf_name: str, prefix: str) -> np.ndarray | None:
        """`weights` for a checkpoint tensor name."""
        from ..targets.gguf import gguf_name

        try:
            return self.weights(gguf_name(hf_name, prefix))
        except Gemma4ExportError:
            return None

    @property
    def entries(self) -> int:
        return len(self.sums)


def _input_key(name: str) -> str:
    """Matrices that read the same input share one Hessian: attention's q, k and v; the MLP's gate and up."""
    return re.sub(r"\.(attn_k|attn_v)\.", ".attn_q.", name).replace(".ffn_up.", ".ffn_gate.")


def hessian_plan(widths: dict[str, tuple[int, int]], budget: int = HESSIAN_BUDGET) -> tuple[int, set[str]]:
    """Which matrices (llama.cpp names, with their (n_mat, input width)) get Hessians, in blocks of what width:
    the widest block in HESSIAN_BLOCKS (or every matrix whole) whose float32 blocks, one set per distinct input,
    fit `budget` bytes; expert tensors (one Hessian per expert) only where they fit too, else they keep the
    diagonal statistics alone. Returns (block, names)."""
    inputs: dict[str, tuple[int, int]] = {}
    for name, nw in widths.items():
        inputs[_input_key(name)] = nw

    def size(b, keys):
        total = 0
        for k in keys:
            n, w = inputs[k]
            bb = min(b, -(-w // 32) * 32)  # a narrower input is one block of its own width, as collect makes it
            total += n * -(-w // bb) * bb * bb * 4
        return total

    dense = [k for k, (n, _) in inputs.items() if n == 1]
    widest = -(-max((w for _, w in inputs.values()), default=32) // 32) * 32
    candidates = [widest] + [b for b in HESSIAN_BLOCKS if b < widest]  # every input whole first
    for b in candidates:
        if size(b, inputs) <= budget:
            return b, set(widths)
        if size(b, dense) <= budget:
            break
    return b, {n for n, (m, _) in widths.items() if m == 1}


class _HessianFile:
    """Second moments written to a file layer by layer as `collect` finishes each layer (the streamed model runs
    every chunk through a layer before the next), as safetensors (read_hessians reads it): the layout is fixed
    before the first layer (every shape follows from the plan), the header is written last into room kept for it,
    and the file is renamed to its final name only when whole. write_hessians writes Hessians held in memory
    through it too."""

    def __init__(self, final: Path, shapes: dict[str, tuple[int, ...]], widths: dict[str, int]):
        self.final = final
        self.offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        end = 0
        for key, shape in sorted(shapes.items()):
            self.offsets[key] = (end, shape)
            end += 4 * math.prod(shape)
        self.header_len = -(-len(self._header(widths)) // 8) * 8  # every name listed: the most it can need
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Staging(final).path
        self.file = open(self.path, "w+b")
        total = 8 + self.header_len + end
        try:
            try:
                os.posix_fallocate(self.file.fileno(), 0, total)  # a full disk says so now, not halfway through
            except (AttributeError, OSError) as e:  # macOS has no posix_fallocate; some file systems refuse it
                if getattr(e, "errno", None) == errno.ENOSPC:
                    raise
                self.file.truncate(total)
        except BaseException:
            self.discard()
            raise

    def _header(self, widths: dict[str, int]) -> bytes:
        header: dict = {"__metadata__": {n: json.dumps([w, _input_key(n)]) for n, w in sorted(widths.items())}}
        for key, (begin, shape) in self.offsets.items():
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + 4 * math.prod(shape)]}
        return json.dumps(header, separators=(",", ":")).encode()

    def write(self, key: str, h: np.ndarray) -> None:
        begin, shape = self.offsets[key]
        if h.shape != shape or h.dtype != np.float32:
            raise RuntimeError(f"{key}: second moments {h.dtype} {list(h.shape)}, the layout has float32 {shape}")
        self.file.seek(8 + self.header_len + begin)
        self.file.write(np.ascontiguousarray(h).data)

    def read(self, key: str) -> np.ndarray:
        begin, shape = self.offsets[key]
        self.file.flush()
        return np.fromfile(self.path, np.float32, math.prod(shape), offset=8 + self.header_len + begin).reshape(shape)

    def publish(self, widths: dict[str, int]) -> dict[str, tuple[StoredArray, int]]:
        """Write the header (the names `widths` gives), rename the file to its final name, and return its arrays."""
        header = self._header(widths).ljust(self.header_len)  # JSON followed by spaces, as safetensors allows
        self.file.seek(0)
        self.file.write(len(header).to_bytes(8, "little") + header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path, self.final)
        base = 8 + self.header_len
        arrays = {k: StoredArray(self.final, base + b, shape) for k, (b, shape) in self.offsets.items()}
        return {n: (arrays[_input_key(n)], w) for n, w in widths.items()}

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def collect(src, calib: CalibrationSet, device: str = "cpu", reporter: Reporter | None = None,
            keep_bytes: int = 0, hessians: bool = False, budget: int = HESSIAN_BUDGET,
            hessian_path: str | Path | None = None, groups: int | None = None) -> Importance:
    """Run the calibration chunks through the streamed fp32 model of `src` (a ModelSource with weights) and
    record every matrix's input statistics; with `hessians`, also their block-diagonal second moments (the sum of
    x x^T within blocks of channels, whose diagonal is the imatrix's sums), in blocks sized by `budget`.

    With `hessian_path`, each layer's second moments are written there as soon as the layer is done and the
    Importance holds them as StoredArrays of that file, so calibrating holds one layer's, not all (1.2-2.0 GB on
    the published configs); where the file cannot be written (a full or read-only disk), they stay in memory.
    The chunks run in `groups` groups (None: as GROUP_BYTES allows), each group's second moments added to the
    earlier groups'. `keep_bytes`: decoder layers the streamed model may keep loaded; a group's pass reads each
    layer once, so none."""
    import torch

    from ..exporter.tensors import Tensor, hf_name
    from ..targets.gguf import gguf_name
    from ..validate.lazy import StreamedExperts, StreamedLinear
    from ..validate.streamed import StreamedModel

    reporter = reporter or Silent()
    t0 = time.perf_counter()
    model = StreamedModel(src.directory, device, src.adapter, keep_bytes)
    prefix = model.prefix
    acc_dtype = torch.float32 if model.device == "mps" else torch.float64
    sums: dict[str, object] = {}
    counts: dict[str, object] = {}
    hess: dict[str, object] = {}
    block, with_hessian = None, set()

    hess_of_input: dict[str, object] = {}
    aliases: set[str] = set()  # names whose input another name's Hessian already accumulates
    spill: _HessianFile | None = None
    hess_out = None
    group = 0  # the group of chunks running now
    written: dict[str, int] = {}  # name -> the group whose second moments it last wrote

    def spill_done() -> None:
        """Write the second moments held now (those of the layer just finished) to the file, added to what the
        earlier groups wrote there, and let them go; where a write fails, read back what the file holds and keep
        everything in memory from here on."""
        nonlocal spill
        if spill is None:
            return
        live = [n for n, h in hess.items() if h is not None]
        done: set[str] = set()
        try:
            for n in live:
                if n not in aliases:
                    key = _input_key(n)
                    h = hess[n].cpu().numpy()
                    spill.write(key, h + spill.read(key) if group else h)
                    done.add(key)
        except OSError as e:
            reporter.note(f"calibration: second moments kept in memory ({e})")
            back: dict[str, object] = {}
            for n, h in hess.items():
                key = _input_key(n)
                if key in back:
                    pass
                elif h is None or key in done:  # the file holds them in full
                    back[key] = torch.from_numpy(spill.read(key)).to(model.device)
                elif group:  # the file holds the earlier groups'
                    back[key] = h + torch.from_numpy(spill.read(key)).to(model.device)
                else:
                    back[key] = h
                hess[n] = back[key]
            hess_of_input.clear()
            spill.discard()
            spill = None
            return
        for n in live:
            hess[n] = None
            written[n] = group
        hess_of_input.clear()

    def add(name: str, given, mat: int = 0, n_mat: int = 1) -> None:
        x = given.reshape(-1, given.shape[-1])
        if name not in sums:
            sums[name] = torch.zeros(n_mat, x.shape[1], dtype=acc_dtype, device=x.device)
            counts[name] = torch.zeros(n_mat, dtype=acc_dtype, device=x.device)
        if block is not None and name in with_hessian and hess.get(name) is None:
            if written.get(name) == group:
                raise RuntimeError(f"{name}: an input after its layer's second moments were written")
            key = _input_key(name)
            if key in hess_of_input:  # q, k and v (gate and up) read the same input: one Hessian for all
                hess[name] = hess_of_input[key]
                aliases.add(name)
            else:
                b = min(block, -(-x.shape[1] // 32) * 32)
                hess[name] = hess_of_input[key] = torch.zeros(n_mat, -(-x.shape[1] // b), b, b,
                                                              dtype=torch.float32, device=x.device)
        for r in range(0, x.shape[0], SQUARE_ROWS):  # a float64 copy of a few rows, not of a whole chunk's
            sums[name][mat] += x[r:r + SQUARE_ROWS].to(acc_dtype).square().sum(0)
        counts[name][mat] += x.shape[0]
        if name in hess and name not in aliases:
            h = hess[name]
            b = h.shape[2]
            xf = x.to(torch.float32)
            for k in range(h.shape[1]):
                xb = xf[:, k * b:(k + 1) * b]
                h[mat, k, :xb.shape[1], :xb.shape[1]] += xb.T @ xb

    hooked: set[str] = set()

    def linear_hook(name: str):
        hooked.add(name)
        return lambda mod, args: add(name, args[0])

    def expert_stats(gate_up: str, down: str, n: int):
        """watch(e, xe, act): expert e's inputs (its tokens) and its down projection's (the gated activations)."""
        hooked.update((gate_up, down))

        def watch(e: int, xe, act) -> None:
            add(gate_up, xe, e, n)
            add(down, act, e, n)
        return watch

    def experts_hook(watch):
        """For transformers' experts module, whose weights are loaded: each routed expert's inputs, and its gated
        activations recomputed from its weights (streamed experts hand both to `watch` as they run)."""
        def hook(mod, args):
            x, top_index = args[0], args[1]
            x = x.reshape(-1, x.shape[-1])
            for e in torch.unique(top_index).tolist():
                if e >= mod.num_experts:
                    continue
                xe = x[(top_index == e).any(dim=-1).nonzero().flatten()]
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                watch(e, xe, mod.act_fn(gate) * up)
        return hook

    handles = []
    try:
        for i, layer in enumerate(model.shell.layers):
            names = model._layer_names(i)  # module parameter -> canonical key
            gname = lambda rel: gguf_name(hf_name(names[rel], i, prefix), prefix)  # noqa: B023, E731
            by_key = {k: rel for rel, k in names.items()}
            for mname, mod in layer.named_modules():
                if isinstance(mod, (torch.nn.Linear, StreamedLinear)) and f"{mname}.weight" in names:
                    handles.append(mod.register_forward_pre_hook(linear_hook(gname(f"{mname}.weight"))))
            if Tensor.EXPERTS_GATE_UP in by_key:  # the experts module holds both 3-D tensors
                rel = by_key[Tensor.EXPERTS_GATE_UP]
                mod = layer.get_submodule(rel.rsplit(".", 1)[0])
                watch = expert_stats(gname(rel), gname(by_key[Tensor.EXPERTS_DOWN]), mod.num_experts)
                handles.append(mod.watch(watch) if isinstance(mod, StreamedExperts) else
                               mod.register_forward_pre_hook(experts_hook(watch)))
        if model.has_ple:
            pname = gguf_name(hf_name(Tensor.PLE_MODEL_PROJ, prefix=prefix), prefix)
            handles.append(model.shell.per_layer_model_projection.register_forward_pre_hook(linear_hook(pname)))
        head = gguf_name(model.head_name, prefix)
        if hessians:  # the matrices hooked above, and the head
            hooked.add(head)
            widths = {}
            for spec in src.checkpoint.expected:
                if len(spec.shape) >= 2:
                    try:
                        name = gguf_name(spec.name, prefix)
                    except Gemma4ExportError:
                        continue
                    if name in hooked:
                        widths[name] = (spec.shape[0] if len(spec.shape) == 3 else 1, spec.shape[-1])
            block, with_hessian = hessian_plan(widths, budget)
            if hessian_path is not None and with_hessian:
                shapes = {}
                for name in with_hessian:
                    n, w = widths[name]
                    b = min(block, -(-w // 32) * 32)
                    shapes[_input_key(name)] = (n, -(-w // b), b, b)
                try:
                    spill = _HessianFile(Path(hessian_path), shapes, {n: widths[n][1] for n in with_hessian})
                except OSError as e:
                    reporter.note(f"calibration: second moments kept in memory ({e})")

        def layer_done(i: int) -> None:
            spill_done()
            if group == groups - 1:  # its sums are final: float32, as the imatrix holds them (26B-A4B's experts'
                # are 3.6 MB a layer in float64, 108 MB over the model by its last layer)
                for name in [n for n in sums if n.startswith(f"blk.{i}.")]:
                    sums[name] = sums[name].to(torch.float32)
            task.advance(1)

        n = len(calib.chunks)
        if groups is None:
            per = max(GROUP_BYTES, model.layer_bytes() // 2) // max(1, model.token_bytes() * calib.chunk_size)
            groups = -(-n // max(1, per))  # as few as hold at most `per` chunks each
        groups = max(1, min(n, groups))
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        label = f"calibrate on {n} x {calib.chunk_size} tokens" + (f" in {groups} groups" if groups > 1 else "")
        with torch.no_grad(), reporter.task(label, model.config.num_hidden_layers * groups, unit="layers") as task:
            for group in range(groups):
                seqs = model.start(calib.chunks[bounds[group]:bounds[group + 1]])
                model.run_layers(seqs, layer_done)
                for s in seqs:
                    add(head, s.hidden[0])
                del seqs
                spill_done()  # the head's
        device_used = model.device
        if spill is not None:
            hess_out = spill.publish({n: sums[n].shape[1] for n in hess})
            spill = None
    finally:
        for h in handles:
            h.remove()
        model.close()
        if spill is not None:
            spill.discard()
    if hess and hess_out is None:  # held in memory
        arrays: dict[int, np.ndarray] = {}  # a shared input's Hessian is one array under each of its names
        hess_out = {k: (arrays.setdefault(id(v), v.cpu().numpy()), sums[k].shape[1]) for k, v in hess.items()}
    vocab = src.arch.vocab_size
    tokens = np.bincount(np.concatenate([np.asarray(c) for c in calib.chunks]), minlength=vocab).astype(np.int64)
    return Importance(
        {k: v.to(torch.float32).cpu().numpy() for k, v in sums.items()},
        {k: v.to(torch.float32).cpu().numpy() for k, v in counts.items()},
        [calib.dataset], len(calib.chunks), calib.chunk_size, tokens[:vocab],
        {"device": device_used, "seconds": round(time.perf_counter() - t0, 2), "text_sha256": calib.text_sha256},
        hessians=hess_out,
    )


# ---- llama.cpp's imatrix file ------------------------------------------------------------------------------------

IN_SUM2, COUNTS = ".in_sum2", ".counts"


def write_imatrix(imp: Importance, path: str | Path) -> Path:
    """Write the statistics as llama.cpp's GGUF imatrix (what `llama-imatrix` writes and `llama-quantize --imatrix`
    reads): general.type "imatrix", the datasets, chunk count and chunk size, and per matrix `<name>.in_sum2` (F32,
    ne [n_in, n_mat]: sums of squared activations) and `<name>.counts` (F32, ne [1, n_mat]: tokens). Atomic."""
    from gguf import GGUFValueType, Keys

    from ..atomic import atomic_file
    from ..targets.gguf_file import GGUFWriter

    w = GGUFWriter()
    w.string(Keys.General.TYPE, "imatrix")
    w.array(Keys.IMatrix.DATASETS, imp.datasets, GGUFValueType.STRING)
    w.u32(Keys.IMatrix.CHUNK_COUNT, imp.chunk_count)
    w.u32(Keys.IMatrix.CHUNK_SIZE, imp.chunk_size)
    data: dict[str, np.ndarray] = {}
    for name in sorted(imp.sums):
        s, c = imp.sums[name], imp.counts[name]
        w.add_tensor(name + IN_SUM2, s.shape, "F32")
        w.add_tensor(name + COUNTS, (c.shape[0], 1), "F32")
        data[name + IN_SUM2], data[name + COUNTS] = s.astype(np.float32), c.astype(np.float32).reshape(-1, 1)
    path = Path(path)
    with atomic_file(path, True, 0) as st, open(st.path, "wb", buffering=0) as f:
        w.write(f, lambda entry: [data[entry.name]])
    imp.path = path
    return path


def read_imatrix(path: str | Path) -> Importance:
    """Read a GGUF imatrix (ours, or llama-imatrix's). A legacy .dat imatrix or any other file is refused."""
    from ..targets.gguf_file import GGUFFormatError, read_gguf

    p = Path(path)
    try:
        g = read_gguf(p)
    except GGUFFormatError as e:
        raise CalibrationError(f"{p}: not a GGUF imatrix ({e}); convert a legacy .dat imatrix with "
                               "llama-imatrix --in-file old.dat -o new.gguf") from None
    if g.metadata.get("general.type") != "imatrix":
        raise CalibrationError(f"{p}: a GGUF file, but not an imatrix (general.type "
                               f"{g.metadata.get('general.type')!r})")
    sums, counts = {}, {}
    for tname in g.tensors:
        if tname.endswith(IN_SUM2):
            name = tname[: -len(IN_SUM2)]
            if name + COUNTS not in g.tensors:
                raise CalibrationError(f"{p}: {tname} has no {name + COUNTS}")
            s = g.read_tensor(tname)
            s = s.reshape(-1, s.shape[-1])
            c = g.read_tensor(name + COUNTS).reshape(-1)
            if c.shape[0] != s.shape[0]:
                raise CalibrationError(f"{p}: {name} has {s.shape[0]} matrices and {c.shape[0]} counts")
            sums[name], counts[name] = s, c
    if not sums:
        raise CalibrationError(f"{p}: an imatrix with no entries")
    md = g.metadata
    return Importance(sums, counts, list(md.get("imatrix.datasets") or []), int(md.get("imatrix.chunk_count", 0)),
                      int(md.get("imatrix.chunk_size", 0)), path=p)


def check_matches(imp: Importance, src) -> None:
    """An imatrix given by the user belongs to this model: every entry it has for this model's matrices has their
    input width and matrix count, and it has entries for some of them."""
    from ..targets.gguf import gguf_name

    ck = src.checkpoint
    matched = 0
    for spec in ck.expected:
        if len(spec.shape) < 2:
            continue
        try:
            name = gguf_name(spec.name, ck.text_prefix)
        except Gemma4ExportError:
            continue
        if name not in imp.sums:
            continue
        n_mat = spec.shape[0] if len(spec.shape) == 3 else 1
        got = imp.sums[name].shape
        if got != (n_mat, spec.shape[-1]):
            raise CalibrationError(f"{imp.path}: entry {name} is [{got[0]} x {got[1]}], this model's tensor needs "
                                   f"[{n_mat} x {spec.shape[-1]}]: the imatrix is of another model")
        matched += 1
    if matched == 0:
        raise CalibrationError(f"{imp.path}: no entry matches a tensor of {src.name}: the imatrix is of another model")


# ---- calibrating a checkpoint, with a cache ----------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("GEMMA4_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma4-export")
    return Path(base) / "imatrix"


def write_hessians(imp: Importance, path: str | Path) -> Path:
    """Hessians held in memory, written as `collect` writes them layer by layer (_HessianFile): safetensors, one
    float32 [n_mat, nb, B, B] per distinct input, the metadata giving each matrix's input width and the input it is
    stored under. Atomic."""
    arrays: dict[str, np.ndarray] = {}
    for name, (h, _) in imp.hessians.items():
        if arrays.setdefault(_input_key(name), h) is not h:
            raise ValueError(f"{name}: second moments of its own for an input it shares with another matrix")
    widths = {n: w for n, (_, w) in imp.hessians.items()}
    out = _HessianFile(Path(path), {k: tuple(h.shape) for k, h in arrays.items()}, widths)
    try:
        for k, h in arrays.items():
            out.write(k, h)
        out.publish(widths)
    except BaseException:
        out.discard()
        raise
    return Path(path)


@dataclass(frozen=True)
class StoredArray:
    """A float32 array in a safetensors file, read only when `load` maps it (read-only; the mapping, and the pages
    read through it, go when the returned array does)."""

    path: Path
    offset: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    def load(self) -> np.ndarray:
        return np.memmap(self.path, np.float32, "r", self.offset, self.shape)


def read_hessians(path: str | Path) -> dict[str, tuple[StoredArray, int]]:
    """The Hessians write_hessians wrote, each a StoredArray: the header is checked here (every tensor float32,
    its bytes inside the file), the values are read when a tensor is quantized."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    arrays = {}
    for k, t in header.items():
        begin, end = t["data_offsets"]
        shape = tuple(int(d) for d in t["shape"])
        if t["dtype"] != "F32" or end - begin != 4 * math.prod(shape) or 8 + n + end > size:
            raise ValueError(f"{path}: {k} is not a whole float32 tensor of {list(shape)}")
        arrays[k] = StoredArray(path, 8 + n + begin, shape)
    out = {}
    for name, v in meta.items():
        width, first = json.loads(v)
        out[name] = (arrays[first], int(width))
    return out


def importance_for(src, text_file: str | Path | None = None, chunk: int = DEFAULT_CHUNK,
                   chunks: int | None = None, device: str = "cpu", reporter: Reporter | None = None,
                   use_cache: bool = True, hessians: bool = False) -> Importance:
    """The importance statistics of `src` (a ModelSource with weights) on the calibration text: read from the cache
    when this checkpoint (by digest, adapter included) was calibrated on the same tokens before, else measured and
    cached (the imatrix file, and the token frequencies beside it). `hessians`: with the inputs' second moments
    too (cached beside them; a cache entry without them is measured again)."""
    reporter = reporter or Silent()
    calib = calibration_set(src.checkpoint.dir, src.arch.bos_token_id, text_file, chunk, chunks)
    path = cache_dir() / f"{src.digest.removeprefix('sha256:')[:16]}-{calib.key}.imatrix.gguf"
    tokens_path = path.with_suffix(".tokens.npy")
    stem = path.name.removesuffix(".imatrix.gguf")
    hess_path = path.with_name(f"{stem}-{HESSIAN_BUDGET >> 20}M.hessian.safetensors")
    if use_cache and path.is_file() and tokens_path.is_file() and (not hessians or hess_path.is_file()):
        try:
            imp = read_imatrix(path)
            imp.token_counts = np.load(tokens_path)
            if hessians:
                imp.hessians = read_hessians(hess_path)
            imp.meta = {"cached": True}
            reporter.note(f"calibration: cached imatrix {path}")
            return imp
        except (CalibrationError, OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    # the second moments go to the cache layer by layer as they are measured (kept in memory where they cannot)
    imp = collect(src, calib, device, reporter, hessians=hessians, hessian_path=hess_path if use_cache else None)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_imatrix(imp, path)
            tmp = tokens_path.with_name(tokens_path.name + ".tmp.npy")
            np.save(tmp, imp.token_counts)
            os.replace(tmp, tokens_path)
            if imp.hessians and not all(isinstance(h, StoredArray) for h, _ in imp.hessians.values()):
                write_hessians(imp, hess_path)
                imp.hessians = read_hessians(hess_path)  # the export reads each from the file, not all at once
        except OSError as e:  # a read-only or full cache does not stop the export
            reporter.note(f"calibration: not cached ({e})")
    return imp
