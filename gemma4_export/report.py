"""Human-readable renderings of the library's results. The CLI prints these; the library returns data.

Each listing comes in two forms: a rich table for a terminal, which picks the richest column layout that fits the
terminal's width (dropping and abbreviating columns when it is narrow rather than breaking a name or a number), and
plain lines for a pipe or a file, one row per line with aligned columns, no box drawing and no wrapping, easy to grep.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from rich import box
from rich.cells import cell_len
from rich.table import Table

from .exporter.checkpoint import weights_present
from .exporter.tensors import TOWER_PREFIXES
from .exporter.variants import VARIANTS
from .quant.plan import Plan

BUNDLED = "(bundled)"  # the hub id column of the tiny variants, which ship with the package


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


# ---- layout ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    header: str
    right: bool = False  # right-justified (numbers)
    # None: one line, never cut; "words": wraps at spaces; "fold": wraps at spaces and breaks what is still too long.
    # Only the narrowest layout should have a wrapping column.
    wrap: str | None = None

    FOLD_MIN = 20  # the narrowest a folding column is made

    def widths(self, cells: Sequence[str]) -> tuple[int, int]:
        """The column's (minimum, natural) width, header included."""
        natural = max(cell_len(v) for v in [self.header, *cells])
        if self.wrap == "fold":
            return min(natural, self.FOLD_MIN), natural
        if self.wrap == "words":
            return max(cell_len(w) for v in [self.header, *cells] for w in v.split() or [""]), natural
        return natural, natural


@dataclass(frozen=True)
class Layout:
    cols: Sequence[Col]
    rows: Sequence[Sequence[str]]
    title: str | None = None

    def width(self, boxed: bool, minimum: bool = False) -> int:
        """The table's width with every cell on one line (or, minimum, with its wrapping columns at their narrowest):
        the boxed style has a border and a padded separator around every column (3n+1), the light one two spaces
        between columns (2n-2)."""
        n = len(self.cols)
        cells = sum(c.widths([r[i] for r in self.rows])[0 if minimum else 1] for i, c in enumerate(self.cols))
        return cells + (3 * n + 1 if boxed else 2 * (n - 1))


def _table(layout: Layout, boxed: bool, caption: str | None) -> Table:
    style = {} if boxed else {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "collapse_padding": True}
    t = Table(title=layout.title, caption=caption, caption_justify="left", **style)
    for c in layout.cols:
        t.add_column(c.header, justify="right" if c.right else "left", no_wrap=c.wrap is None,
                     overflow="fold" if c.wrap == "fold" else "ellipsis")
    for r in layout.rows:
        t.add_row(*r)
    return t


def fit_table(layouts: Sequence[Layout], width: int | None, caption: str | None = None) -> Table | None:
    """The first layout (richest first) that fits `width` with every cell on one line, boxed if that fits, else in
    the light style (a rule under the header, two spaces between columns); else the last layout, light, with its
    wrapping columns wrapped, if that fits; else None: too narrow for a table (print the lines form instead).
    No width: the first layout, boxed."""
    if width is None:
        return _table(layouts[0], True, caption)
    for layout in layouts:
        for boxed in (True, False):
            if layout.width(boxed) <= width:
                return _table(layout, boxed, caption)
    if layouts[-1].width(False, minimum=True) <= width:
        return _table(layouts[-1], False, caption)
    return None


def plain_lines(cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> list[str]:
    """A header line and one line per row, columns aligned and two spaces apart, no box drawing, no wrapping: the
    form for a pipe or a log, where grep finds a row by any of its values."""
    widths = [max([cell_len(c.header)] + [cell_len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:
        parts = [(v.rjust(w) if c.right else v.ljust(w)) for c, v, w in zip(cols, cells, widths)]
        return "  ".join(parts).rstrip()

    return [line([c.header for c in cols])] + [line(r) for r in rows]


# ---- variants ----------------------------------------------------------------------------------------------------


def _variant_facts(check_local: bool) -> list[dict[str, str]]:
    from .exporter.tensors import expected_text_tensors

    out = []
    for v in VARIANTS.values():
        a = v.arch()
        text = sum(s.numel for s in expected_text_tensors(a))
        out.append({
            "variant": v.name,
            "hub id": v.hub_id or BUNDLED,
            "class": a.architecture,
            "parameters": human_count(v.published_parameters) if v.published_parameters else "-",
            "text params": human_count(text),
            "layers": str(a.num_layers),
            "features": ", ".join(a.features()) or "dense",
            "towers": ", ".join(a.towers) or "-",
            "local": ("yes" if weights_present(v) else "no") if check_local else "?",
        })
    return out


_NUMERIC = {"parameters", "text params", "layers", "params"}


def _cols(keys: Sequence[str], headers: dict[str, str] | None = None) -> list[Col]:
    headers = headers or {}
    return [Col(headers.get(k, k), right=headers.get(k, k) in _NUMERIC) for k in keys]


def variants_table(check_local: bool = True, width: int | None = None) -> Table | None:
    """The variant table for a terminal `width` columns wide: every column when it fits; narrower, without the
    model class, then without the text parameters; at 80 columns, variant, hub id, parameters, layers, local, and
    the features and towers in one last column, wrapped at spaces. None below about 75 columns (use
    variants_lines). No width: every column."""
    facts = _variant_facts(check_local)
    title = "Gemma 4 variants"
    full = ["variant", "hub id", "class", "parameters", "text params", "layers", "features", "towers", "local"]
    layouts = [Layout(_cols(keys), [[f[k] for k in keys] for f in facts], title)
               for keys in (full, [k for k in full if k != "class"])]
    short = {"parameters": "params"}
    keys = ["variant", "hub id", "parameters", "layers", "features", "towers", "local"]
    layouts.append(Layout(_cols(keys, short), [[f[k] for k in keys] for f in facts], title))
    keys = ["variant", "hub id", "parameters", "layers", "local"]
    cols = _cols(keys, short) + [Col("features; towers", wrap="words")]
    rows = [[f[k] for k in keys] + [f["features"] + ("" if f["towers"] == "-" else f"; {f['towers']}")] for f in facts]
    layouts.append(Layout(cols, rows, title))
    return fit_table(layouts, width)


def variants_lines(check_local: bool = True) -> list[str]:
    """The variants for a pipe: a header, then one line per variant with every column (the class last, since it
    is the longest)."""
    facts = _variant_facts(check_local)
    keys = ["variant", "hub id", "parameters", "text params", "layers", "local", "features", "towers", "class"]
    return plain_lines(_cols(keys), [[f[k] for k in keys] for f in facts])


# ---- plan --------------------------------------------------------------------------------------------------------


def _plan_rows(plan: Plan, all_rows: bool, prefix: str) -> tuple[list[dict], dict[str, str]]:
    """One dict per row (one per tower unless all_rows), names without `prefix`, and each rule's reason."""
    towers: dict[str, list] = defaultdict(list)
    reasons: dict[str, str] = {}
    rows: list[dict] = []
    for e in plan.entries:
        reasons.setdefault(e.rule, e.reason)
        tower = next((p for p in TOWER_PREFIXES if e.name.startswith(p)), None)
        if tower and not all_rows:
            towers[tower].append(e)
            continue
        name = e.name[len(prefix):] if prefix and e.name.startswith(prefix) else e.name
        fit = (plan.qat or {}).get("tensors", {}).get(e.name)
        rows.append({"name": name, "shape": "x".join(map(str, e.shape)), "role": e.role, "type": e.type,
                     "bytes": e.bytes, "rule": e.rule,
                     "lattice": "-" if fit is None else f"{100 * fit['share']:.1f}%",
                     "lattice detail": "-" if fit is None else (
                         f"{100 * fit['share']:.2f}% of {fit['groups']} groups, worst {fit['worst']:.3f} step, "
                         f"Q4_0 rule {100 * fit['q4_0_rule'] / max(1, fit['groups']):.1f}%"
                         + ("" if fit["rows_read"] == fit["rows"] else f", first {fit['rows_read']} rows"))})
    for tower, entries in towers.items():
        n = sum(r.numel for r in entries)
        rows.append({"name": f"{tower}* ({len(entries)} tensors)", "shape": f"{human_count(n)} params",
                     "role": "tower", "type": "DROP", "bytes": 0, "rule": entries[0].rule, "lattice": "-",
                     "lattice detail": "-"})
    return rows, reasons


def _plan_title(plan: Plan) -> str:
    return f"{plan.variant}: {plan.target} {plan.preset}" + (f", PLE table {plan.ple_type}" if plan.ple_type else "")


def plan_table(plan: Plan, all_rows: bool = False, width: int | None = None) -> Table | None:
    """One row per tensor (one per tower unless all_rows); the rule column names the rule, and the caption spells
    each rule's reason out once. For a terminal `width` columns wide the table drops, in turn, the role column,
    the exact byte counts (for 1.16 GB style sizes), the shape column, and the trailing '.weight' of the names;
    names are never cut, and only a name still too long for the narrowest layout (a tower tensor's, with all_rows)
    is folded onto a second line. None when even that does not fit (use plan_lines). No width: every column."""
    prefix = _common_text_prefix(plan)
    rows, reasons = _plan_rows(plan, all_rows, prefix)
    caption = "\n".join(f"{rule}: {why}" for rule, why in reasons.items())

    def layout(keys: list[str], human: bool, short_names: bool = False) -> Layout:
        cols = [Col("reason (rule)" if k == "rule" and "role" in keys else k, right=k == "bytes",
                    wrap="fold" if short_names and k == "name" else None) for k in keys]
        out = []
        for r in rows:
            cells = dict(r, bytes=human_bytes(r["bytes"]) if human else f"{r['bytes']:,}")
            if short_names and cells["name"].endswith(".weight"):
                cells["name"] = cells["name"][:-len(".weight")]
            out.append([cells[k] for k in keys])
        note = f"names under {prefix}" if prefix else "names"
        note += " without '.weight'" if short_names else ""
        return Layout(cols, out, _plan_title(plan) + (f"  ({note})" if prefix or short_names else ""))

    full = ["name", "shape", "role", "type", "bytes", "rule"] + (["lattice"] if plan.qat and plan.qat.get("tensors")
                                                                  else [])
    no_role = [k for k in full if k != "role"]
    no_shape = [k for k in no_role if k != "shape"]
    layouts = [layout(full, False), layout(no_role, False), layout(no_role, True), layout(no_shape, True),
               layout(no_shape, True, short_names=True)]
    return fit_table(layouts, width, caption)


def plan_lines(plan: Plan, all_rows: bool = False) -> list[str]:
    """The plan for a pipe: the title, a header, one line per tensor (full name, shape, type, bytes, rule; one line
    per tower unless all_rows), then each rule's reason, one per line."""
    rows, reasons = _plan_rows(plan, all_rows, "")
    keys = ["name", "shape", "type", "bytes", "rule"] + (["lattice detail"] if plan.qat and plan.qat.get("tensors")
                                                        else [])
    cols = [Col(k, right=k == "bytes") for k in keys]
    table = plain_lines(cols, [[r[k] if k != "bytes" else f"{r['bytes']:,}" for k in keys] for r in rows])
    return [_plan_title(plan), *table, "", *(f"{rule}: {why}" for rule, why in reasons.items())]


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
        f"{plan.bits_per_weight:.2f} bits per weight; tensors by type: {counts}" + _lattice_summary(plan)
    )


def _lattice_summary(plan: Plan) -> str:
    """One sentence on the QAT lattice detection, when the plan measured it."""
    fits = (plan.qat or {}).get("tensors") or {}
    if not fits:
        return ""
    on = [e for e in plan.entries if e.method == "lattice"]
    s = f"; QAT lattice ({plan.qat['mode']}): {len(on)} of {len(fits)} measured tensors written on it"
    if on:
        f = [fits[e.name] for e in on]
        groups = sum(x["groups"] for x in f)
        s += (f" ({100 * sum(x['on'] for x in f) / groups:.2f}% of their groups on it, worst value "
              f"{max(x['worst'] for x in f):.3f} of a step off; Q4_0's extremum/-8 rule recovers "
              f"{100 * sum(x['q4_0_rule'] for x in f) / groups:.1f}% of their steps)")
    return s
