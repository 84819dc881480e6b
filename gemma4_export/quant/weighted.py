"""Importance-weighted block quantizers: the objective llama.cpp's quantizers minimise when given an imatrix.

A linear layer's weight W [rows, cols] is stored as [out, in]; its blocks (groups) run along a row, i.e. along the
input dimension. The importance imp [cols] (>= 0) is the mean squared activation of each input channel over
calibration data, so sum_i imp_i * (w_i - deq_i)^2 is the expected squared error the quantization adds to the
layer's output (diagonal approximation). Instead of plain round-to-nearest over min/max, each block's parameters are
searched to minimise that weighted error; imp=None means uniform weights.

Two storage formats:

* ``mlx_affine``: mlx's affine layout (``mx.quantize``): w = scale * q + bias, q in 0..2^bits-1, codes packed
  little-endian as a bit stream into uint32 words, scale/bias per group. Candidates as llama.cpp's make_qkx2_quants:
  a range of inverse scales around the min/max one, each followed by the closed-form weighted least-squares fit of
  (scale, bias). The artifact stores scale and bias as bfloat16, whose 8 significant bits are coarse next to a
  quantization step (at 8 bits a scale's rounding moves the top code by up to half a step), so every candidate is
  scored as stored: the fitted scale is rounded to bf16, the bias refitted to it and rounded, and q recomputed with
  the rounded values; the neighbouring bf16 values of the winner are tried last. The stored triple is exactly what
  was scored, and is self-consistent.
* ``int_blocks``: onnxruntime's MatMulNBits symmetric layout (no zero_points input: the implied zero point is
  2^(bits-1)): codes q + zp packed into uint8 [rows, cols/block, block*bits/8] (4 bits: element 2j in the low
  nibble, 2j+1 in the high), float32 scales [rows, cols/block], w = scale * q. With imp=None this is byte for byte
  onnxruntime's own quantizer (scale = -extreme / 2^(bits-1), q = roundf(w / scale)). With imp, candidates as
  llama.cpp's make_qx_quants, each with its weighted least-squares scale, the round-to-nearest one included (pass
  np.ones(cols) for the search under uniform weights).

Everything is vectorised over rows and blocks and runs over blocks of rows, so memory follows ROW_BLOCK_ELEMS,
not the matrix.
"""

from __future__ import annotations

import numpy as np

from ..targets import bf16_bits

ROW_BLOCK_ELEMS = 1 << 20  # elements of W processed at once (a few MB per temporary)
AFFINE_STEPS = np.arange(-10, 11)  # iscale = (nmax + AFFINE_DELTA * k) / (max - min)
AFFINE_DELTA = 0.1
SYM_STEPS = np.arange(-9, 10)  # iscale = -(nmax + 0.1 * k) / extreme


def _from_bf16(bits16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (any integer dtype) as float32 values."""
    return (bits16.astype(np.uint32) << 16).view(np.float32)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (kept as float32)."""
    return _from_bf16(bf16_bits(x))


def _check(w: np.ndarray, imp, block: int) -> tuple[np.ndarray, np.ndarray | None]:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"need a 2-D weight whose row length is a multiple of {block}, got {w.shape}")
    if imp is not None:
        imp = np.asarray(imp, dtype=np.float32)
        if imp.shape not in ((w.shape[1],), w.shape) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise ValueError(f"importance must be {w.shape[1]} (or {w.shape[0]} x {w.shape[1]}: one vector per "
                             "row) finite values >= 0")
    return w, imp


def _group_weights(imp, cols: int, block: int, sl: slice | None = None) -> np.ndarray:
    """Per-group importance [1 or rows, G, block] (rows `sl` of a per-row importance), normalised to mean 1 in each
    group (the argmin within a group is unchanged; the sums stay well scaled). A group whose importance is all zero
    gets uniform weights."""
    if imp is None:
        return np.ones((1, cols // block, block), np.float32)
    if imp.ndim == 2:  # one vector per row (an expert tensor: each expert's rows have their own statistics)
        imp = imp[sl]
    g = imp.reshape(imp.shape[0] if imp.ndim == 2 else 1, -1, block).astype(np.float32)
    mean = g.mean(-1, keepdims=True)
    return np.where(mean > 0, g / np.where(mean > 0, mean, 1), np.float32(1))


def _row_blocks(rows: int, cols: int):
    step = max(1, ROW_BLOCK_ELEMS // cols)
    for r in range(0, rows, step):
        yield slice(r, min(r + step, rows))


def weighted_error(w: np.ndarray, deq: np.ndarray, imp=None) -> float:
    """sum_ij imp_j * (w_ij - deq_ij)^2 over a [rows, cols] matrix (imp [cols]; None = uniform), in float64."""
    d = np.asarray(w, np.float64) - np.asarray(deq, np.float64)
    d *= d
    return float(d.sum() if imp is None else (d @ np.asarray(imp, np.float64)).sum())


# -- mlx affine --------------------------------------------------------------------------------------------------

def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes q [rows, cols] (0..2^bits-1) packed as mlx packs them: a little-endian bit stream (code i at bits
    i*bits.., low bits first; 3-, 5- and 6-bit codes straddle words) read as uint32 words: [rows, cols*bits/32]."""
    q = np.asarray(q)
    rows, cols = q.shape
    if cols * bits % 32:
        raise ValueError(f"{cols} codes of {bits} bits do not fill whole uint32 words")
    stream = ((q[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    by = np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u4").astype(np.uint32)


def unpack_mlx(wq: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_mlx: uint32 [rows, words] -> codes uint8 [rows, words*32/bits]."""
    wq = np.ascontiguousarray(wq, dtype="<u4")
    rows = wq.shape[0]
    stream = np.unpackbits(wq.view(np.uint8), axis=-1, bitorder="little").reshape(rows, -1, bits)
    return (stream.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.uint8)


def _keep(best, cand):
    """Per group, whichever of two (..., error [R, G]) tuples has the lower error (other members [R, G, 1 or g])."""
    better = cand[-1] < best[-1]
    return tuple(np.where(better if b.ndim == 2 else better[..., None], c, b) for b, c in zip(best, cand))


def _affine_eval(w, iw, s, b, nmax):
    """Score one candidate (s, b) [R, G, 1] as it would be stored: both rounded to bf16, q recomputed with the
    rounded values. Returns (s, b, q, weighted error [R, G]); a NaN candidate scores NaN and is never kept."""
    s, b = _bf16_round(s), _bf16_round(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((w - b) / s), 0, nmax)
        q[np.broadcast_to(s == 0, q.shape)] = 0
        d = s * q + b - w
        return s, b, q, (iw * d * d).sum(-1)


def _affine_block(w, iw, bits):
    """Best (scale, bias, q) per group of w [R, G, g] under the weights iw [1, G, g]."""
    nmax = np.float32(2**bits - 1)
    mn, mx = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    rng = mx - mn
    # The plain min/max candidate (what round-to-nearest stores) is in the set, so the result is never worse.
    best = _affine_eval(w, iw, rng / nmax, mn, nmax)
    safe = np.where(rng > 0, rng, np.float32(1))
    wm = w - mn
    s1 = iw.sum(-1, keepdims=True)
    sw = (iw * w).sum(-1, keepdims=True)
    for k in AFFINE_STEPS:  # make_qkx2_quants: inverse scales around the min/max one, each refitted
        iscale = (nmax + np.float32(AFFINE_DELTA * k)) / safe
        q = np.clip(np.rint(wm * iscale), 0, nmax)
        iq = iw * q
        sq, sqq, sqw = iq.sum(-1, keepdims=True), (iq * q).sum(-1, keepdims=True), (iq * w).sum(-1, keepdims=True)
        # weighted least squares of w ~ s*q + b: [sqq sq; sq s1] [s; b] = [sqw; sw]; a singular system (one
        # distinct code, or the weight on one element) keeps the candidate's own (s, b)
        det = s1 * sqq - sq * sq
        ok = det > 1e-6 * s1 * sqq
        s = np.where(ok, (s1 * sqw - sq * sw) / np.where(ok, det, np.float32(1)), 1 / iscale)
        s = _bf16_round(s)  # the stored scale is bf16: round it first, then fit the bias to the rounded scale
        b = np.where(ok, (sw - s * sq) / s1, mn)
        best = _keep(best, _affine_eval(w, iw, s, b, nmax))
    # bf16 has 8 significant bits, coarse next to an 8-bit step: try the neighbouring bf16 values of the best pair
    s0, b0 = (bf16_bits(x).astype(np.int32) for x in best[:2])
    for ds in (-1, 0, 1):
        for db in (-2, -1, 0, 1, 2):
            if ds or db:
                s, b = (_from_bf16(x + d) for x, d in ((s0, ds), (b0, db)))
                best = _keep(best, _affine_eval(w, iw, s, b, nmax))
    return best[0][..., 0], best[1][..., 0], best[2]


def mlx_affine(w: np.ndarray, imp=None, bits: int = 4, group: int = 64, hess: "Hessian | None" = None,
               mats=None):
    """Quantize w [rows, cols] to mlx's affine layout minimising sum_i imp_i * (w_i - deq_i)^2 per group (imp
    [cols], or [rows, cols] for one vector per row).

    Returns (wq, scales, biases) as ``mx.quantize(w, group_size=group, bits=bits)`` lays them out: wq uint32
    [rows, cols*bits/32] (pack_mlx), scales and biases uint16 [rows, cols/group] holding bfloat16 bit patterns;
    dequantized, w = scale * q + bias with q in 0..2^bits-1. Every candidate is scored after its scale and bias are
    rounded to bf16 and q recomputed with them, so the error minimised is the stored triple's. imp=None: uniform.
    bits as types.MLX_BITS (2, 3, 4, 5, 6 or 8); group 32, 64 or 128.

    With `hess` (the inputs' second moments, calibrate.Importance.hessian_for) the groups are quantized in order with
    GPTQ's error feedback (`gptq`): each group by the same search, on weights that carry the earlier groups'
    rounding error; `mats` [rows] gives each row's matrix in `hess` (an expert tensor's row block). Once every code
    is fixed, the scales and biases are refitted to the layer's output (`refit_groups`)."""
    from .types import MLX_BITS, MLX_GROUPS

    if bits not in MLX_BITS or group not in MLX_GROUPS:
        raise ValueError(f"mlx_affine supports bits {'/'.join(map(str, MLX_BITS))} and groups "
                         f"{'/'.join(map(str, MLX_GROUPS))}, not bits={bits} group={group}")
    w, imp = _check(w, imp, group)
    if hess is not None:
        def one(wg, iv):
            got = mlx_affine(wg, iv, bits, group)
            return got, mlx_dequant(*got, bits, group)

        def refit(wm, got, m):
            s, b = (_from_bf16(x) for x in got[1:])
            s, b = refit_groups(wm, unpack_mlx(got[0], bits), s, b, hess, m, group, _bf16_round)
            return got[0], bf16_bits(s), bf16_bits(b)
        return _by_matrix(w, imp, hess, mats, group, one, refit)
    rows, cols = w.shape
    G = cols // group
    wq = np.empty((rows, cols * bits // 32), np.uint32)
    scales, biases = np.empty((rows, G), np.uint16), np.empty((rows, G), np.uint16)
    for sl in _row_blocks(rows, cols):
        blk = w[sl].reshape(-1, G, group)
        s, b, q = _affine_block(blk, _group_weights(imp, cols, group, sl), bits)
        wq[sl] = pack_mlx(q.reshape(blk.shape[0], cols).astype(np.uint8), bits)
        scales[sl], biases[sl] = bf16_bits(s), bf16_bits(b)
    return wq, scales, biases


def mlx_dequant(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int) -> np.ndarray:
    """numpy dequantization of an mlx_affine triple (bf16 bit-pattern scales/biases) to float32 [rows, cols]."""
    q = unpack_mlx(wq, bits).astype(np.float32)
    rows, cols = q.shape
    s, b = _from_bf16(scales)[..., None], _from_bf16(biases)[..., None]
    return (s * q.reshape(rows, -1, group) + b).reshape(rows, cols)


# -- onnxruntime MatMulNBits (symmetric) ------------------------------------------------------------------------

def _rtn_sym(w, bits):
    """onnxruntime's symmetric block quantizer (MlasQuantizeBlockwise, no zero points) on w [R, B, block]:
    scale = -extreme / 2^(bits-1) with extreme the signed value of largest magnitude (the min on a tie), code =
    clip(roundf(w * (1/scale) + zp), 0, 2^bits-1) in float32. Returns (scale [R, B, 1], q = code - zp)."""
    half = np.float32(2 ** (bits - 1))
    mn, mx = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    ext = np.where(np.abs(mx) > np.abs(mn), mx, mn)
    scale = -ext / half
    with np.errstate(divide="ignore"):
        recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0))
    x = (w * recip + half).astype(np.float64)  # float32 product and sum, then C's roundf (half away from zero)
    code = np.clip(np.trunc(x + np.copysign(0.5, x)), 0, 2 * half - 1)
    return scale, (code - half).astype(np.float32)


def _sym_block(w, iw, bits):
    """Best (scale, q) per block of w [R, B, block] under the weights iw [1, B, block]: the round-to-nearest pair,
    and make_qx_quants' candidates iscale = -(nmax + 0.1k) / extreme each with its least-squares scale."""
    half = np.float32(2 ** (bits - 1))
    s, q = _rtn_sym(w, bits)
    d = s * q - w
    best = s, q, (iw * d * d).sum(-1)
    mn, mx = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    ext = np.where(np.abs(mx) > np.abs(mn), mx, mn)
    ext = np.where(ext != 0, ext, np.float32(1))  # an all-zero block keeps its round-to-nearest pair (error 0)
    for k in SYM_STEPS:
        q = np.clip(np.rint(w * (-(half + np.float32(0.1 * k)) / ext)), -half, half - 1)
        iq = iw * q
        sqq = (iq * q).sum(-1, keepdims=True)
        s = (iq * w).sum(-1, keepdims=True) / np.where(sqq > 0, sqq, np.float32(1))
        d = s * q - w
        best = _keep(best, (s, q, (iw * d * d).sum(-1)))
    return best[0][..., 0], best[1]


def int_blocks(w: np.ndarray, imp=None, bits: int = 4, block: int = 32, hess: "Hessian | None" = None, mats=None):
    """Quantize w [rows, cols] ([out, in]) for onnxruntime's MatMulNBits (K=cols, N=rows, symmetric: no
    zero_points input, implied zero point 2^(bits-1)), minimising sum_i imp_i * (w_i - scale * q_i)^2 per block
    (imp [cols], or [rows, cols] for one vector per row).

    Returns (packed uint8 [rows, cols/block, block*bits/8], scales float32 [rows, cols/block]); codes are q + zp
    with q in -2^(bits-1)..2^(bits-1)-1, for 4 bits two per byte, the even element in the low nibble. With
    imp=None the result is exactly onnxruntime's qbits_block_quant output (round to nearest, no search). bits 4 or
    8. With `hess` (and `mats`), GPTQ's error feedback and the refit of the scales as in mlx_affine."""
    if bits not in (4, 8):
        raise ValueError(f"int_blocks supports 4 and 8 bits, not {bits}")
    w, imp = _check(w, imp, block)
    if hess is not None:
        def one(wg, iv):
            got = int_blocks(wg, iv if iv is not None else np.ones(wg.shape[1], np.float32), bits, block)
            return got, int_dequant(*got, bits)

        def refit(wm, got, m):
            s, _ = refit_groups(wm, int_codes(got[0], bits), got[1], None, hess, m, block)
            return got[0], s
        return _by_matrix(w, imp, hess, mats, block, one, refit)
    rows, cols = w.shape
    B = cols // block
    packed = np.empty((rows, B, block * bits // 8), np.uint8)
    scales = np.empty((rows, B), np.float32)
    for sl in _row_blocks(rows, cols):
        blk = w[sl].reshape(-1, B, block)
        if imp is None:
            s, q = _rtn_sym(blk, bits)
            s = s[..., 0]
        else:
            s, q = _sym_block(blk, _group_weights(imp, cols, block, sl), bits)
        code = (q + 2 ** (bits - 1)).astype(np.uint8)
        packed[sl] = code if bits == 8 else code[..., 0::2] | (code[..., 1::2] << 4)
        scales[sl] = s
    return packed, scales


def int_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The signed codes (code - 2^(bits-1)) of an int_blocks tensor as float32 [rows, cols]."""
    if bits == 4:
        code = np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:2], -1)
    else:
        code = packed
    return (code.astype(np.float32) - 2 ** (bits - 1)).reshape(packed.shape[0], -1)


def int_dequant(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """numpy dequantization of an int_blocks pair to float32 [rows, cols]: (code - 2^(bits-1)) * scale."""
    q = int_codes(packed, bits).reshape(*packed.shape[:2], -1)
    return (q * scales[..., None]).reshape(packed.shape[0], -1)


# -- error feedback from the inputs' second moments (GPTQ) ---------------------------------------------------------

GPTQ_DAMP = 0.01  # added to the Hessian's diagonal, times its mean (GPTQ's dampening)


class Hessian:
    """Second moments of one tensor's matrix inputs, sum over calibration tokens of x x^T, block-diagonal: `blocks`
    float32 [n_mat, nb, B, B] (one set per expert for an expert tensor), block k covering input channels k*B ..
    min((k+1)*B, width); a last partial block is zero-padded. B is the whole width where the calibration budget
    allows it (always on the tiny models); on a large model the correlations between channels of different blocks
    are not kept, and the error feedback runs within each block.

    `factors(m)` gives, per block, (first channel, U): U the upper Cholesky factor of the damped block's inverse,
    what the feedback needs (computed once per matrix, kept for the next row block; m is ignored where all the
    tensor's matrices share one Hessian)."""

    def __init__(self, blocks: np.ndarray, width: int):
        self.blocks, self.width = blocks, width
        self._factors: dict[int, list] = {}
        self._parts: list | None = None  # set for side_by_side: one list of blocks across the matrices

    @property
    def n_mat(self) -> int:
        return self.blocks.shape[0]

    @property
    def block(self) -> int:
        return self.blocks.shape[2]

    def parts(self, m: int = 0) -> list[tuple[int, np.ndarray]]:
        """Per block, (first channel, its second moments [n, n] as float32)."""
        if self._parts is not None:
            return self._parts
        m = int(m) if self.n_mat > 1 else 0
        B = self.block
        return [(k * B, self.blocks[m, k, :min(B, self.width - k * B), :min(B, self.width - k * B)])
                for k in range(self.blocks.shape[1])]

    def factors(self, m: int = 0) -> list[tuple[int, np.ndarray]]:
        m = int(m) if self.n_mat > 1 and self._parts is None else 0
        if m not in self._factors:
            out = []
            for start, h in self.parts(m):
                h = np.array(h[::-1, ::-1], dtype=np.float64)  # the channels reversed (a copy)
                d = np.diag(h).copy()
                d[d <= 0] = 1.0  # a channel no token reached: its error costs nothing, it feeds nothing back
                np.fill_diagonal(h, d + GPTQ_DAMP * d.mean())
                # With P the reversal, P h P = L L^T gives h = R R^T, R = P L P upper; so h^-1 = R^-T R^-1 and the
                # upper U with h^-1 = U^T U is R^-1: three float64 copies of the block at a time, not five.
                r = np.linalg.cholesky(h)[::-1, ::-1]
                del h
                out.append((start, np.linalg.inv(r)))
            self._factors[m] = out
        return self._factors[m]

    def side_by_side(self) -> "Hessian":
        """The experts' matrices side by side as one [rows, n_mat*width] matrix (ONNX's expert down projection):
        each expert's blocks cover its own columns."""
        whole = Hessian(self.blocks[:1], self.n_mat * self.width)
        whole._parts = [(m * self.width + start, h) for m in range(self.n_mat) for start, h in self.parts(m)]
        whole._factors[0] = [(m * self.width + start, u) for m in range(self.n_mat) for start, u in self.factors(m)]
        return whole


def _steps(factors: list[tuple[int, np.ndarray]], step: int):
    """(first channel of the block, its factor U, offset in the block) for each step of `step` channels."""
    for start, u in factors:
        n = u.shape[0]
        if start % step or n % step:
            raise ValueError(f"Hessian block at {start} of {n} channels does not hold whole steps of {step}")
        for a in range(0, n, step):
            yield start, u, a


def _feed_forward(work: np.ndarray, u: np.ndarray, start: int, a: int, step: int, deq: np.ndarray) -> None:
    """The step at channels start+a.. is fixed at `deq`: move the block's later channels by -D U_ss^-1 U_s,later."""
    n = u.shape[0]
    if a + step < n:
        c = start + a
        d = work[:, c:c + step] - deq
        work[:, c + step:start + n] -= np.linalg.solve(u[a:a + step, a:a + step].T, d.T).T @ u[a:a + step, a + step:]


def gptq(w: np.ndarray, factors: list[tuple[int, np.ndarray]], group: int, quantize):
    """Quantize w [rows, cols] group by group (groups of `group` input channels, in order), feeding each group's
    rounding error forward onto the channels not yet quantized, as GPTQ does with its lazy blocks: with U the upper
    Cholesky factor of the inverse Hessian of a block's channels, fixing channels a..a+g with error D moves the
    later ones by -D U[a:a+g, a:a+g]^-1 U[a:a+g, a+g:], which minimises the added output error
    sum_tokens |(W - W_q) x|^2 given the fixed ones. Each group is quantized whole by `quantize(w_group [rows, g],
    first channel) -> (parts, dequantized [rows, g])` (the target's own block search on the updated weights), so
    the result is exactly the target's format; parts (arrays [rows, ...]) of all groups are joined along axis 1.
    Rows are independent: any split into row blocks gives the same result."""
    rows, cols = w.shape
    work = np.array(w, dtype=np.float64)
    parts: list = [None] * (cols // group)
    for start, u, a in _steps(factors, group):
        c = start + a
        got, deq = quantize(np.ascontiguousarray(work[:, c:c + group], dtype=np.float32), c)
        parts[c // group] = got
        _feed_forward(work, u, start, a, group, deq)
    if any(p is None for p in parts):
        raise ValueError(f"the Hessian's blocks do not cover the {cols} input channels")
    return tuple(np.concatenate([p[k] for p in parts], axis=1) for k in range(len(parts[0])))


REFIT_RIDGE = 1e-6  # added to the refit's normal equations' diagonal, times their mean (a group of one code)
REFIT_ROWS_ELEMS = 1 << 21  # rows x channels of one Hessian block the refit holds at once (float64 temporaries)


def refit_groups(w: np.ndarray, q: np.ndarray, s: np.ndarray, b: np.ndarray | None, hess: Hessian, m: int,
                 group: int, rounding=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The scales (and, affine, the biases) of groups whose codes are fixed, refitted to the layer's output.

    GPTQ chooses each group's scale when the group's turn comes, before the later groups' errors are known, and
    scores it by the group's own weighted error. Given all the codes q [rows, cols] (float, signed for a symmetric
    format), deq = s_g * q + b_g (b = None: symmetric, deq = s_g * q) is linear in the row's scales and biases, so
    the ones minimising its output error on the calibration tokens, (w - deq) H (w - deq)^T with H the second
    moments of matrix m (`hess.parts(m)`), solve a small least-squares system per row (2 unknowns per group; the
    blocks of a block-diagonal H separately). Each candidate is rounded as stored (`rounding`, for instance bf16) and kept for a
    row and Hessian block only where it lowers that error, so the result is never worse than (s, b)."""
    rows, cols = w.shape
    s, b = s.astype(np.float32).copy(), None if b is None else b.astype(np.float32).copy()
    for c0, h in hess.parts(m):
        n = h.shape[0]
        if c0 % group or n % group:
            raise ValueError(f"Hessian block at {c0} of {n} channels does not hold whole groups of {group}")
        g0, G = c0 // group, n // group
        h = h.astype(np.float64)
        hsum = h.reshape(n, G, group).sum(-1)  # [n, G]: sum of H_ij over j in group h
        abb = hsum.reshape(G, group, G).sum(1)
        step = max(1, REFIT_ROWS_ELEMS // n)
        for r in range(0, rows, step):
            sl = slice(r, min(r + step, rows))
            wk = w[sl, c0:c0 + n].astype(np.float64)
            qk = q[sl, c0:c0 + n].astype(np.float64).reshape(-1, G, group)
            R = qk.shape[0]
            qf = qk.reshape(R, n)
            ass = np.empty((R, G, G))
            for g in range(G):  # ass[r, :, g] = sum over i in each group, j in group g, of q_i H_ij q_j
                cols_g = slice(g * group, (g + 1) * group)
                ass[:, :, g] = (qf * (qf[:, cols_g] @ h[cols_g])).reshape(R, G, group).sum(-1)
            hw = wk @ h
            rhs_s = np.einsum("rgi,rgi->rg", qk, hw.reshape(R, G, group))
            if b is None:
                a, rhs = ass, rhs_s
            else:
                asb = np.einsum("rgi,gih->rgh", qk, hsum.reshape(G, group, G))
                a = np.empty((R, 2 * G, 2 * G))
                a[:, :G, :G], a[:, :G, G:] = ass, asb
                a[:, G:, :G], a[:, G:, G:] = asb.transpose(0, 2, 1), abb
                rhs = np.concatenate([rhs_s, hw.reshape(R, G, group).sum(-1)], 1)
            dim = a.shape[1]
            ridged = a + np.eye(dim) * (REFIT_RIDGE * np.trace(a, axis1=1, axis2=2) / dim + 1e-30)[:, None, None]
            th = np.linalg.solve(ridged, rhs[..., None])[..., 0].astype(np.float32)
            if rounding is not None:
                th = rounding(th)
            cand_s, cand_b = th[:, :G], (th[:, G:] if b is not None else None)

            def err(t):  # the output error of parameters t, less w H w (the same for every t): t A t - 2 t . rhs
                t = t.astype(np.float64)
                return (np.matmul(a, t[..., None])[..., 0] * t).sum(1) - 2 * (t * rhs).sum(1)
            now = s[sl, g0:g0 + G] if b is None else np.concatenate([s[sl, g0:g0 + G], b[sl, g0:g0 + G]], 1)
            better = np.isfinite(th).all(1) & (err(th) < err(now))
            s[sl, g0:g0 + G][better] = cand_s[better]
            if b is not None:
                b[sl, g0:g0 + G][better] = cand_b[better]
    return s, b


def _by_matrix(w, imp, hess: Hessian, mats, group: int, run, refit=None):
    """GPTQ over rows that may belong to different matrices (an expert tensor's row block; `mats` [rows], None for
    one): each matrix's rows with its own factors and importance. run(w_group, importance of its channels or None)
    -> (parts, deq) quantizes one group; refit(w_rows, parts, m) -> parts, when given, then refits the matrix's
    scales to its output (refit_groups)."""
    rows = w.shape[0]
    mats = np.zeros(rows, np.int64) if mats is None else np.asarray(mats)
    out = None
    for m in np.unique(mats):
        sel = np.nonzero(mats == m)[0]
        iv = None if imp is None else (imp[sel[0]] if imp.ndim == 2 else imp)
        got = gptq(w[sel], hess.factors(m), group,
                   lambda wg, first, iv=iv: run(wg, None if iv is None else iv[first:first + wg.shape[1]]))
        if refit is not None:
            got = refit(w[sel], got, m)
        if out is None:
            out = tuple(np.empty((rows,) + p.shape[1:], p.dtype) for p in got)
        for o, p in zip(out, got):
            o[sel] = p
    return out


def gptq_values(w: np.ndarray, factors: list[tuple[int, np.ndarray]], superblock: int, quantize,
                sub: int = 32) -> np.ndarray:
    """GPTQ for a format whose quantizer works on whole super-blocks of `superblock` input channels (ggml's k-quants
    and IQ4_XS: 256; its 32-wide types: 32), in sub-blocks of `sub` channels: at each sub-block its super-block is
    quantized as it stands (the sub-blocks already fixed, and the later ones carrying the error fed forward) by
    `quantize(w [rows, superblock], first channel) -> dequantized [rows, superblock]`, the sub-block's values are
    kept, and its error is fed forward as in `gptq`. Returns the values (float32 [rows, cols]): near the format's
    grid but, across a super-block, not exactly on one grid, so the caller quantizes them once more with the format's
    own quantizer (that last rounding costs little: measured on tiny-31b Q4_K, KLD 0.00207 before it, 0.00216
    after, against 0.00379 for the imatrix quantization alone)."""
    rows, cols = w.shape
    if cols % superblock or superblock % sub:
        raise ValueError(f"{cols} channels in super-blocks of {superblock} and sub-blocks of {sub}")
    work = np.array(w, dtype=np.float64)
    out = np.empty_like(work)
    done = np.zeros(cols, bool)
    for start, u, a in _steps(factors, sub):
        c = start + a
        s0 = c - c % superblock
        cur = np.where(done[s0:s0 + superblock], out[:, s0:s0 + superblock], work[:, s0:s0 + superblock])
        deq = quantize(np.ascontiguousarray(cur, dtype=np.float32), s0)
        out[:, c:c + sub] = deq[:, c - s0:c - s0 + sub]
        done[c:c + sub] = True
        _feed_forward(work, u, start, a, sub, out[:, c:c + sub])
    if not done.all():
        raise ValueError(f"the Hessian's blocks do not cover the {cols} input channels")
    return out.astype(np.float32)
