"""The per-tensor quantization plan: which type each tensor gets and why, before anything is written.

Every target writes exactly its plan, and tests read artifacts back to check that they do.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import QuantError
from ..exporter.arch import Gemma4Arch
from ..exporter.tensors import Role, TensorSpec
from .rules import Ctx, Preset, decide, get_preset
from .types import DROP, FALLBACK, StorageType, storage_type


@dataclass(frozen=True)
class Override:
    pattern: str
    type: str
    regex: re.Pattern = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Override:
        if "=" not in text:
            raise QuantError(f"--tensor-type {text!r}: expected PATTERN=TYPE (for example 'attn_v=Q8_0')")
        pattern, _, type_name = text.rpartition("=")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise QuantError(f"--tensor-type {text!r}: bad pattern ({e})") from None
        return cls(pattern, type_name.strip(), rx)


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    role: str
    type: str  # a storage type name, or DROP
    bytes: int
    reason: str
    rule: str
    layer: int | None = None
    method: str = ""  # "lattice": written on the tensor's trained 4-bit lattice (quant/lattice.py)

    @property
    def dropped(self) -> bool:
        return self.type == DROP

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    variant: str
    preset: str
    target: str
    entries: list[PlanEntry]
    ple_type: str | None = None
    overrides: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # set by the export when the quantizers were given an imatrix
    sensitivity: dict[str, Any] | None = None  # the measurement a size-targeted plan was chosen from
    qat: dict[str, Any] | None = None  # the lattice detection: mode and each measured tensor's LatticeFit

    @property
    def kept(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.dropped]

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.kept)

    @property
    def parameters(self) -> int:
        return sum(e.numel for e in self.kept)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.total_bytes, self.parameters)

    def by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.entries}

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.type] = out.get(e.type, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "target": self.target,
            "preset": self.preset,
            "ple_type": self.ple_type,
            "overrides": self.overrides,
            "parameters": self.parameters,
            "total_bytes": self.total_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "dropped": sum(1 for e in self.entries if e.dropped),
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
            **({"qat": self.qat} if self.qat else {}),
            "tensors": [
                {k: (list(v) if k == "shape" else v) for k, v in asdict(e).items()
                 if k not in ("rule", "layer") and (k != "method" or v)}
                for e in self.entries
            ],
        }


def bits_per_weight(nbytes: int, parameters: int) -> float:
    """The one definition: bytes x 8 over the text parameters kept (the decoder's weights, without towers and
    without the k/v weights of KV-shared layers, which no runtime reads). A plan counts its tensor data; a report
    counts the artifact's bytes on disk, metadata and tokenizer included, over the same parameters."""
    return nbytes * 8 / max(1, parameters)


def text_parameters(arch: Gemma4Arch) -> int:
    """The parameters a text artifact keeps: what `bits_per_weight` divides by."""
    from ..exporter.tensors import expected_text_tensors

    return sum(s.numel for s in expected_text_tensors(arch) if s.role != Role.KV_SHARED_UNUSED)


def _fallback(t: StorageType, row: int, types: dict[str, StorageType]) -> StorageType | None:
    """The type to use when `t` cannot hold rows of this length (see types.FALLBACK), returned so that the plan
    says so; None when `t` fits."""
    if t.holds_rows(row):
        return None
    alt = types.get(FALLBACK.get(t.name, ""))
    if alt is not None and alt.holds_rows(row):
        return alt
    for name in ("F16", "F32"):
        if name in types:
            return types[name]
    raise QuantError(f"no type of this target can hold rows of length {row}")


def build_plan(
    arch: Gemma4Arch,
    specs: list[TensorSpec],
    preset: str | Preset,
    variant: str = "",
    overrides: list[str] | None = None,
    ple_type: str | None = None,
    target: str = "gguf",
    group_size: int | None = None,
    assigned: dict[str, tuple[str, str]] | None = None,
    lattice: dict[str, Any] | None = None,
    qat: str = "auto",
) -> Plan:
    """The plan: each tensor's rule decision, then `assigned` ({name: (type, reason)}, a mixed-precision choice
    from measurement: quant/sensitivity.py), then the QAT lattice (`lattice`: {name: LatticeFit} measured on the
    weights; `qat` auto, on or off, see qat_choice), then the user's --tensor-type overrides, which win."""
    from ..targets.registry import get_target

    p = preset if isinstance(preset, Preset) else get_preset(preset, target, group_size)
    tgt = get_target(p.target)
    types = tgt.types
    if ple_type is not None:
        if not arch.has_ple:
            raise QuantError(f"--ple-type given, but {variant or 'this model'} has no per-layer embedding table")
        ple_type = storage_type(ple_type, types).name
    check_qat_mode(qat)
    ovs = [Override.parse(o) for o in overrides or []]
    for o in ovs:
        storage_type(o.type, types)
    used = [False] * len(ovs)
    entries: list[PlanEntry] = []
    for spec in specs:
        tname, rule, reason = decide(Ctx(spec, arch, p, ple_type))
        if assigned and spec.name in assigned and tname != DROP:
            tname, reason = assigned[spec.name]
            rule = "target-size"
        method = ""
        if tname != DROP and lattice and spec.name in lattice:
            chosen = qat_choice(lattice[spec.name], p, tgt, qat)
            if chosen is not None:
                tname, rule, reason, method = chosen
        for k, o in enumerate(ovs):
            if o.regex.search(spec.name):
                if tname == DROP:
                    continue  # an override never resurrects a dropped tensor; unused overrides are an error below
                used[k] = True
                t = storage_type(o.type, types)
                if len(spec.shape) < 2 and not t.is_float:
                    raise QuantError(f"--tensor-type {o.pattern}={o.type}: '{spec.name}' is 1-D; only float types fit")
                if spec.role in (Role.ROUTER_PROJ,) and not t.is_float:
                    raise QuantError(f"--tensor-type {o.pattern}={o.type}: the MoE router stays at full precision")
                if not t.holds_rows(spec.row_length):
                    raise QuantError(
                        f"--tensor-type {o.pattern}={o.type}: '{spec.name}' has rows of {spec.row_length}, "
                        f"not a multiple of {t.name}'s block of {t.block}"
                    )
                tname, rule, reason = t.name, "override", f"override {o.pattern}={o.type} from the command line"
                method = ""
                break
        if tname == DROP:
            entries.append(PlanEntry(spec.name, spec.shape, spec.role.value, DROP, 0, reason, rule, spec.layer))
            continue
        t = types[tname]
        alt = _fallback(t, spec.row_length, types)
        if alt is not None:
            reason = f"{reason}; {t.name} needs rows in multiples of {t.block}, rows here are {spec.row_length}: {alt.name}"
            t, rule = alt, f"{rule}+fallback"
        limit = tgt.max_tensor_bytes
        if limit and t.nbytes(spec.numel) > limit and rule != "override":
            small = tgt.small_type(p)
            reason = (f"{reason}; {t.name} would be {t.nbytes(spec.numel) / 2**30:.1f} GiB, over "
                      f"{tgt.max_tensor_reason}: {small.name}")
            t, rule = small, f"{rule}+size-limit"
        entries.append(PlanEntry(spec.name, spec.shape, spec.role.value, t.name, t.nbytes(spec.numel), reason, rule,
                                 spec.layer, method if t.name == tname else ""))
    unused = [ovs[k].pattern for k in range(len(ovs)) if not used[k]]
    if unused:
        raise QuantError(f"--tensor-type pattern(s) matched no kept tensor: {', '.join(unused)}")
    out = Plan(variant, p.name, p.target, entries, ple_type, [f"{o.pattern}={o.type}" for o in ovs])
    if lattice is not None:
        out.qat = {"mode": qat, "tensors": {n: f.to_json() for n, f in lattice.items()}}
    return out


def build_tower_plan(specs: list[TensorSpec], policy, target: str, variant: str = "") -> Plan:
    """The towers' plan: every tower tensor's type by the tower rules (quant/rules.py, TOWER_RULES) under the
    target's tower policy; a type that cannot hold a tensor's rows (Q8_0 needs multiples of 32) falls back as the
    text plan's do, and the reason says so."""
    from ..targets.registry import get_target
    from .rules import decide_tower

    types = get_target(target).types
    entries: list[PlanEntry] = []
    for spec in specs:
        if spec.role != Role.TOWER:
            continue
        tname, rule, reason = decide_tower(spec.name, spec.shape, policy)
        t = types[tname]
        alt = _fallback(t, spec.row_length, types) if len(spec.shape) >= 2 else None
        if alt is not None:
            reason = f"{reason}; {t.name} needs rows in multiples of {t.block}, rows here are {spec.row_length}: {alt.name}"
            t, rule = alt, f"{rule}+fallback"
        entries.append(PlanEntry(spec.name, spec.shape, spec.role.value, t.name, t.nbytes(spec.numel), reason, rule))
    return Plan(variant, policy.name, target, entries)


QAT_MODES = ("auto", "on", "off")


def check_qat_mode(mode: str) -> None:
    if mode not in QAT_MODES:
        raise QuantError(f"--qat {mode!r}: choose auto, on or off")


def lattice_preset(p: Preset) -> bool:
    """The presets that write a QAT checkpoint's lattice: `qat`, and the 4-bit ones (a lattice tensor costs what
    their 4-bit type costs, or, in MLX's groups of 64, a group-of-32 scale and bias more)."""
    return p.name == "qat" or p.base in ("Q4_0", "Q4_K", "IQ4_XS", "INT4") or p.base.startswith("Q4G")


def qat_choice(fit, p: Preset, tgt, mode: str) -> tuple[str, str, str, str] | None:
    """(type, rule, reason, method) for a tensor measured on a 4-bit lattice, or None to keep the rule's choice.
    auto: the tensor is written on its lattice when at least lattice.AUTO_SHARE of its groups are on it; on: when
    any group is (the groups off it get Q4_0's rule, and the reason says how many and how far)."""
    from .lattice import AUTO_SHARE

    if mode == "off" or not lattice_preset(p) or fit.on == 0 or (mode == "auto" and fit.share < AUTO_SHARE):
        return None
    why = ("QAT lattice: written with the trained steps and integers (" + tgt.lattice_form + "), lossless on its "
           "groups; " + fit.describe())
    if fit.share < 1:
        why += "; the groups off the lattice get Q4_0's rule"
    return tgt.lattice_type, "qat-lattice", why, "lattice"

