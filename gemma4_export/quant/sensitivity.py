"""Measured sensitivity: what each class of tensors costs, in KL divergence from the fp32 model, at each GGUF type;
and the mixed-precision plan that spends a size budget where it buys the most.

A class is one role across all layers (every attn_v, every ffn_down, the PLE table, the token embedding...). For
each class and each candidate type, the streamed fp32 model runs the calibration text with that class alone
quantized and dequantized by ggml's own kernels (with the imatrix, as the export would quantize it), and the mean
KLD of its next-token distributions from the unquantized model's is recorded. All candidates run in one pass over
the layers: each layer's weights are read once, and each candidate's hidden states go through it with its own
class swapped for the quantized copy, so the cost is one forward per candidate, not one checkpoint read.

`allocate` then picks one type per class to minimise the summed KLD (the classes' costs add, to first order)
within a byte budget: an exact knapsack over the measured table. llama.cpp's fixed mixes (Q4_K_M and friends) and
hand-made "dynamic" quants choose per tensor by rule; this chooses by measurement.

The same holds for the MLX and ONNX targets (`target_spec`): each brings its candidate types, its byte table and
the quantize-dequantize its writer applies. MLX: affine groups at the preset's group size (2, 3, 4, 5, 6 and 8
bits) and bf16, quantized by `mx.quantize` on the bf16 weights, or with calibration by quant.weighted.mlx_affine
(targets/mlx.py::_write). ONNX: INT4 and INT8 blocks of 32 and FP16, quantized as onnxruntime's own quantizer does
(quant.weighted.int_blocks without statistics), or with calibration by int_blocks' weighted search
(targets/onnx_ops.py::Graph._quantizer), block scales rounded to float16 in the float16 graphs. The measurement
computes in float32 either way: what it ranks is the stored weights, not a runtime's arithmetic. That is the
arithmetic of mlx's Metal kernels, which sum each quantized matmul's products in float32; mlx's CPU kernels sum them
in the activations' dtype (bfloat16), which costs a quantized head far more than its stored weights do (tiny-31b
4bit with a Q8G64 head: KLD 0.00635 on mlx's CPU, 0.00359 with float32 sums, 0.00352 with the head in bf16). The
plans are made for the Metal arithmetic, where MLX artifacts run; `gemma4-export validate --accumulate float32`
measures them that way on a CPU (validate/mlxrt.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Gemma4ExportError, QuantError
from ..exporter.tensors import Role, TensorSpec
from ..progress import Reporter, Silent
from .types import GGUF_TYPES, MLX_BITS, MLX_TYPES, ONNX_TYPES, StorageType

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
ONNX_CANDIDATES = ("INT4", "INT8", "FP16")
SENS_CHUNK, SENS_CHUNKS = 512, 4  # tokens of the calibration set the measurement runs on
FIXED_ROLES = frozenset({Role.NORM, Role.LAYER_SCALAR, Role.ROUTER_PROJ, Role.ROUTER_SCALE,
                         Role.ROUTER_EXPERT_SCALE, Role.KV_SHARED_UNUSED, Role.TOWER, Role.PLE_MODEL_PROJ})
LOOKUP_ROLES = frozenset({Role.TOKEN_EMBD, Role.PLE_TABLE})


def tensor_class(spec: TensorSpec, arch) -> str | None:
    """The class a tensor is measured and chosen in, or None for tensors whose type is never traded (norms, layer
    scalars and the router stay at full precision; the PLE model projection stays 16-bit, as llama.cpp keeps it)."""
    if spec.role in FIXED_ROLES:
        return None
    if spec.role == Role.ATTN_K and spec.layer is not None and not arch.has_v_proj(spec.layer):
        return "attn_kv"  # K==V full layers: the key projection is also the value
    return spec.role.value


@dataclass
class Sensitivity:
    """kld[class][type]: mean KLD (nats per token) of the model with that class alone at that type."""

    kld: dict[str, dict[str, float]]
    tokens: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kld": self.kld, "tokens": self.tokens, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Sensitivity:
        return cls(d["kld"], int(d["tokens"]), d.get("meta", {}))


def _type_for(t: str, row: int, types: dict[str, StorageType] = GGUF_TYPES) -> str:
    """`t`, or what the plan falls back to when rows of this length do not fit its blocks."""
    from ..quant.plan import _fallback

    alt = _fallback(types[t], row, types)
    return alt.name if alt is not None else t


class _QD:
    """Quantize and dequantize float32 rows with ggml's kernels (and the tensor's imatrix vectors)."""

    def __init__(self, importance, prefix: str):
        from ..targets.ggml_quant import Quantizer

        self.q = Quantizer()
        self.importance, self.prefix = importance, prefix

    def __call__(self, name: str, w, t: str, n_mat: int = 1):
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        arr = w.detach().to("cpu", torch.float32).numpy().reshape(-1, w.shape[-1])
        t = _type_for(t, arr.shape[1])
        imat = self.importance.for_tensor(name, self.prefix) if self.importance is not None else None
        if imat is not None and imat.shape != (n_mat, arr.shape[1]):
            raise QuantError(f"imatrix entry of {name} is {list(imat.shape)}, not [{n_mat}, {arr.shape[1]}]")
        out = np.empty_like(arr)
        per = arr.shape[0] // n_mat
        hess = self.importance.hessian_for(name, self.prefix) if self.importance is not None else None
        for m in range(n_mat):
            sl = slice(m * per, (m + 1) * per)
            vec = imat[m] if imat is not None else None
            rows = arr[sl] if hess is None else self.q.gptq(t, arr[sl], vec, hess.factors(m))
            b = self.q.quantize(t, rows, vec)
            out[sl] = dequantize(b, GGMLQuantizationType[t]).reshape(-1, arr.shape[1])
        return torch.from_numpy(out).reshape(w.shape).to(w.device)

    def close(self):
        self.q.close()


def _matrices(importance, prefix: str, name: str, cols: int, n_mat: int, uniform: np.ndarray | None):
    """The importance of each of a tensor's `n_mat` matrices ([n_mat, cols]), `uniform` when calibrating but the
    tensor has no statistics (a lookup table), None without calibration."""
    if importance is None:
        return None
    imat = importance.for_tensor(name, prefix)
    if imat is None:
        return None if uniform is None else np.broadcast_to(uniform, (n_mat, cols))
    if imat.shape != (n_mat, cols):
        raise QuantError(f"imatrix entry of {name} is {list(imat.shape)}, not [{n_mat}, {cols}]")
    return imat


def _rows_of(w) -> np.ndarray:
    import torch

    return w.detach().to("cpu", torch.float32).numpy().reshape(-1, w.shape[-1])


def _back(out: np.ndarray, w):
    import torch

    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(w.shape).to(w.device)


class _MLXQD:
    """Quantize and dequantize float32 rows as the MLX export writes them (targets/mlx.py::_write): without
    calibration `mx.quantize` on the bf16 weights; with it quant.weighted.mlx_affine under the tensor's importance
    (a lookup table, which no imatrix covers, evenly weighted). Dequantized exactly, scale * q + bias in float32."""

    ROWS = 1 << 22  # elements per mx.quantize call

    def __init__(self, importance, prefix: str):
        self.importance, self.prefix = importance, prefix

    def __call__(self, name: str, w, t: str, n_mat: int = 1):
        from ..targets import bf16_bits
        from .weighted import mlx_affine, mlx_dequant

        arr = _rows_of(w)
        rows, cols = arr.shape
        t = _type_for(t, cols, MLX_TYPES)
        if MLX_TYPES[t].is_float:
            if t == "BF16":
                return _back((bf16_bits(arr).astype(np.uint32) << 16).view(np.float32), w)
            return _back(arr.astype(np.float16).astype(np.float32) if t == "F16" else arr, w)
        bits, group = (int(x) for x in t[1:].split("G"))
        out = np.empty_like(arr)
        if self.importance is None:
            import mlx.core as mx

            step = max(1, self.ROWS // cols)
            for r in range(0, rows, step):
                x = mx.array(arr[r:r + step]).astype(mx.bfloat16)
                wq, sc, bi = mx.quantize(x, group_size=group, bits=bits)
                out[r:r + step] = mlx_dequant(np.array(wq), np.array(sc.view(mx.uint16)),
                                              np.array(bi.view(mx.uint16)), bits, group)
            return _back(out, w)
        imat = _matrices(self.importance, self.prefix, name, cols, n_mat, None)
        hess = self.importance.hessian_for(name, self.prefix)
        per = rows // n_mat
        for m in range(n_mat):
            sl = slice(m * per, (m + 1) * per)
            out[sl] = mlx_dequant(*mlx_affine(arr[sl], imat[m] if imat is not None else None, bits, group, hess,
                                              np.full(per, m)), bits, group)
        return _back(out, w)

    def close(self):
        pass


class _ONNXQD:
    """Quantize and dequantize float32 rows as the ONNX export writes them (targets/onnx_ops.py): INT4 / INT8
    symmetric blocks of 32, without calibration onnxruntime's round to nearest (quant.weighted.int_blocks with no
    importance is byte for byte its quantizer), with it int_blocks' weighted search (a lookup table evenly
    weighted); the block scales rounded to float16 in the float16 graphs (`half`). FP16 weights: rounded to
    float16."""

    def __init__(self, importance, prefix: str, half: bool = False):
        self.importance, self.prefix, self.half = importance, prefix, half

    def __call__(self, name: str, w, t: str, n_mat: int = 1):
        from ..targets.onnx_ops import BLOCK, QUANT_BITS
        from .weighted import int_blocks, int_dequant

        arr = _rows_of(w)
        rows, cols = arr.shape
        t = _type_for(t, cols, ONNX_TYPES)
        if ONNX_TYPES[t].is_float:
            return _back(arr.astype(np.float16).astype(np.float32) if t == "FP16" else arr, w)
        bits = QUANT_BITS[t]
        imat = _matrices(self.importance, self.prefix, name, cols, n_mat, np.ones(cols, np.float32))
        hess = self.importance.hessian_for(name, self.prefix) if self.importance is not None else None
        out = np.empty_like(arr)
        per = rows // n_mat
        for m in range(n_mat):
            sl = slice(m * per, (m + 1) * per)
            packed, scales = int_blocks(arr[sl], imat[m] if imat is not None else None, bits, BLOCK, hess,
                                        np.full(per, m))
            if self.half:
                scales = scales.astype(np.float16).astype(np.float32)
            out[sl] = int_dequant(packed, scales, bits)
        return _back(out, w)

    def close(self):
        pass


@dataclass(frozen=True)
class TargetSpec:
    """What the measurement and the choice need from a target: its storage types (bytes per tensor), the candidate
    types, the quantize-dequantize its writer applies, and the largest tensor it can hold."""

    target: str
    types: dict[str, StorageType]
    candidates: tuple[str, ...]
    make_qd: Callable  # (importance, prefix) -> callable(name, w, type, n_mat) with .close()
    key: str = ""  # what the cache key says about the target and its quantizer ("" for GGUF: its key is unchanged)
    max_tensor_bytes: int | None = None


GGUF_SPEC = TargetSpec("gguf", GGUF_TYPES, CANDIDATES, _QD)


def _mlx_group(preset) -> int:
    """The group size of the preset's quantized types (as MLXTarget._group): its slots' first quantized type."""
    for v in preset.slots.values():
        if v and not MLX_TYPES[v].is_float:
            return MLX_TYPES[v].block
    return 64


def target_spec(target, preset=None) -> TargetSpec:
    """The spec of a target (a Target or its name) for a preset: GGUF's K-quants and Q8_0; MLX's affine widths at the
    preset's group size and BF16; ONNX's INT4, INT8 and FP16 (block scales in float16 for its float16 graphs)."""
    name = getattr(target, "name", target)
    limit = getattr(target, "max_tensor_bytes", None) or None
    if name == "gguf":
        return GGUF_SPEC if limit is None else TargetSpec("gguf", GGUF_TYPES, CANDIDATES, _QD, "", limit)
    if name == "mlx":
        g = _mlx_group(preset) if preset is not None else 64
        return TargetSpec("mlx", MLX_TYPES, (*(f"Q{b}G{g}" for b in MLX_BITS), "BF16"), _MLXQD, "mlx", limit)
    if name == "onnx":
        from ..targets.onnx import HALF

        half = preset is not None and preset.name in HALF
        return TargetSpec("onnx", ONNX_TYPES, ONNX_CANDIDATES,
                          lambda imp, prefix: _ONNXQD(imp, prefix, half), "onnx16" if half else "onnx", limit)
    raise QuantError(f"--target-bpw / --max-size: no measured choice of types for the {name} target")


def measure(src, importance, calib, types: tuple[str, ...] | None = None, device: str = "cpu",
            reporter: Reporter | None = None, spec: TargetSpec = GGUF_SPEC) -> Sensitivity:
    """The sensitivity table of `src` (a ModelSource with weights) on the token chunks `calib`, for `spec`'s target
    (GGUF by default) and its candidate types (or `types`)."""
    import torch

    from ..exporter.tensors import hf_name
    from ..validate.streamed import StreamedModel, _kv_sharing_dict, _Seq

    types = tuple(types or spec.candidates)
    reporter = reporter or Silent()
    t0 = time.perf_counter()
    model = StreamedModel(src.directory, device, src.adapter, stream=False)  # it swaps weights
    arch, prefix = src.arch, model.prefix
    classes = classes_of(src)
    head_class = Role.TOKEN_EMBD.value if arch.tie_word_embeddings else Role.OUTPUT.value
    start_classes = {Role.TOKEN_EMBD.value, Role.PLE_TABLE.value}
    qd = spec.make_qd(importance, prefix)
    cands = [(c, t) for c in classes for t in types]
    try:
        with torch.no_grad():
            base = model.start(calib)
            runs: dict[tuple[str, str], list] = {}
            for c, t in cands:
                if c in start_classes:
                    names = {s.name for s in classes[c]}
                    model.transform = lambda name, w, names=names, t=t: qd(name, w, t) if name in names else w
                    try:
                        runs[(c, t)] = model.start(calib)
                    finally:
                        model.transform = None
                else:
                    runs[(c, t)] = [_Seq(s.ids, s.hidden.clone(), s.ple, s.positions, s.masks, s.rotary,
                                         _kv_sharing_dict(), None) for s in base]
            by_layer: dict[int, dict[str, list[TensorSpec]]] = {}
            for c, ss in classes.items():
                for s in ss:
                    if s.layer is not None:
                        by_layer.setdefault(s.layer, {}).setdefault(c, []).append(s)
            with reporter.task(f"sensitivity: {len(cands)} candidates", arch.num_layers, unit="layers") as task:
                for i in range(arch.num_layers):
                    layer = model.layer(i)
                    names = {hf_name(k, i, prefix): rel for rel, k in model._layer_names(i).items()}
                    model.run_layer(i, layer, base)
                    for (c, t), seqs in runs.items():
                        swaps = []
                        for s in by_layer.get(i, {}).get(c, []):
                            p = layer.get_parameter(names[s.name])
                            swaps.append((p, p.data))
                            p.data = qd(s.name, p.data, t, s.shape[0] if len(s.shape) == 3 else 1)
                        try:
                            model.run_layer(i, layer, seqs)
                        finally:
                            for p, d in swaps:
                                p.data = d
                    model.release(i)
                    task.advance(1)
            model.finish(base)
            for seqs in runs.values():
                model.finish(seqs)
            kld = _kld(model, base, runs, head_class, qd)
    finally:
        qd.close()
        model.close()
    tokens = sum(len(c) for c in calib)
    table: dict[str, dict[str, float]] = {}
    for (c, t), v in kld.items():
        table.setdefault(c, {})[t] = v
    meta = {"seconds": round(time.perf_counter() - t0, 1), "types": list(types)}
    if spec.target != "gguf":
        meta["target"] = spec.key
    return Sensitivity(table, tokens, meta)


def _kld(model, base, runs, head_class: str, qd) -> dict[tuple[str, str], float]:
    """Mean KLD(base || candidate) over every position, with the head computed in blocks of vocabulary rows: an
    online log-sum-exp of the base logits, and of p-weighted logit differences, per candidate."""
    import torch

    hb = torch.cat([s.hidden[0] for s in base])
    hc = {k: torch.cat([s.hidden[0] for s in seqs]) for k, seqs in runs.items()}
    n = hb.shape[0]
    f64 = torch.float64
    lse_b = torch.full((n,), -math.inf, dtype=f64)
    lse_c = {k: torch.full((n,), -math.inf, dtype=f64) for k in runs}
    acc = {k: torch.zeros(n, dtype=f64) for k in runs}  # sum_v exp(zb - lse_b_running) * (zb - zc)
    with torch.no_grad():
        for _, w in model.head_blocks():
            zb = model._logits(hb, w).to(f64)
            blk = torch.logsumexp(zb, dim=1)
            new_b = torch.logaddexp(lse_b, blk)
            quantized_head: dict[str, object] = {}
            for k, h in hc.items():
                c, t = k
                wk = w
                if c == head_class:
                    if t not in quantized_head:
                        quantized_head[t] = qd(model.head_name, w, t)
                    wk = quantized_head[t]
                zc = model._logits(h, wk).to(f64)
                lse_c[k] = torch.logaddexp(lse_c[k], torch.logsumexp(zc, dim=1))
                part = (torch.exp(zb - new_b[:, None]) * (zb - zc)).sum(1)
                acc[k] = acc[k] * torch.exp(lse_b - new_b) + part
            lse_b = new_b
    out = {}
    for k in runs:
        kl = acc[k] - lse_b + lse_c[k]  # E_p[zb - zc] - lse_b + lse_c
        out[k] = float(kl.clamp(min=0).mean())
    return out


# ---- choosing types under a budget -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    cls: str
    type: str
    bytes: int
    kld: float


def class_bytes(specs: list[TensorSpec], t: str, types: dict[str, StorageType] = GGUF_TYPES) -> int:
    return sum(types[_type_for(t, s.row_length, types)].nbytes(s.numel) for s in specs)


def _fits(specs: list[TensorSpec], t: str, spec: TargetSpec) -> bool:
    """Whether every tensor of a class at `t` is within the target's largest tensor (MLX: Metal's 4 GiB buffer)."""
    if spec.max_tensor_bytes is None:
        return True
    return all(spec.types[_type_for(t, s.row_length, spec.types)].nbytes(s.numel) <= spec.max_tensor_bytes
               for s in specs)


def allocate(sens: Sensitivity, classes: dict[str, list[TensorSpec]], budget: int, resolution: int = 4000,
             spec: TargetSpec = GGUF_SPEC, copies: dict[str, int] | None = None) -> dict[str, Choice]:
    """One type per class, minimising the summed measured KLD with the classes' bytes within `budget`: an exact
    knapsack over bytes in `resolution` steps (each class's bytes rounded up, so the result never exceeds the
    budget). Bytes as `spec`'s target stores them (GGUF by default), times `copies` for a class the artifact holds
    more than once; a type that would make one of the class's tensors larger than the target can hold is not
    offered."""
    names = sorted(classes)
    opts = {}
    for c in names:
        ts = [t for t in sens.kld[c] if _fits(classes[c], t, spec)] or list(sens.kld[c])
        k = (copies or {}).get(c, 1)
        opts[c] = [Choice(c, t, k * class_bytes(classes[c], t, spec.types), sens.kld[c][t]) for t in ts]
    least = sum(min(o.bytes for o in opts[c]) for c in names)
    if least > budget:
        raise QuantError(f"the budget is {budget / 1e6:.1f} MB for the tensors whose type is chosen; the smallest "
                         f"types measured need {least / 1e6:.1f} MB")
    unit = max(1, budget // resolution)
    cap = budget // unit
    INF = float("inf")
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for c in names:
        nxt = np.full(cap + 1, INF)
        pick = np.full(cap + 1, -1, dtype=np.int64)
        for j, o in enumerate(opts[c]):
            cost = -(-o.bytes // unit)
            if cost > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[cost:] = best[: cap + 1 - cost] + o.kld
            better = cand < nxt
            nxt[better], pick[better] = cand[better], j
        picks.append(pick)
        best = nxt
    b = int(np.argmin(best))
    if not np.isfinite(best[b]):  # the budget only fits the smallest types (the rounding up left no room)
        return {c: min(opts[c], key=lambda o: (o.bytes, o.kld)) for c in names}
    out = {}
    for c, pick in zip(reversed(names), reversed(picks)):
        o = opts[c][int(pick[b])]
        out[c] = o
        b -= -(-o.bytes // unit)
    return out


# ---- cached measurement ------------------------------------------------------------------------------------------


def sensitivity_for(src, importance, device: str = "cpu", reporter: Reporter | None = None,
                    types: tuple[str, ...] | None = None, use_cache: bool = True,
                    spec: TargetSpec = GGUF_SPEC) -> Sensitivity:
    """The sensitivity table of `src` for `spec`'s target (GGUF by default), measured on the first chunks of the
    shipped calibration set (cached per checkpoint digest, imatrix, target and candidate types)."""
    from .calibrate import cache_dir, calibration_set

    types = tuple(types or spec.candidates)
    calib = calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=SENS_CHUNK, chunks=SENS_CHUNKS)
    imat_key = "none" if importance is None else hashlib.sha256(
        b"".join(importance.weights(k).tobytes() for k in sorted(importance.sums))).hexdigest()[:12]
    if importance is not None and importance.hessians:  # GPTQ's feedback changes what is measured
        imat_key += f"-gptq{importance.hessian_block}"
        if spec.key:  # and MLX's and ONNX's refit of the scales (refit_groups) too
            imat_key += "r"
    target_key = f"{spec.key}-" if spec.key else ""  # GGUF's keys predate the other targets: unchanged
    key = f"{src.digest.removeprefix('sha256:')[:16]}-{calib.key}-{imat_key}-{target_key}{'-'.join(types)}"
    path = cache_dir().parent / "sensitivity" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            s = Sensitivity.from_json(json.loads(path.read_text()))
            s.meta["cached"] = True
            return s
        except (ValueError, KeyError):
            pass
    s = measure(src, importance, calib.chunks, types, device, reporter, spec)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(s.to_json(), indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return s


def classes_of(src) -> dict[str, list[TensorSpec]]:
    out: dict[str, list[TensorSpec]] = {}
    for s in src.checkpoint.expected:
        c = tensor_class(s, src.arch)
        if c is not None:
            out.setdefault(c, []).append(s)
    return out


def mixed_assignments(src, plan, sens: Sensitivity, target_bytes: int, what: str, spec: TargetSpec = GGUF_SPEC,
                      copies: dict[str, int] | None = None) -> dict[str, tuple[str, str]]:
    """{tensor name: (type, reason)} for every tensor of a traded class, so that the plan's tensor bytes stay
    within `target_bytes` (the tensors not traded keep the plan's types and count against it; a class in `copies`
    counts that many times)."""
    classes = classes_of(src)
    traded = {s.name for ss in classes.values() for s in ss}
    fixed = sum(e.bytes for e in plan.kept if e.name not in traded)
    choice = allocate(sens, classes, target_bytes - fixed, spec=spec, copies=copies)
    total_kld = sum(o.kld for o in choice.values())
    out = {}
    for c, o in choice.items():
        alts = ", ".join(f"{t} {k:.2e}" for t, k in sorted(sens.kld[c].items(), key=lambda x: -x[1]))
        reason = (f"{what}: class {c} at {o.type} ({o.bytes / 1e6:.2f} MB) costs KLD {o.kld:.2e} on "
                  f"{sens.tokens} calibration tokens (measured: {alts}); "
                  f"the types chosen for all classes minimise the summed KLD ({total_kld:.2e}) within the budget")
        for s in classes[c]:
            out[s.name] = (_type_for(o.type, s.row_length, spec.types), reason)
    return out


# ---- the rest of a --max-size budget -----------------------------------------------------------------------------


def stored_copies(t, src) -> dict[str, int]:
    """Classes the artifact stores more than once: an ONNX export of a tied model holds the embedding table in the
    embedding graph's data and again, as the head, in the decoder's (targets/onnx.py::write)."""
    name = getattr(t, "name", t)
    if name == "onnx" and src.arch.tie_word_embeddings:
        return {Role.TOKEN_EMBD.value: 2}
    return {}


def overhead_bytes(t, src, plan, preset, towers: bool = True) -> int:
    """Bytes of the artifact besides its text tensors' data, which a --max-size budget leaves out: for GGUF the
    target's own count (the header); for the MLX and ONNX directories an upper estimate, as those files are written
    after the plan: the tokenizer files (their sizes), the JSON files, the safetensors headers or the graphs (which
    grow with the layers, the experts' views and the tensors), and the towers a default export writes beside the
    text model (their plan's bytes plus their headers or encoder graphs; none with `towers=False`)."""
    if t.name == "gguf" or t.name not in ("mlx", "onnx"):
        return t.overhead_bytes(src, plan)
    from ..targets import TOKENIZER_FILES

    d = src.checkpoint.dir
    tok = sum((d / f).stat().st_size for f in TOKENIZER_FILES if (d / f).is_file())
    cfg = len(json.dumps(src.config, indent=2)) + 4096
    n = len(plan.kept)
    towers = _tower_bytes(t, src, preset) if towers else 0  # --text-only: none
    if t.name == "mlx":
        # config.json names every module's quantization; the index and the header name every output tensor
        per_tensor = 3 * (128 + 128) + 128
        return tok + cfg + n * per_tensor + towers + (64 << 10)
    a = src.arch
    experts = a.moe.num_experts if a.moe else 0
    per_layer = (48 << 10) + experts * 3 * 512  # nodes, and the experts' initializer views
    graphs = 2 * (a.num_layers * per_layer + (64 << 10)) + (16 << 10)  # the decoder, the single graph, the embedding
    return tok + 4 * cfg + graphs + towers + (64 << 10)


def _tower_bytes(t, src, preset) -> int:
    """The towers' bytes an export with the defaults writes into the directory (0 when it writes none), with room
    for their headers (MLX) or encoder graphs (ONNX)."""
    from ..api import tower_plan

    try:
        tp = tower_plan(src, t, preset, True, None, Silent())
    except Gemma4ExportError:  # a checkpoint whose towers the target cannot write: none are written
        return 0
    if tp is None:
        return 0
    return tp.total_bytes + len(tp.kept) * (256 if t.name == "mlx" else 2048) + (256 << 10)
