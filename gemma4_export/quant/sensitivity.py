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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import QuantError
from ..exporter.tensors import Role, TensorSpec
from ..progress import Reporter, Silent

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
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


def _type_for(t: str, row: int) -> str:
    """`t`, or what the plan falls back to when rows of this length do not fit its blocks."""
    from ..quant.plan import _fallback
    from ..quant.types import GGUF_TYPES

    alt = _fallback(GGUF_TYPES[t], row, GGUF_TYPES)
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
        for m in range(n_mat):
            sl = slice(m * per, (m + 1) * per)
            vec = imat[m] if imat is not None else None
            b = self.q.quantize(t, arr[sl], vec)
            out[sl] = dequantize(b, GGMLQuantizationType[t]).reshape(-1, arr.shape[1])
        return torch.from_numpy(out).reshape(w.shape).to(w.device)

    def close(self):
        self.q.close()


def measure(src, importance, calib, types: tuple[str, ...] = CANDIDATES, device: str = "cpu",
            reporter: Reporter | None = None) -> Sensitivity:
    """The sensitivity table of `src` (a ModelSource with weights) on the token chunks `calib`."""
    import torch

    from ..exporter.tensors import hf_name
    from ..validate.streamed import StreamedModel, _kv_sharing_dict, _Seq

    reporter = reporter or Silent()
    t0 = time.perf_counter()
    model = StreamedModel(src.directory, device, src.adapter)
    arch, prefix = src.arch, model.prefix
    specs = [s for s in src.checkpoint.expected]
    classes: dict[str, list[TensorSpec]] = {}
    for s in specs:
        c = tensor_class(s, arch)
        if c is not None:
            classes.setdefault(c, []).append(s)
    head_class = Role.TOKEN_EMBD.value if arch.tie_word_embeddings else Role.OUTPUT.value
    start_classes = {Role.TOKEN_EMBD.value, Role.PLE_TABLE.value}
    qd = _QD(importance, prefix)
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
    return Sensitivity(table, tokens, {"seconds": round(time.perf_counter() - t0, 1), "types": list(types)})


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


def class_bytes(specs: list[TensorSpec], t: str) -> int:
    from ..quant.types import GGUF_TYPES

    return sum(GGUF_TYPES[_type_for(t, s.row_length)].nbytes(s.numel) for s in specs)


def allocate(sens: Sensitivity, classes: dict[str, list[TensorSpec]], budget: int, resolution: int = 4000
             ) -> dict[str, Choice]:
    """One type per class, minimising the summed measured KLD with the classes' bytes within `budget`: an exact
    knapsack over bytes in `resolution` steps (each class's bytes rounded up, so the result never exceeds the
    budget)."""
    names = sorted(classes)
    opts = {c: [Choice(c, t, class_bytes(classes[c], t), sens.kld[c][t]) for t in sens.kld[c]] for c in names}
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
                    types: tuple[str, ...] = CANDIDATES, use_cache: bool = True) -> Sensitivity:
    """The sensitivity table of `src`, measured on the first chunks of the shipped calibration set (cached per
    checkpoint digest, imatrix and candidate types)."""
    from .calibrate import cache_dir, calibration_set

    calib = calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=SENS_CHUNK, chunks=SENS_CHUNKS)
    imat_key = "none" if importance is None else hashlib.sha256(
        b"".join(importance.weights(k).tobytes() for k in sorted(importance.sums))).hexdigest()[:12]
    key = f"{src.digest.removeprefix('sha256:')[:16]}-{calib.key}-{imat_key}-{'-'.join(types)}"
    path = cache_dir().parent / "sensitivity" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            s = Sensitivity.from_json(json.loads(path.read_text()))
            s.meta["cached"] = True
            return s
        except (ValueError, KeyError):
            pass
    s = measure(src, importance, calib.chunks, types, device, reporter)
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


def mixed_assignments(src, plan, sens: Sensitivity, target_bytes: int, what: str) -> dict[str, tuple[str, str]]:
    """{tensor name: (type, reason)} for every tensor of a traded class, so that the plan's tensor bytes stay
    within `target_bytes` (the tensors not traded keep the plan's types and count against it)."""
    classes = classes_of(src)
    traded = {s.name for ss in classes.values() for s in ss}
    fixed = sum(e.bytes for e in plan.kept if e.name not in traded)
    choice = allocate(sens, classes, target_bytes - fixed)
    total_kld = sum(o.kld for o in choice.values())
    out = {}
    for c, o in choice.items():
        alts = ", ".join(f"{t} {k:.2e}" for t, k in sorted(sens.kld[c].items(), key=lambda x: -x[1]))
        reason = (f"{what}: class {c} at {o.type} ({o.bytes / 1e6:.2f} MB) costs KLD {o.kld:.2e} on "
                  f"{sens.tokens} calibration tokens (measured: {alts}); the types chosen for all classes minimise "
                  f"the summed KLD ({total_kld:.2e}) within the budget")
        for s in classes[c]:
            out[s.name] = (_type_for(o.type, s.row_length), reason)
    return out
