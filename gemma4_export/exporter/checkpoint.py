"""Finding a Gemma 4 checkpoint and reading it lazily, one tensor (or one block of rows) at a time.

The reader parses each safetensors header itself and checks it against the file before trusting it (dtype known,
offsets inside the file, no overlaps, sizes equal to shape x dtype). A tensor is only read when asked for, with a
positioned read, and a large tensor can be read in blocks of rows, so peak memory follows the block, not the model.
Pickle checkpoints (.bin/.pt/.pth) are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from .arch import Gemma4Arch, load_config, read_arch
from .tensors import Role, TensorSpec, detect_text_prefix, expected_text_tensors, is_tower

# safetensors dtype -> (numpy dtype used to view the bytes, bytes per element). bf16 is viewed as uint16 and widened
# to float32 by a shift (numpy has no bfloat16).
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps headers at 100 MB


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _parse_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {hlen} header bytes, file has {size})")
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    base = 8 + hlen
    data_len = size - base
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor '{name}' has a negative dimension {shape}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1] if shape else DTYPES[dtype][1]
        if not (0 <= begin <= end) or end - begin != want:
            raise CheckpointError(
                f"{path}: tensor '{name}' spans bytes {begin}..{end} but {dtype}{list(shape)} needs {want}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data, the file holds {data_len}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, shape, path, base + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors '{n0}' and '{n1}' overlap in the file")
    return infos


# transformers' base classes (Gemma4Model, Gemma4TextModel: what AutoModel builds and saves) name their tensors without
# the "model." their head classes add (language_model.*, vision_tower.*; layers.*, embed_tokens.*); from_pretrained of
# a head class loads such a checkpoint by adding it, and so does Checkpoint: every name below is the head class's.
BASE_PREFIX = "model."
_BASE_ROOTS = ("language_model.", "layers.", "embed_tokens.")


def quantization_method(cfg: dict) -> str | None:
    """The quant_method of a checkpoint saved from a quantized model (bitsandbytes, fp8, gptq, awq, mlx, ...)."""
    for c in (cfg, cfg.get("text_config") or {}):
        q = c.get("quantization_config") or c.get("quantization")
        if isinstance(q, dict):
            return str(q.get("quant_method") or q.get("mode") or "quantized")
    return None


def base_model_layout(names: set[str]) -> bool:
    """Whether a checkpoint's tensor names are a base class's (no "model." prefix anywhere, a decoder at the root)."""
    return not any(n.startswith(BASE_PREFIX) for n in names) and any(n.startswith(_BASE_ROOTS) for n in names)


class Checkpoint:
    """A local Gemma 4 checkpoint directory: config, tokenizer files and lazily read safetensors shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointNotFoundError(f"{self.dir}: no such checkpoint directory")
        self.arch: Gemma4Arch = read_arch(self.dir)
        try:
            self._read_tensors()
        except CheckpointError as e:
            method = quantization_method(load_config(self.dir))
            if method is None and any("language_model.model.layers." in n for n in getattr(self, "tensors", ())):
                raise CheckpointError(f"{self.dir}: an MLX directory (mlx-lm's tensor names, language_model.model.*), "
                                      "not a transformers checkpoint: export from the checkpoint it was made "
                                      "from") from None
            if method is None:
                raise
            raise CheckpointError(
                f"{self.dir}: the weights are quantized ({method}, the config's quantization_config), and "
                "gemma4-export quantizes from the float weights. Export from the bf16/fp16/fp32 checkpoint (for a "
                "QLoRA fine-tune: the float base with --adapter, or the adapter merged into the float base with "
                f"peft's merge_and_unload and saved).\n  ({e})") from None
        self._files: dict[Path, object] = {}

    def _read_tensors(self) -> None:
        self.files = self._find_shards()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in _parse_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor '{name}' also appears in {self.tensors[name].file.name}")
                self.tensors[name] = info
        self._check_index()
        self.base_layout = base_model_layout(set(self.tensors))
        if self.base_layout:  # named as the head class names them: from_pretrained adds the prefix the same way
            self.tensors = {BASE_PREFIX + n: replace(i, name=BASE_PREFIX + n) for n, i in self.tensors.items()}
        self.text_prefix = detect_text_prefix(set(self.tensors))
        # KV-shared layers read their donor's cache: the hub's checkpoints carry their unused k/v weights, while
        # transformers' save_pretrained (every fine-tune) has no such modules to save. Either is accepted.
        self.expected: list[TensorSpec] = [
            s for s in expected_text_tensors(self.arch, self.text_prefix)
            if s.role != Role.KV_SHARED_UNUSED or s.name in self.tensors]
        self._check_against_config()

    # ---- discovery -------------------------------------------------------------------------------------------
    def _find_shards(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) not present: {', '.join(missing)}")
            self._weight_map = weight_map
            return [self.dir / n for n in names]
        self._weight_map = None
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.dir}: only pickle weights here ({', '.join(pickles)}); gemma4-export never loads pickle "
                "files (they can run code). Convert them to safetensors first."
            )
        raise CheckpointError(f"{self.dir}: no *.safetensors weights here")

    def _check_index(self) -> None:
        if not self._weight_map:
            return
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(f"{self.dir / INDEX_NAME}: says '{name}' is in {shard}, but it is not there")
        extra = set(self.tensors) - set(self._weight_map)
        if extra:
            raise CheckpointError(f"{self.dir / INDEX_NAME}: does not list {sorted(extra)[:5]}")

    def _check_against_config(self) -> None:
        problems = []
        for spec in self.expected:
            info = self.tensors.get(spec.name)
            if info is None:
                problems.append(f"missing tensor '{spec.name}' (expected shape {list(spec.shape)})")
            elif info.shape != spec.shape:
                problems.append(
                    f"{info.file.name}: tensor '{spec.name}' has shape {list(info.shape)}, "
                    f"the config implies {list(spec.shape)}"
                )
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"{info.file.name}: tensor '{spec.name}' has non-float dtype {info.dtype}")
        known = {s.name for s in self.expected}
        for name in self.tensors:
            if name.startswith(self.text_prefix) and name not in known and not is_tower(name):
                if name.endswith("lm_head.weight"):
                    continue
                problems.append(f"unexpected text tensor '{name}' ({self.tensors[name].file.name})")
        if problems:
            head = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"{self.dir}: checkpoint does not match its config.json:\n  {head}{more}")

    # ---- reading ---------------------------------------------------------------------------------------------
    # Plain positioned reads (no mmap): what is in memory is exactly the block asked for, so peak memory follows
    # the largest block, and pages of tensors already written are not kept resident.
    def _read(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        np_dtype, size = DTYPES[info.dtype]
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        buf = os.pread(f.fileno(), count * size, info.start + first * size)
        if len(buf) != count * size:
            raise CheckpointError(f"{info.file}: short read in tensor '{info.name}' (file changed or truncated)")
        return np.frombuffer(buf, dtype=np_dtype)

    def read_into(self, name: str, buf: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
        """As `raw` (or, with rows=(start, stop), as `rows`), read into `buf`, a uint8 array large enough, and
        returned as a view of it: a caller that reads many tensors reuses one buffer instead of new memory (and its
        page faults) for each."""
        info = self._info(name)
        np_dtype, size = DTYPES[info.dtype]
        shape, first = info.shape, 0
        if rows is not None:
            row = info.shape[-1]
            shape, first = (rows[1] - rows[0], row), rows[0] * row
        n = math.prod(shape) * size
        if buf.nbytes < n:
            raise ValueError(f"a {buf.nbytes}-byte buffer cannot hold '{name}' ({n} bytes)")
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        got = os.preadv(f.fileno(), [memoryview(buf)[:n]], info.start + first * size) if n else 0
        if got != n:
            raise CheckpointError(f"{info.file}: short read in tensor '{info.name}' (file changed or truncated)")
        return buf[:n].view(np_dtype).reshape(shape)

    def raw(self, name: str) -> np.ndarray:
        """The stored elements of one tensor, read into memory (bf16 as uint16 bit patterns)."""
        info = self._info(name)
        return self._read(info, 0, info.numel).reshape(info.shape)

    def iter_rows(self, name: str, max_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, block of stored rows) over the tensor flattened to 2-D (rows x last dim), each block at most
        ~max_bytes (at least one row). Stored dtype, as `raw`."""
        info = self._info(name)
        row = info.shape[-1] if info.shape else 1
        n_rows = info.numel // row if row else 0
        per = max(1, max_bytes // (row * DTYPES[info.dtype][1]))
        for r in range(0, n_rows, per):
            k = min(per, n_rows - r)
            yield r, self._read(info, r * row, k * row).reshape(k, row)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor flattened to 2-D (rows x last dim), stored dtype."""
        info = self._info(name)
        row = info.shape[-1]
        return self._read(info, start * row, (stop - start) * row).reshape(stop - start, row)

    def info(self, name: str) -> TensorInfo:
        return self._info(name)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: no tensor '{name}'") from None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tower_tensors(self) -> list[TensorInfo]:
        return [i for n, i in self.tensors.items() if is_tower(n)]


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(a)
    return a.astype(np.float32)


def f32_row_blocks(ck, name: str, max_bytes: int, ring: int = 3) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows widened to float32) over the tensor flattened to 2-D, each block about `max_bytes` of float32.
    The blocks live in a ring of `ring` reused buffers (raw and float32), so a long tensor costs no new memory, nor its
    page faults, per block: a block is valid until `ring - 1` more have been produced (3 suits `prefetched` with
    depth 1: one being used, one queued, one being filled). `ck` is a Checkpoint or an adapter-merged view."""
    info = ck.info(name)
    row = info.shape[-1] if info.shape else 1
    n_rows = info.numel // row if row else 0
    size = DTYPES[info.dtype][1] if info.dtype in DTYPES else 4
    per = max(1, max_bytes // (row * 4))
    raws: list[np.ndarray | None] = [None] * ring
    outs: list[np.ndarray | None] = [None] * ring
    for k, r in enumerate(range(0, n_rows, per)):
        n = min(per, n_rows - r)
        slot = k % ring
        if outs[slot] is None:
            raws[slot] = np.empty(min(per, n_rows) * row * size, np.uint8)
            outs[slot] = np.empty(min(per, n_rows) * row, np.float32)
        block = ck.read_into(name, raws[slot], (r, r + n))
        out = outs[slot][: n * row].reshape(n, row)
        if block.dtype == np.float32:
            out = block  # a merged adapter tensor arrives as new float32 memory
        elif info.dtype == "BF16":
            u = out.view(np.uint32)
            u[...] = block
            u <<= 16
        else:
            out[...] = block
        yield r, out


_DONE = object()


def prefetched(items: Iterable, depth: int = 1) -> Iterator:
    """`items`, produced in a background thread up to `depth` ahead of the consumer: the next block is read (and
    widened) while the caller quantizes this one. An exception in the producer is raised here; when the consumer
    stops early (an error, Ctrl-C, a closed generator) the producer stops at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((_DONE, e))

    t = threading.Thread(target=produce, name="prefetch", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


# ---- resolution ------------------------------------------------------------------------------------------------

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]


def resolve_checkpoint(variant=None, model_dir: str | Path | None = None, download: bool = True) -> Path:
    """The local directory of a checkpoint: --model-dir, the package (tiny-*), the Hugging Face cache, or the hub."""
    if model_dir is not None:
        p = Path(model_dir).expanduser()
        if not p.is_dir():
            raise CheckpointNotFoundError(f"--model-dir {p}: no such directory")
        return p
    if variant is None:
        raise CheckpointNotFoundError("give a --variant or a --model-dir")
    if variant.tiny:
        return variant.local_dir
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(variant.hub_id, allow_patterns=_WEIGHT_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    hint = (
        f"the weights of {variant.name} ({variant.hub_id}) are not in the Hugging Face cache. Get them with "
        f"`hf download {variant.hub_id}` (after accepting the license on huggingface.co and `hf auth login`), "
        "or pass --model-dir PATH to a local copy. The tiny-* variants ship with gemma4-export and work offline."
    )
    if offline or not download:
        raise CheckpointNotFoundError(hint)
    try:
        return Path(snapshot_download(variant.hub_id, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as e:  # network, auth, gated repo: all end in the same advice
        raise CheckpointNotFoundError(f"{hint}\n  (download failed: {type(e).__name__}: {e})") from None


def weights_present(variant) -> bool:
    """Whether a variant's weights are on this machine without a download."""
    if variant.tiny:
        return (variant.local_dir / "config.json").is_file()
    try:
        resolve_checkpoint(variant, download=False)
        return True
    except CheckpointNotFoundError:
        return False
