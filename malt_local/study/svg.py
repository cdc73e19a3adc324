"""The figures of `malt study` as SVG text: grouped bars with error bars, and line charts.

Hand-written SVG rather than a plotting library: the core package has no plotting dependency,
and a figure built from strings is byte-for-byte the same for the same numbers, so a study's
report can be diffed and its figures checked in. Nothing here runs in the reader's browser
(no script, no external references), and every piece of text goes through `_text` or
`_attr`: labels come from users' configuration names and file paths, and a study's figure
must not become a way to put markup into someone's page. Text is also stripped of the
characters XML 1.0 cannot carry at all (most control characters), which escaping alone does
not fix, and cut to a length the layout can hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

# Okabe–Ito: distinguishable with the common colour-vision deficiencies, and in print.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")

WIDTH, HEIGHT = 720, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 44, 84
_FONT = "font-family='sans-serif'"
_LABEL_CHARS = 40


@dataclass(frozen=True)
class Bar:
    """One bar: its legend label, its height and, for an error bar, the interval around it."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None


def _clean(text: object, limit: int = _LABEL_CHARS) -> str:
    """`text` on one line, without XML-forbidden characters, at most `limit` characters."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch in "\t\n\r":
            out.append(" ")
        elif code >= 0x20 and not (0xD800 <= code <= 0xDFFF) and code not in (0xFFFE, 0xFFFF):
            out.append(ch)
    line = " ".join("".join(out).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _text(text: object, limit: int = _LABEL_CHARS) -> str:
    """Element content: cleaned and escaped (&, <, >)."""
    return escape(_clean(text, limit))


def _attr(text: object, limit: int = _LABEL_CHARS) -> str:
    """An attribute value, quotes included: cleaned and escaped (&, <, >, quotes)."""
    return quoteattr(_clean(text, limit))


def _num(x: float) -> str:
    """A coordinate with two decimals at most: fixed formatting, so output is reproducible."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k), and the decimals
    their labels need. Ticks are computed from integer multiples, so no float drift."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step / 10.0**-decimals - round(step / 10.0**-decimals)) > 1e-9:
        decimals += 1
    return [i * step for i in range(first, last + 1)], decimals


class _Frame:
    """The plot area and the mapping from data values to pixels, shared by both charts."""

    def __init__(self, y_lo: float, y_hi: float, y_decimals: int) -> None:
        self.x0, self.x1 = _LEFT, WIDTH - _RIGHT
        self.y0, self.y1 = _TOP, HEIGHT - _BOTTOM
        self.lo, self.hi = y_lo, y_hi if y_hi > y_lo else y_lo + 1.0
        self.decimals = y_decimals

    def y(self, v: float) -> float:
        v = min(max(v, self.lo), self.hi)
        return self.y1 - (v - self.lo) / (self.hi - self.lo) * (self.y1 - self.y0)


def _open(title: str) -> list[str]:
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label={_attr(title, 200)}>",
        f"<title>{_text(title, 200)}</title>",
        f"<rect x='0' y='0' width='{WIDTH}' height='{HEIGHT}' fill='#ffffff'/>",
        f"<text x='{WIDTH / 2:g}' y='24' text-anchor='middle' font-size='16' {_FONT}>"
        f"{_text(title, 90)}</text>",
    ]


def _y_axis(f: _Frame, ticks: Sequence[float], y_label: str) -> list[str]:
    out = [f"<g class='y-axis' font-size='11' {_FONT}>"]
    for t in ticks:
        if t < f.lo - 1e-9 or t > f.hi + 1e-9:
            continue
        y = _num(f.y(t))
        out.append(
            f"<line x1='{f.x0}' y1='{y}' x2='{f.x1}' y2='{y}' stroke='#e0e0e0' stroke-width='1'/>"
        )
        out.append(
            f"<text x='{f.x0 - 6}' y='{y}' dy='4' text-anchor='end'>{t:.{f.decimals}f}</text>"
        )
    out.append(f"<line x1='{f.x0}' y1='{f.y0}' x2='{f.x0}' y2='{f.y1}' stroke='#333333'/>")
    mid = _num((f.y0 + f.y1) / 2)
    out.append(
        f"<text x='16' y='{mid}' text-anchor='middle' font-size='12' "
        f"transform='rotate(-90 16 {mid})'>{_text(y_label, 60)}</text>"
    )
    out.append("</g>")
    return out


def _legend(labels: Sequence[str], y: float) -> list[str]:
    """Swatches and labels in rows, spaced by an estimate of each label's width (7 px a
    character at 12 px), wrapping at the right margin."""
    out = [f"<g class='legend' font-size='12' {_FONT}>"]
    x = float(_LEFT)
    for i, label in enumerate(labels):
        colour = PALETTE[i % len(PALETTE)]
        shown = _clean(label, 28)
        step = 16 + 7 * len(shown) + 18
        if x > _LEFT and x + step - 18 > WIDTH - _RIGHT:
            x, y = float(_LEFT), y + 16
        out.append(
            f"<rect x='{_num(x)}' y='{_num(y - 10)}' width='12' height='12' fill='{colour}'/>"
        )
        out.append(f"<text x='{_num(x + 16)}' y='{_num(y)}'>{escape(shown)}</text>")
        x += step
    out.append("</g>")
    return out


def _no_data(f: _Frame) -> str:
    return (
        f"<text x='{_num((f.x0 + f.x1) / 2)}' y='{_num((f.y0 + f.y1) / 2)}' "
        f"text-anchor='middle' font-size='14' fill='#666666' {_FONT}>no data</text>"
    )


def bar_chart(
    groups: Sequence[tuple[str, Sequence[Bar]]],
    *,
    title: str,
    y_label: str,
    y_max: float | None = None,
) -> str:
    """Grouped bars (e.g. groups SA … MA+MV, bars base / MALT), error bars where a bar has an
    interval, a y axis with ticks and a legend. A bar's colour follows its label, so "base" is
    the same colour in every group; a bar whose value is not finite is left out."""
    legend: list[str] = []
    values: list[float] = [0.0]
    for _, bars in groups:
        for b in bars:
            if b.label not in legend:
                legend.append(b.label)
            values += [v for v in (b.value, b.low, b.high) if _finite(v)]
    lo = min(values)
    hi = y_max if y_max is not None and y_max > lo else max(values)
    ticks, decimals = _ticks(lo, hi)
    f = _Frame(ticks[0], y_max if y_max is not None and y_max > lo else ticks[-1], decimals)
    out = _open(title) + _y_axis(f, ticks, y_label)
    zero = _num(f.y(0.0))
    if not any(bars for _, bars in groups):
        out.append(_no_data(f))
    slot = (f.x1 - f.x0) / max(len(groups), 1)
    out.append(f"<g class='bars' {_FONT}>")
    for gi, (name, bars) in enumerate(groups):
        left = f.x0 + gi * slot
        width = slot * 0.8 / max(len(bars), 1)
        for bi, b in enumerate(bars):
            if not _finite(b.value):
                continue
            x = left + slot * 0.1 + bi * width
            colour = PALETTE[legend.index(b.label) % len(PALETTE)]
            top, bottom = sorted((f.y(b.value), f.y(0.0)))
            out.append(
                f"<rect x='{_num(x + 1)}' y='{_num(top)}' width='{_num(max(width - 2, 1))}' "
                f"height='{_num(bottom - top)}' fill='{colour}'>"
                f"<title>{_text(f'{b.label}: {b.value:.1f}', 120)}</title></rect>"
            )
            mid = x + width / 2
            low = b.low if b.low is not None and math.isfinite(b.low) else b.value
            high = b.high if b.high is not None and math.isfinite(b.high) else b.value
            if _finite(b.low) or _finite(b.high):
                y_lo, y_hi = f.y(low), f.y(high)
                cap = min(width / 4, 6)
                m, a, c = _num(mid), _num(mid - cap), _num(mid + cap)
                out.append(
                    f"<g class='error-bar' stroke='#222222' stroke-width='1.5'>"
                    f"<line x1='{m}' y1='{_num(y_lo)}' x2='{m}' y2='{_num(y_hi)}'/>"
                    f"<line x1='{a}' y1='{_num(y_lo)}' x2='{c}' y2='{_num(y_lo)}'/>"
                    f"<line x1='{a}' y1='{_num(y_hi)}' x2='{c}' y2='{_num(y_hi)}'/></g>"
                )
            label_y = min(top, f.y(high)) - 4
            out.append(
                f"<text x='{_num(mid)}' y='{_num(max(label_y, f.y0 - 2))}' text-anchor='middle' "
                f"font-size='10'>{b.value:.1f}</text>"
            )
        out.append(
            f"<text x='{_num(left + slot / 2)}' y='{f.y1 + 18}' text-anchor='middle' "
            f"font-size='12'>{_text(name, 24)}</text>"
        )
    out.append("</g>")
    out.append(f"<line x1='{f.x0}' y1='{zero}' x2='{f.x1}' y2='{zero}' stroke='#333333'/>")
    out += _legend(legend, HEIGHT - 30)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    hline: float | None = None,
    hline_label: str | None = None,
) -> str:
    """One line per series (e.g. loss by step per role and stage), and optionally a dashed
    reference line (`hline`, e.g. ln 2 ≈ 0.693, where DPO's loss starts) with its label
    (`hline_label`, else its value). Points that are not finite are left out."""
    points = [[(x, y) for x, y in pts if _finite(x) and _finite(y)] for _, pts in series]
    xs = [x for pts in points for x, _ in pts]
    ys = [y for pts in points for _, y in pts] + ([hline] if _finite(hline) else [])
    y_ticks, y_dec = _ticks(min(ys, default=0.0), max(ys, default=1.0))
    x_ticks, x_dec = _ticks(min(xs, default=0.0), max(xs, default=1.0))
    f = _Frame(y_ticks[0], y_ticks[-1], y_dec)
    x_lo, x_hi = x_ticks[0], x_ticks[-1]

    def px(x: float) -> float:
        return f.x0 + (x - x_lo) / (x_hi - x_lo) * (f.x1 - f.x0)

    out = _open(title) + _y_axis(f, y_ticks, y_label)
    out.append(f"<g class='x-axis' font-size='11' {_FONT}>")
    out.append(f"<line x1='{f.x0}' y1='{f.y1}' x2='{f.x1}' y2='{f.y1}' stroke='#333333'/>")
    for t in x_ticks:
        x = _num(px(t))
        out.append(f"<line x1='{x}' y1='{f.y1}' x2='{x}' y2='{f.y1 + 4}' stroke='#333333'/>")
        out.append(f"<text x='{x}' y='{f.y1 + 16}' text-anchor='middle'>{t:.{x_dec}f}</text>")
    out.append(
        f"<text x='{_num((f.x0 + f.x1) / 2)}' y='{f.y1 + 34}' text-anchor='middle' "
        f"font-size='12'>{_text(x_label, 60)}</text>"
    )
    out.append("</g>")
    if not xs:
        out.append(_no_data(f))
    if hline is not None and math.isfinite(hline):
        y = _num(f.y(hline))
        label = hline_label if hline_label is not None else f"{hline:.3g}"
        out.append(
            f"<g class='hline' {_FONT}>"
            f"<line x1='{f.x0}' y1='{y}' x2='{f.x1}' y2='{y}' stroke='#555555' "
            f"stroke-width='1' stroke-dasharray='6 4'/>"
            f"<text x='{f.x1 - 4}' y='{y}' dy='-4' text-anchor='end' font-size='11' "
            f"fill='#555555'>{_text(label, 50)}</text></g>"
        )
    out.append("<g class='series' fill='none' stroke-width='2'>")
    for i, pts in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        name = _text(series[i][0], 120)
        if len(pts) == 1:
            ((x, y),) = pts
            out.append(
                f"<circle cx='{_num(px(x))}' cy='{_num(f.y(y))}' r='3' fill='{colour}'>"
                f"<title>{name}</title></circle>"
            )
        elif pts:
            coords = " ".join(f"{_num(px(x))},{_num(f.y(y))}" for x, y in pts)
            out.append(
                f"<polyline points='{coords}' stroke='{colour}'><title>{name}</title></polyline>"
            )
    out.append("</g>")
    out += _legend([name for name, _ in series], HEIGHT - 30)
    out.append("</svg>")
    return "\n".join(out) + "\n"
