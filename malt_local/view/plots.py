"""Chart geometry for `malt view`: numbers in, pixel coordinates out.

The pages draw charts as inline SVG from these records in a Jinja macro (`_charts.html`), so
no JavaScript and no plotting library ship with malt, the strict Content-Security-Policy holds,
and every label is escaped by the template like any other text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 14, 38
PALETTE = ("c0", "c1", "c2", "c3", "c4", "c5")  # CSS classes: the colours live in view.css


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str
    err_top: float | None = None  # y of the error bar's ends (value ± err), if any
    err_bottom: float | None = None
    label: str = ""  # the value written above the bar, when the bar is wide enough


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class Series:
    name: str
    cls: str
    points: list[tuple[float, float, str]]  # x, y, tooltip
    errors: list[tuple[float, float, float]] = field(default_factory=list)  # x, y_top, y_bottom


@dataclass(frozen=True)
class Chart:
    """One SVG chart: bars and/or line series, axes ticks, a legend."""

    title: str
    width: int
    height: int
    bars: list[Bar]
    series: list[Series]
    xticks: list[Tick]
    yticks: list[Tick]
    legend: list[tuple[str, str]]  # (class, label)
    plot: tuple[float, float, float, float]  # left, top, right, bottom of the plot area
    ylabel: str = ""


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def _yticks(ymax: float, top: float, bottom: float) -> list[Tick]:
    return [Tick(bottom - (bottom - top) * i / 4, _fmt(ymax * i / 4)) for i in range(5)]


def bar_chart(
    title: str,
    groups: list[tuple[str, list[tuple[str, float, float | None]]]],
    *,
    ymax: float | None = None,
    ylabel: str = "",
    unit: str = "",
) -> Chart:
    """Grouped bars: `groups` is [(group label, [(series label, value, error or None)])].

    Series keep their colour across groups by their label; errors are drawn as ± whiskers.
    """
    names: list[str] = []
    for _, items in groups:
        for name, _, _ in items:
            if name not in names:
                names.append(name)
    top_value = max([v + (e or 0) for _, items in groups for _, v, e in items] or [0.0])
    ymax = ymax if ymax is not None else _nice_max(top_value)
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    slot = (x1 - x0) / max(1, len(groups))
    bars: list[Bar] = []
    xticks: list[Tick] = []

    def y_of(v: float) -> float:
        return y1 - (y1 - y0) * max(0.0, min(v, ymax)) / ymax

    for gi, (glabel, items) in enumerate(groups):
        inner = slot * 0.8
        bw = inner / max(1, len(items))
        gx = x0 + gi * slot + slot * 0.1
        xticks.append(Tick(x0 + gi * slot + slot / 2, glabel))
        for bi, (name, value, err) in enumerate(items):
            cls = PALETTE[names.index(name) % len(PALETTE)]
            top = y_of(value)
            tip = f"{glabel} {name}: {value:.4g}{unit}" + (f" ± {err:.3g}" if err else "")
            bars.append(
                Bar(
                    gx + bi * bw + 1,
                    top,
                    max(1.0, bw - 2),
                    y1 - top,
                    cls,
                    tip.replace("  ", " ").strip(),
                    y_of(value + err) if err else None,
                    y_of(value - err) if err else None,
                    f"{value:.3g}" if bw >= 24 else "",
                )
            )
    legend = (
        [(PALETTE[i % len(PALETTE)], n) for i, n in enumerate(names)]
        if len(names) > 1 or (names and names[0])
        else []
    )
    return Chart(
        title, WIDTH, HEIGHT, bars, [], xticks, _yticks(ymax, y0, y1), legend, (x0, y0, x1, y1),
        ylabel,
    )  # fmt: skip


def line_chart(
    title: str,
    series: list[tuple[str, list[tuple[float, float, float | None]]]],
    *,
    xlabels: list[str] | None = None,
    ymax: float | None = None,
    ylabel: str = "",
) -> Chart:
    """Lines through (x, y) points, with optional ± errors; `xlabels` names x = 0, 1, 2..."""
    pts = [p for _, ps in series for p in ps]
    xs = [p[0] for p in pts] or [0.0, 1.0]
    xmin, xmax = min(xs), max(xs)
    if xlabels is not None:
        xmin, xmax = -0.3, len(xlabels) - 0.7
    if xmax == xmin:
        xmax = xmin + 1
    top_value = max([p[1] + (p[2] or 0) for p in pts] or [0.0])
    ymax = ymax if ymax is not None else _nice_max(top_value)
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM

    def x_of(x: float) -> float:
        return x0 + (x1 - x0) * (x - xmin) / (xmax - xmin)

    def y_of(v: float) -> float:
        return y1 - (y1 - y0) * max(0.0, min(v, ymax)) / ymax

    out = []
    for i, (name, ps) in enumerate(series):
        cls = PALETTE[i % len(PALETTE)]
        points = [
            (x_of(x), y_of(y), f"{name} {xlabels[int(x)] if xlabels else _fmt(x)}: {y:.4g}")
            for x, y, _ in ps
        ]
        errors = [(x_of(x), y_of(y + e), y_of(y - e)) for x, y, e in ps if e]
        out.append(Series(name, cls, points, errors))
    if xlabels is not None:
        xticks = [Tick(x_of(i), lab) for i, lab in enumerate(xlabels)]
    else:
        xticks = [Tick(x_of(xmin + (xmax - xmin) * i / 4), _fmt(xmin + (xmax - xmin) * i / 4))
                  for i in range(5)]  # fmt: skip
    legend = [(s.cls, s.name) for s in out]
    return Chart(
        title, WIDTH, HEIGHT, [], out, xticks, _yticks(ymax, y0, y1), legend, (x0, y0, x1, y1),
        ylabel,
    )  # fmt: skip
