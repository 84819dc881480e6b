"""The 4-bit lattice of quantization-aware-trained (QAT) checkpoints: detection, and the codes every target writes.

Google's `-qat-q4_0-unquantized` releases are half-precision weights trained for a 4-bit grid with groups of 32:
each group of 32 consecutive values along a row is a step d times an integer in -8..7. Exported on that lattice the
model keeps what training bought; on any other grid it loses it. Plain Q4_0 recomputes d from each group's extremum
(d = extremum / -8), which is the trained step only where the extremum happens to sit at -8 d.

Detection, per group: for m = 8 down to 1, the step candidate max|w| / m, each value rounded to the nearest multiple,
the step refitted by least squares on those integers; the group is on the lattice when every value lies within TOL
of a step from its multiple and the integers fit -8..7 (or 8..-7, which is the same lattice with the step's sign
flipped). Each candidate is tried only on the groups still unplaced, so a trained group (whose integers nearly always
reach 7 or 8 in magnitude) costs one or two; any candidate that fits is exact, since a lattice whose integers are all
even is the same lattice at twice the step. TOL is a sixteenth of a step: a value stored in bfloat16 is off its exact
multiple by at most 2^-8 of itself (1/32 of a step at |k| = 8), while a wrong candidate misses some value by at least
1/8 of a step.

Every target writes the same codes, k + 8 in 0..15, with its own step format:
- GGUF: Q4_0 blocks (fp16 d, 16 bytes of nibbles: element j low, j + 16 high), deq = d (q - 8);
- MLX: affine groups of 32, scale = d, bias = -8 d (bfloat16), deq = scale q + bias;
- ONNX: MatMulNBits / GatherBlockQuantized blocks of 32, scale d, implied zero point 8 (elements 2j low, 2j+1 high).
Groups off the lattice (in a tensor that is only nearly on it) get Q4_0's own rule: d = extremum / -8, rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GROUP = 32
LO, HI = -8, 7
TOL = 1.0 / 16  # in steps
AUTO_SHARE = 0.99  # --qat auto: a tensor is on the lattice when at least this share of its groups is
ROW_BLOCK_ELEMS = 1 << 20
PROBE_ROWS = 32  # rows read first from each tensor; the rest only when they show a lattice


@dataclass(frozen=True)
class LatticeFit:
    """How far one tensor is from a 4-bit lattice."""

    groups: int  # groups measured
    on: int  # groups on the lattice
    q4_0_rule: int  # groups whose step Q4_0's own rule (extremum / -8) also recovers
    worst: float  # the largest distance of a value from its lattice point, in steps (groups on the lattice)
    rows_read: int  # rows measured (all of them, unless the first rows showed no lattice)
    rows: int

    @property
    def share(self) -> float:
        return self.on / max(1, self.groups)

    @property
    def complete(self) -> bool:
        return self.rows_read == self.rows

    def describe(self) -> str:
        where = "" if self.complete else f" (first {self.rows_read} of {self.rows} rows)"
        s = f"{100 * self.share:.2f}% of {self.groups} groups of 32 on a 4-bit lattice{where}"
        if self.on:
            s += (f", worst value {self.worst:.3f} of a step off; Q4_0's extremum/-8 rule recovers the step in "
                  f"{100 * self.q4_0_rule / max(1, self.groups):.1f}%")
        return s

    def to_json(self) -> dict:
        return {**asdict(self), "share": round(self.share, 6)}


def _groups(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise ValueError(f"need rows whose length is a multiple of {GROUP}, got {w.shape}")
    return w.reshape(-1, GROUP)


def fit_groups(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group of 32 of w [rows, cols]: (k int8 [rows, cols] in -8..7, d float32 [rows, cols/32], on bool
    [rows, cols/32], err float32 [rows, cols/32]: the largest |w/d - k| in the group, in steps). For groups off the
    lattice, k and d are Q4_0's rule and err is the closest any candidate came."""
    g = _groups(w)
    n = len(g)
    amax = np.abs(g).max(-1)
    k = np.zeros(g.shape, np.int8)
    d = np.zeros(n, np.float32)
    err = np.full(n, np.inf, np.float32)
    on = amax == 0  # an all-zero group is on every lattice (d = 0)
    err[on] = 0
    for m in range(-LO, 0, -1):
        todo = np.flatnonzero(~on)
        if not len(todo):
            break
        gi = g[todo]
        r = np.rint(gi * (np.float32(m) / amax[todo])[:, None])
        lo, hi = r.min(-1), r.max(-1)
        pos, neg = (lo >= LO) & (hi <= HI), (lo >= -HI) & (hi <= -LO)
        dl = (gi * r).sum(-1) / (r * r).sum(-1)
        res = np.abs(gi / dl[:, None] - r).max(-1)
        res = np.where(pos | neg, res, np.inf)
        err[todo] = np.minimum(err[todo], res)
        ok = res <= TOL
        sel = todo[ok]
        sign = np.where(pos[ok], 1, -1).astype(np.float32)
        d[sel] = dl[ok] * sign
        k[sel] = (r[ok] * sign[:, None]).astype(np.int8)
        on[sel] = True
    off = np.flatnonzero(~on)
    if len(off):
        dq, kq = q4_0_rule(g[off])
        d[off], k[off] = dq, kq
    rows = np.asarray(w).shape[0]
    return k.reshape(rows, -1), d.reshape(rows, -1), on.reshape(rows, -1), err.reshape(rows, -1)


def q4_0_rule(g: np.ndarray, round_d: Callable[[np.ndarray], np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q4_0 on groups g [N, 32]: d = extremum / -8 (the signed value of largest magnitude, the first on a
    tie), k = clamp(round(w / d), -8, 7)."""
    idx = np.abs(g).argmax(-1)
    ext = g[np.arange(len(g)), idx]
    d = ext / np.float32(LO)
    if round_d is not None:
        d = round_d(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(d[:, None] != 0, np.rint(g / d[:, None]), 0)
    return d.astype(np.float32), np.clip(k, LO, HI).astype(np.int8)


def _q4_0_recovers(g: np.ndarray) -> np.ndarray:
    """Groups [N, 32] whose lattice step Q4_0's own rule also finds (so plain Q4_0 is faithful there)."""
    d, k = q4_0_rule(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.where(d[:, None] != 0, np.abs(g / d[:, None] - k), 0).max(-1)
    return res <= TOL


def measure(rows_iter, rows: int) -> LatticeFit:
    """LatticeFit of a tensor's `rows` rows from its float32 row blocks (an iterable of [n, cols] arrays)."""
    groups = on = q40 = 0
    worst = 0.0
    read = 0
    for block in rows_iter:
        step = max(1, ROW_BLOCK_ELEMS // block.shape[1])
        for s in range(0, len(block), step):
            b = block[s: s + step]
            _, _, o, e = fit_groups(b)
            groups += o.size
            on += int(o.sum())
            q40 += int(_q4_0_recovers(_groups(b)).sum())
            if o.any():
                worst = max(worst, float(e[o].max()))
            read += len(b)
    return LatticeFit(groups, on, q40, worst, read, rows)


# -- the codes each target writes ----------------------------------------------------------------------------------

def lattice_codes(w: np.ndarray, round_d: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [rows, cols] = k + 8 in 0..15, d float32 [rows, cols/32] as the target stores it). Groups on the
    lattice keep their trained integers (d rounded to the target's format); the others get Q4_0's rule with the
    rounded d."""
    k, d, on, _ = fit_groups(w)
    d = round_d(d)
    if not on.all():
        rows = k.shape[0]
        g = _groups(w).reshape(rows, -1, GROUP)
        dq, kq = q4_0_rule(g[~on], round_d)
        d[~on] = dq
        kk = k.reshape(rows, -1, GROUP)
        kk[~on] = kq
        k = kk.reshape(rows, -1)
    return (k.astype(np.int16) - LO).astype(np.uint8), d


def f16_round(d: np.ndarray) -> np.ndarray:
    return np.asarray(d, np.float32).astype(np.float16).astype(np.float32)


def bf16_round(d: np.ndarray) -> np.ndarray:
    from .weighted import _bf16_round

    return _bf16_round(np.asarray(d, np.float32))


def q4_0_bytes(w: np.ndarray) -> np.ndarray:
    """ggml Q4_0 blocks of w [rows, cols] on its lattice: uint8 [rows * cols/32 * 18]."""
    codes, d = lattice_codes(w, f16_round)
    rows, cols = codes.shape
    c = codes.reshape(rows, -1, GROUP)
    out = np.empty((rows, cols // GROUP, 18), np.uint8)
    out[..., :2] = d.astype("<f2").view(np.uint8).reshape(rows, -1, 2)
    out[..., 2:] = c[..., :16] | (c[..., 16:] << 4)
    return out.reshape(-1)


def mlx_lattice(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlx affine groups of 32 on w's lattice: (packed uint32, scales bf16 bits uint16, biases bf16 bits uint16)."""
    from .weighted import pack_mlx
    from ..targets import bf16_bits

    codes, d = lattice_codes(w, bf16_round)
    return pack_mlx(codes, 4), bf16_bits(d), bf16_bits(d * np.float32(LO))


def int4_lattice(w: np.ndarray, round_d: Callable[[np.ndarray], np.ndarray] = lambda d: d
                 ) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's 4-bit MatMulNBits blocks (implied zero point 8) on w's lattice: (packed uint8
    [rows, cols/32, 16], scales float32 [rows, cols/32]); round_d is the graph's scale type (f16_round for q4f16)."""
    codes, d = lattice_codes(w, round_d)
    rows = codes.shape[0]
    c = codes.reshape(rows, -1, GROUP)
    return c[..., 0::2] | (c[..., 1::2] << 4), d


def snap(w: np.ndarray, sig_bits: int = 4) -> np.ndarray:
    """w moved exactly onto its lattice: each group's step rounded to `sig_bits` significant bits, the integers
    recomputed. The exactly-on-lattice form of a QAT checkpoint. Four bits keep every product a target computes
    exact: d x k in bfloat16 (the checkpoint) for k in -8..7, and d x q for q in 0..15, which mlx's affine groups
    compute in bfloat16 before adding the bias -8 d; and d itself in float16 (GGUF) and bfloat16 (MLX). With an
    arbitrary step (a real release's), mlx's bfloat16 product rounds by up to an ulp of the weight."""
    k, d, _, _ = fit_groups(w)
    m, e = np.frexp(d)
    d5 = np.ldexp(np.rint(m * 2.0 ** sig_bits) / 2.0 ** sig_bits, e).astype(np.float32)
    rows = k.shape[0]
    g = _groups(w).reshape(rows, -1, GROUP)
    with np.errstate(divide="ignore", invalid="ignore"):
        kk = np.where(d5[..., None] != 0, np.clip(np.rint(g / d5[..., None]), LO, HI), 0)
    return (kk * d5[..., None]).reshape(w.shape).astype(np.float32)


def eligible(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and shape[-1] % GROUP == 0 and math.prod(shape) > 0


def measure_checkpoint(ck, specs, reporter=None) -> dict[str, LatticeFit]:
    """LatticeFit of every tensor a text artifact could write on a lattice (matrices, lookup tables, experts; not
    the router, norms, scalars or towers), streamed from the checkpoint `ck` (or an adapter-merged view)."""
    from ..exporter.checkpoint import f32_row_blocks
    from ..exporter.tensors import Role
    from ..progress import Silent

    skip = {Role.TOWER, Role.KV_SHARED_UNUSED, Role.ROUTER_PROJ, Role.ROUTER_SCALE, Role.ROUTER_EXPERT_SCALE,
            Role.NORM, Role.LAYER_SCALAR}
    from ..exporter.checkpoint import to_f32

    todo = [s for s in specs if s.role not in skip and eligible(s.shape)]
    out: dict[str, LatticeFit] = {}
    with (reporter or Silent()).task("detect QAT lattice", len(todo), unit="tensors") as task:
        for s in todo:
            info = ck.info(s.name)
            rows = info.numel // info.shape[-1]
            # the first rows first: a tensor with under half of their groups on a lattice is not read further, so
            # a checkpoint that is not QAT costs a few rows per tensor
            first = min(rows, PROBE_ROWS)
            fit = measure([to_f32(ck.rows(s.name, 0, first), info.dtype)], rows)
            if fit.on >= fit.groups / 2 and first < rows:
                fit = measure((b for _, b in f32_row_blocks(ck, s.name, 8 << 20, ring=2)), rows)
            out[s.name] = fit
            task.advance(1)
    return out


def snap_checkpoint(src: str | Path, dst: str | Path, reporter=None) -> dict[str, LatticeFit]:
    """Copy the checkpoint directory `src` to `dst` with every tensor a text artifact could write on a lattice (the
    set measure_checkpoint reads) moved exactly onto its 4-bit lattice (snap), in the same files, names and dtype:
    the exactly-on-lattice form of a QAT checkpoint, on which a faithful export is lossless in every target. Returns
    the fits of the source tensors."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..exporter.source import ModelSource

    src, dst = Path(src), Path(dst)
    source = ModelSource.open(model_dir=src)
    try:
        fits = measure_checkpoint(source.checkpoint, source.tensor_specs(), reporter)
    finally:
        source.checkpoint.close()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    for f in sorted(src.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata()
            for name in sf.keys():
                t = sf.get_tensor(name)
                if name in fits:
                    w = t.float().reshape(-1, t.shape[-1]).numpy()
                    t = torch.from_numpy(snap(w)).reshape(t.shape).to(t.dtype)
                tensors[name] = t.contiguous()
        save_file(tensors, str(dst / f.name), metadata=meta)
    return fits
