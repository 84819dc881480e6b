"""Human-readable renderings (rich tables) of the library's results. The CLI prints these; the library returns data."""

from __future__ import annotations

from collections import defaultdict

from rich.table import Table

from .exporter.checkpoint import weights_present
from .exporter.tensors import TOWER_PREFIXES
from .exporter.variants import VARIANTS
from .quant.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def variants_table(check_local: bool = True) -> Table:
    t = Table(title="Gemma 4 variants")
    for col in ("variant", "hub id", "class", "parameters", "text params", "layers", "features", "towers", "local"):
        t.add_column(col, overflow="fold")
    from .exporter.tensors import expected_text_tensors

    for v in VARIANTS.values():
        a = v.arch()
        text = sum(s.numel for s in expected_text_tensors(a))
        t.add_row(
            v.name,
            v.hub_id or "(ships with gemma4-export)",
            a.architecture,
            human_count(v.published_parameters) if v.published_parameters else "-",
            human_count(text),
            str(a.num_layers),
            ", ".join(a.features()) or "dense",
            ", ".join(a.towers) or "-",
            ("yes" if weights_present(v) else "no") if check_local else "?",
        )
    return t


def plan_table(plan: Plan, all_rows: bool = False) -> Table:
    """One row per tensor (one per tower unless all_rows); the reason column names the rule, and the caption spells
    each rule's reason out once."""
    prefix = _common_text_prefix(plan)
    title = f"{plan.variant}: {plan.target} {plan.preset}" + (f", PLE table {plan.ple_type}" if plan.ple_type else "")
    t = Table(title=title + (f"  (names under {prefix})" if prefix else ""), caption_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("shape", no_wrap=True)
    t.add_column("role", no_wrap=True)
    t.add_column("type", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    t.add_column("reason (rule)", no_wrap=True)
    towers: dict[str, list] = defaultdict(list)
    reasons: dict[str, str] = {}
    for e in plan.entries:
        reasons.setdefault(e.rule, e.reason)
        tower = next((p for p in TOWER_PREFIXES if e.name.startswith(p)), None)
        if tower and not all_rows:
            towers[tower].append(e)
            continue
        name = e.name[len(prefix):] if prefix and e.name.startswith(prefix) else e.name
        t.add_row(name, "x".join(map(str, e.shape)), e.role, e.type, f"{e.bytes:,}", e.rule)
    for tower, rows in towers.items():
        n = sum(r.numel for r in rows)
        t.add_row(f"{tower}* ({len(rows)} tensors)", f"{human_count(n)} params", "tower", "DROP", "0", rows[0].rule)
    t.caption = "\n".join(f"{rule}: {why}" for rule, why in reasons.items())
    return t


def _common_text_prefix(plan: Plan) -> str:
    for p in ("model.language_model.", "model."):
        if all(e.name.startswith(p) for e in plan.entries if e.role != "tower"):
            return p
    return ""


def plan_summary(plan: Plan) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(plan.type_counts().items()))
    return (
        f"{plan.variant} {plan.target} {plan.preset}: {human_count(plan.parameters)} parameters kept, "
        f"{human_bytes(plan.total_bytes)} of tensor data ({plan.total_bytes:,} bytes), "
        f"{plan.bits_per_weight:.2f} bits per weight; tensors by type: {counts}"
    )
