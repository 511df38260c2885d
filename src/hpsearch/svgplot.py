"""Small SVG charts for the report: lines/points and horizontal bars, as plain strings.

The report must open offline and stay one file, so plots are inline SVG written here rather than
images fetched from anywhere. `to_file` adds the XML namespace that a stand-alone .svg file needs
(inline SVG in HTML5 does without it, which keeps every URL out of report.html).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, RED, GREY, PURPLE = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#999999", "#CC79A7"

_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 34, 46
_LEGEND = 190  # width of the legend column


@dataclass(frozen=True)
class Series:
    points: Sequence[tuple[float, float]]
    color: str = BLUE
    label: str = ""  # shown in the legend when not empty
    line: bool = True
    marker: str | None = None  # "circle" | "cross"
    dashed: bool = False
    opacity: float = 1.0
    end_marker: str | None = None  # a marker on the last point only (where a pruned trial stopped)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [
            m * 10.0**k
            for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in mults
            if lo * (1 - 1e-9) <= m * 10.0**k <= hi * (1 + 1e-9)
        ]
        if len(ticks) >= 3:
            return ticks
    return [lo, hi]


class _Axes:
    def __init__(self, x: tuple[float, float], y: tuple[float, float], log_y: bool, w: int, h: int,
                 right: int) -> None:
        # A little room on both sides, so points at the ends are not drawn on the frame.
        xpad = 0.03 * (x[1] - x[0]) if x[1] > x[0] else 0.5
        self.x0, self.x1 = x[0] - xpad, x[1] + xpad
        lo, hi = y
        if log_y:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.04 * (hi - lo)
        self.y0, self.y1 = lo - pad, hi + pad
        self.log_y = log_y
        self.w, self.h, self.right = w, h, right

    def px(self, x: float) -> float:
        return _LEFT + (x - self.x0) / (self.x1 - self.x0) * (self.w - _LEFT - self.right)

    def py(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        return self.h - _BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (self.h - _TOP - _BOTTOM)


def _marker(kind: str, x: float, y: float, color: str, opacity: float) -> str:
    if kind == "cross":
        d = 4
        return (f'<path d="M{x - d:.1f},{y - d:.1f}L{x + d:.1f},{y + d:.1f}M{x - d:.1f},{y + d:.1f}'
                f'L{x + d:.1f},{y - d:.1f}" stroke="{color}" stroke-width="2" opacity="{opacity}"/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}" opacity="{opacity}"/>'


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    integer_x: bool = True,
    width: int = 860,
    height: int = 380,
) -> str:
    """Lines and/or points on shared axes. Non-finite values (and <= 0 on a log axis) are dropped."""

    def ok(p: tuple[float, float]) -> bool:
        return math.isfinite(p[0]) and math.isfinite(p[1]) and (p[1] > 0 or not log_y)

    clean = [[p for p in s.points if ok(p)] for s in series]
    xs = [p[0] for pts in clean for p in pts]
    ys = [p[1] for pts in clean for p in pts]
    out = [_open(width, height, title)]
    if not xs:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#555">no data</text></svg>')
        return "".join(out)
    legend = [s for s in series if s.label]
    right = _RIGHT + (_LEGEND if legend else 0)  # the legend sits right of the plot, never on the data
    ax = _Axes((min(xs), max(xs)), (min(ys), max(ys)), log_y, width, height, right)

    # Grid and tick labels.
    yt = log_ticks(min(ys), max(ys)) if log_y else linear_ticks(ax.y0, ax.y1)
    for t in yt:
        y = ax.py(t)
        if _TOP - 1 <= y <= height - _BOTTOM + 1:
            out.append(f'<line x1="{_LEFT}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    xt = linear_ticks(ax.x0, ax.x1, 8)
    if integer_x:
        xt = sorted({round(t) for t in xt if abs(t - round(t)) < 1e-9})
    for t in xt:
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height - _BOTTOM}" y2="{height - _BOTTOM + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{height - _BOTTOM + 17}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
    out.append(
        f'<rect x="{_LEFT}" y="{_TOP}" width="{width - _LEFT - right}" height="{height - _TOP - _BOTTOM}" '
        f'fill="none" stroke="#333"/>'
    )
    out.append(f'<text x="{(width - right + _LEFT) / 2:.0f}" y="{height - 8}" text-anchor="middle" font-size="12">'
               f'{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{(height - _BOTTOM + _TOP) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle" font-size="12">{escape(ylabel + (" (log scale)" if log_y else ""))}</text>')

    for s, pts in zip(series, clean):
        if not pts:
            continue
        coords = [(ax.px(x), ax.py(y)) for x, y in pts]
        if s.line and len(coords) > 1:
            d = "M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            dash = ' stroke-dasharray="5,3"' if s.dashed else ""
            out.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.6" '
                       f'opacity="{s.opacity}"{dash}/>')
        if s.marker:
            out.extend(_marker(s.marker, x, y, s.color, s.opacity) for x, y in coords)
        if s.end_marker:
            out.append(_marker(s.end_marker, *coords[-1], s.color, 1.0))

    for i, s in enumerate(legend):
        x, y = width - right + 12, _TOP + 14 + 17 * i
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        sample = (_marker(s.marker or s.end_marker or "circle", x + 10, y - 4, s.color, 1.0)
                  if not s.line else
                  f'<line x1="{x}" x2="{x + 20}" y1="{y - 4}" y2="{y - 4}" stroke="{s.color}" '
                  f'stroke-width="2"{dash}/>')
        out.append(sample)
        out.append(f'<text x="{x + 26}" y="{y}" font-size="11">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str,
              color: str = BLUE, width: int = 720) -> str:
    """Horizontal bars, one per label, largest first as given."""
    row = 24
    height = _TOP + _BOTTOM + row * max(len(labels), 1)
    left = 150
    out = [_open(width, height, title)]
    top = max(values, default=0.0) or 1.0
    span = width - left - _RIGHT - 50
    for i, (label, v) in enumerate(zip(labels, values)):
        y = _TOP + i * row
        w = max(v, 0.0) / top * span
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end" font-size="12">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" fill="{color}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 16}" font-size="11">{v:.3f}</text>')
    out.append(f'<text x="{(width + left) / 2:.0f}" y="{height - 12}" text-anchor="middle" font-size="12">'
               f'{escape(xlabel)}</text>')
    out.append("</svg>")
    return "".join(out)


def _open(width: int, height: int, title: str) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" font-family="sans-serif">'
        f'<title>{escape(title)}</title><rect width="{width}" height="{height}" fill="white"/>'
        f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
        f'{escape(title)}</text>'
    )


def to_file(svg: str) -> str:
    """A stand-alone .svg file needs the namespace that inline SVG does without."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + svg.replace(
        "<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1
    )
