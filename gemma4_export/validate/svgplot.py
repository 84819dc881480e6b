"""A small, dependency-free SVG scatter plot: mean KLD (log scale) against artifact size, one series per target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

KLD_FLOOR = 1e-9  # a KLD of 0 (or below this) is drawn here, hollow, so the log scale stays finite
_SPARE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")

W, H = 800, 500
LEFT, RIGHT, TOP, BOTTOM = 80, 150, 50, 60  # margins: the plot area is what is left


@dataclass(frozen=True)
class Point:
    series: str  # the target
    label: str  # variant/preset
    size_mb: float
    kld: float


def color_of(series: str, order: list[str], colors: dict[str, str] | None = None) -> str:
    """The series' own color (each target declares one), else a spare one by its place in the legend."""
    if colors and series in colors:
        return colors[series]
    return _SPARE[order.index(series) % len(_SPARE)]


def nice_ticks(hi: float, n: int = 6) -> list[float]:
    """0 and round steps (1, 2, 5 x 10^k) up to at least hi."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(hi / step - 1e-9) + 1)]


def decades(values: list[float]) -> tuple[int, int]:
    """The whole decades that hold the values, with at least half a decade above the highest (room for labels)."""
    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)) + 0.5)
    return lo, hi


def _fmt_tick(x: float) -> str:
    return f"{x:g}"


def kld_vs_size_svg(points: list[Point], title: str = "Mean KLD against artifact size",
                    floor: float = KLD_FLOOR, colors: dict[str, str] | None = None) -> str:
    """The whole SVG document as text."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2:.0f}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    if not points:
        out.append(f'<text x="{W / 2:.0f}" y="{H / 2:.0f}" text-anchor="middle">no validated artifacts</text>')
        return "\n".join(out + ["</svg>"]) + "\n"

    xt = nice_ticks(max(p.size_mb for p in points) * 1.05)
    lo, hi = decades([max(p.kld, floor) for p in points])
    x_of = lambda mb: LEFT + pw * mb / xt[-1]  # noqa: E731
    y_of = lambda k: TOP + ph * (hi - math.log10(max(k, floor))) / (hi - lo)  # noqa: E731

    out.append(f'<g class="axes" stroke="#333" fill="none"><rect x="{LEFT}" y="{TOP}" width="{pw}" '
               f'height="{ph}"/></g>')
    out.append('<g class="x-axis" text-anchor="middle">')
    for t in xt:
        x = x_of(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{TOP + ph + 18}">{_fmt_tick(t)}</text>')
    out.append(f'<text x="{LEFT + pw / 2:.0f}" y="{H - 15}">artifact size (MB)</text></g>')
    out.append('<g class="y-axis" text-anchor="end">')
    for d in range(lo, hi + 1):
        y = y_of(10.0 ** d)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}">1e{d}</text>')
    out.append(f'<text transform="translate(20,{TOP + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
               'mean KLD (log scale)</text></g>')

    order = list(dict.fromkeys(p.series for p in points))
    placed: list[tuple[float, float, float, float]] = []
    for s in order:
        c = color_of(s, order, colors)
        out.append(f'<g class="series" data-target={quoteattr(s)} fill={quoteattr(c)}>')
        for p in (p for p in points if p.series == s):
            x, y = x_of(p.size_mb), y_of(p.kld)
            out.append(_point(p, x, y, c, p.kld <= floor, floor, _place(p.label, x, y, placed)))
        out.append("</g>")
    out.append(_legend(order, LEFT + pw + 20, TOP + 10, colors))
    if any(p.kld <= floor for p in points):
        out.append(f'<text class="note" x="{LEFT + pw + 14}" y="{TOP + 20 * len(order) + 20}" font-size="10">'
                   f'hollow: KLD &lt;= {floor:g}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# Where a point's label may go, tried in order: (dx, dy, anchor) from the point.
_LABEL_SPOTS = ((6, -5, "start"), (6, 13, "start"), (-6, -5, "end"), (-6, 13, "end"), (6, -16, "start"),
                (6, 24, "start"), (-6, -16, "end"), (-6, 24, "end"), (6, -27, "start"), (6, 35, "start"))


def _place(label: str, x: float, y: float, placed: list[tuple[float, float, float, float]]) -> tuple[float, float,
                                                                                                       str]:
    """The first spot whose box (about 5.5 px a character, 10 px high) stays inside the plot and overlaps no label
    placed before."""
    w = 5.5 * len(label)
    for dx, dy, anchor in _LABEL_SPOTS:
        x0 = x + dx if anchor == "start" else x + dx - w
        box = (x0, y + dy - 9, x0 + w, y + dy + 1)
        if x0 < LEFT or box[1] < TOP or box[3] > H - BOTTOM:
            continue
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            placed.append(box)
            return x + dx, y + dy, anchor
    return x + 6, y - 5, "start"


def _point(p: Point, x: float, y: float, color: str, clamped: bool, floor: float,
           spot: tuple[float, float, str]) -> str:
    shown = f"<= {floor:g} (drawn at the floor)" if clamped else f"{p.kld:.3e}"
    tip = escape(f"{p.series} {p.label}: {p.size_mb:.2f} MB, mean KLD {shown}")
    fill = ' fill="white"' if clamped else ""
    lx, ly, anchor = spot
    return (f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" stroke={quoteattr(color)}{fill}>'
            f'<title>{tip}</title></circle>'
            f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" font-size="10">'
            f'{escape(p.label)}</text>')


def _legend(order: list[str], x: float, y: float, colors: dict[str, str] | None) -> str:
    rows = [f'<g class="legend" transform="translate({x:.0f},{y:.0f})">']
    for i, s in enumerate(order):
        c = color_of(s, order, colors)
        rows.append(f'<circle cx="0" cy="{i * 20}" r="5" fill={quoteattr(c)}/>'
                    f'<text x="12" y="{i * 20 + 4}">{escape(s)}</text>')
    rows.append("</g>")
    return "".join(rows)
