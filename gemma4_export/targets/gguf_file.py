"""The GGUF container: a streaming writer and a reader that checks every length against the file.

The writer lays out the header, metadata and tensor table first (offsets are computable from the plan's sizes), then
takes each tensor's bytes as a stream of blocks, so no tensor needs to be whole in memory. The reader never trusts a
count or length before checking it against the bytes that remain: a malformed or hostile file gets a GGUFFormatError
naming what is wrong, never a hang or an allocation of absurd size.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import Gemma4ExportError

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32
MAX_DIMS = 4

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {GGUFValueType.INT32: "<i4", GGUFValueType.UINT32: "<u4", GGUFValueType.FLOAT32: "<f4",
          GGUFValueType.BOOL: "?", GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.INT64: "<i8",
          GGUFValueType.UINT64: "<u8", GGUFValueType.FLOAT64: "<f8", GGUFValueType.INT16: "<i2",
          GGUFValueType.UINT16: "<u2"}


class GGUFFormatError(Gemma4ExportError):
    """A file that is not a well-formed GGUF."""


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def tensor_nbytes(type_name: str, ne: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    n = int(np.prod(ne, dtype=np.int64))
    if ne[0] % block:
        raise ValueError(f"row length {ne[0]} is not a multiple of {type_name}'s block {block}")
    return n // block * size


def _pad(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


# ---- writing ---------------------------------------------------------------------------------------------------


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _enc_value(vtype: GGUFValueType, value: Any, sub: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _enc_str(value)
    if vtype == GGUFValueType.ARRAY:
        assert sub is not None
        head = struct.pack("<IQ", int(sub), len(value))
        if sub == GGUFValueType.STRING:
            return head + b"".join(_enc_str(v) for v in value)
        return head + np.asarray(value, dtype=_NUMPY[sub]).tobytes()
    return struct.pack(_SCALARS[vtype], value)


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy unchanged from another file (in-kernel where the OS can), instead of through memory."""

    path: Path
    offset: int
    nbytes: int


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def _copy_range(src: FileRange, f) -> None:
    with open(src.path, "rb", buffering=0) as s:
        left, off = src.nbytes, src.offset
        try:
            while left:
                n = os.copy_file_range(s.fileno(), f.fileno(), left, off)
                if n == 0:
                    raise OSError(f"{src.path}: unexpected end of file")
                left, off = left - n, off + n
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            while left:  # no in-kernel copy here: go through a bounded buffer
                chunk = os.pread(s.fileno(), min(left, 64 << 20), off)
                _write_all(f, chunk)
                left, off = left - len(chunk), off + len(chunk)


@dataclass
class _TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: str
    nbytes: int
    offset: int = 0


@dataclass
class GGUFWriter:
    """Collect metadata and the tensor table, then `write(f, blocks_for)` streams the file in one pass."""

    kv: list[tuple[str, GGUFValueType, Any, GGUFValueType | None]] = field(default_factory=list)
    tensors: list[_TensorEntry] = field(default_factory=list)

    def add(self, key: str, vtype: GGUFValueType, value: Any, sub: GGUFValueType | None = None) -> None:
        if any(k == key for k, *_ in self.kv):
            raise ValueError(f"GGUF key {key} written twice")
        self.kv.append((key, vtype, value, sub))

    def u32(self, key: str, v: int) -> None:
        self.add(key, GGUFValueType.UINT32, int(v))

    def f32(self, key: str, v: float) -> None:
        self.add(key, GGUFValueType.FLOAT32, float(v))

    def boolean(self, key: str, v: bool) -> None:
        self.add(key, GGUFValueType.BOOL, bool(v))

    def string(self, key: str, v: str) -> None:
        self.add(key, GGUFValueType.STRING, v)

    def array(self, key: str, values: list, sub: GGUFValueType) -> None:
        self.add(key, GGUFValueType.ARRAY, list(values), sub)

    def add_tensor(self, name: str, shape: tuple[int, ...], type_name: str) -> int:
        """Register a tensor by its row-major (PyTorch) shape; returns its byte size."""
        ne = tuple(reversed(shape))
        if len(ne) > MAX_DIMS:
            raise ValueError(f"{name}: {len(ne)} dims")
        nbytes = tensor_nbytes(type_name, ne)
        self.tensors.append(_TensorEntry(name, ne, type_name, nbytes))
        return nbytes

    def header_bytes(self) -> bytes:
        parts = [MAGIC, struct.pack("<IQQ", VERSION, len(self.tensors), len(self.kv))]
        for key, vtype, value, sub in self.kv:
            parts += [_enc_str(key), struct.pack("<I", int(vtype)), _enc_value(vtype, value, sub)]
        offset = 0
        for t in self.tensors:
            t.offset = offset
            offset += t.nbytes + _pad(t.nbytes)
            parts += [_enc_str(t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne),
                      struct.pack("<IQ", int(ggml_type(t.type)), t.offset)]
        head = b"".join(parts)
        return head + b"\0" * _pad(len(head))

    def write(self, f: BinaryIO, blocks_for) -> None:
        """`blocks_for(entry)` yields the tensor's bytes in order: numpy arrays, bytes, or FileRanges to copy.
        `f` should be unbuffered (open(path, "wb", buffering=0)): ranges are copied at the descriptor's position."""
        _write_all(f, self.header_bytes())
        for t in self.tensors:
            written = 0
            for block in blocks_for(t):
                if isinstance(block, FileRange):
                    _copy_range(block, f)
                    written += block.nbytes
                    continue
                b = np.ascontiguousarray(block) if isinstance(block, np.ndarray) else block
                _write_all(f, b)
                written += b.nbytes if isinstance(b, np.ndarray) else len(b)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            _write_all(f, b"\0" * _pad(t.nbytes))


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch order)
    type: str
    offset: int  # absolute
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def read_tensor(self, name: str) -> np.ndarray:
        """The tensor's values as float32 (dequantized where quantized), shaped row-major."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
        qt = ggml_type(t.type)
        if t.type == "F32":
            out = raw.view(np.float32)
        elif t.type == "F16":
            out = raw.view(np.float16).astype(np.float32)
        else:
            out = dequantize(raw, qt).astype(np.float32)
        return out.reshape(t.shape)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise GGUFFormatError(f"{self.path}: malformed GGUF: {what} needs {n} bytes at offset {self.pos}, "
                                  f"{self.left()} remain")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v if len(v) > 1 else v[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path}: malformed GGUF: {what} is not UTF-8") from None


def _read_value(c: _Cursor, vtype: int, key: str, arrays: bool):
    try:
        t = GGUFValueType(vtype)
    except ValueError:
        raise GGUFFormatError(f"{c.path}: malformed GGUF: key {key!r} has unknown value type {vtype}") from None
    if t == GGUFValueType.STRING:
        return c.string(f"value of {key!r}")
    if t in _SCALARS:
        return c.unpack(_SCALARS[t], f"value of {key!r}")
    sub, count = c.unpack("<IQ", f"array header of {key!r}")
    try:
        st = GGUFValueType(sub)
    except ValueError:
        raise GGUFFormatError(f"{c.path}: malformed GGUF: array {key!r} has unknown element type {sub}") from None
    if st == GGUFValueType.ARRAY:
        raise GGUFFormatError(f"{c.path}: malformed GGUF: nested arrays in {key!r}")
    if st == GGUFValueType.STRING:
        c.need(count * 8, f"{count} strings of {key!r}")  # every string has at least its 8-byte length
        if arrays:
            return [c.string(f"element of {key!r}") for _ in range(count)]
        # Skipped, not decoded: a 262,144-token vocabulary takes a second to decode and the summary needs none of it.
        pos, end, buf = c.pos, len(c.buf), c.buf
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            if pos <= end:
                c.pos = pos
                return f"<{count} strings>"
        raise GGUFFormatError(f"{c.path}: malformed GGUF: the strings of {key!r} run past the end of the file")
    size = struct.calcsize(_SCALARS[st])
    c.need(count * size, f"{count} elements of {key!r}")
    arr = np.frombuffer(c.buf, dtype=_NUMPY[st], count=count, offset=c.pos).copy()
    c.pos += count * size
    return arr.tolist() if arrays else arr


def read_gguf(path: str | Path, arrays: bool = True) -> GGUFFile:
    p = Path(path)
    if not p.is_file():
        raise GGUFFormatError(f"{p}: no such file")
    size = p.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{p}: not a GGUF file ({size} bytes)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != MAGIC:
            raise GGUFFormatError(f"{p}: not a GGUF file (magic {bytes(m[:4])!r})")
        c = _Cursor(memoryview(m), p)
        try:
            c.pos = 4
            version, n_tensors, n_kv = c.unpack("<IQQ", "header")
            if version not in (2, 3):
                raise GGUFFormatError(f"{p}: unsupported GGUF version {version}")
            # Each key takes >= 12 bytes and each tensor entry >= 24 bytes: counts beyond that are lies.
            if n_kv * 12 > c.left() or n_tensors * 24 > c.left():
                raise GGUFFormatError(f"{p}: malformed GGUF: header claims {n_kv} keys and {n_tensors} tensors in "
                                      f"{size} bytes")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string("key")
                meta[key] = _read_value(c, c.unpack("<I", f"type of {key!r}"), key, arrays)
            align = int(meta.get("general.alignment", ALIGNMENT))
            if align <= 0 or align & (align - 1):
                raise GGUFFormatError(f"{p}: malformed GGUF: alignment {align}")
            infos = []
            for _ in range(n_tensors):
                name = c.string("tensor name")
                nd = c.unpack("<I", f"dims of {name}")
                if not 1 <= nd <= MAX_DIMS:
                    raise GGUFFormatError(f"{p}: malformed GGUF: tensor {name!r} has {nd} dims")
                c.need(8 * nd, f"shape of {name}")
                ne = struct.unpack_from(f"<{nd}Q", c.buf, c.pos)
                c.pos += 8 * nd
                ttype, off = c.unpack("<IQ", f"type and offset of {name}")
                try:
                    tname = GGMLQuantizationType(ttype).name
                except ValueError:
                    raise GGUFFormatError(f"{p}: malformed GGUF: tensor {name!r} has unknown type {ttype}") from None
                infos.append((name, tuple(ne), tname, off))
            data_start = c.pos + (align - c.pos % align) % align
        finally:
            c.buf.release()
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, tname, off in infos:
        try:
            nbytes = tensor_nbytes(tname, ne)
        except (KeyError, ValueError) as e:
            raise GGUFFormatError(f"{p}: malformed GGUF: tensor {name!r} {list(ne)} {tname}: {e}") from None
        start = data_start + off
        if off % align or start + nbytes > size:
            raise GGUFFormatError(f"{p}: malformed GGUF: tensor {name!r} data ({nbytes} bytes at {start}) lies "
                                  f"outside the file ({size} bytes)")
        if name in tensors:
            raise GGUFFormatError(f"{p}: malformed GGUF: tensor {name!r} appears twice")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), tname, start, nbytes)
    return GGUFFile(p, version, meta, tensors)

