"""Charts as inline SVG, drawn on the server: no JavaScript library, nothing to fetch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

GRANTED = "#2f7d4a"
REFUSED = "#c0392b"
EMPTY = "#d9dde3"
UNITS = "#1f5fa8"
DEVICES = "#7a4fa8"


@dataclass(frozen=True)
class Slice:
    label: str
    value: int
    color: str


def donut(slices: list[Slice], title: str, size: int = 140) -> Markup:
    """A donut chart with a legend; an empty ring when every value is 0."""
    total = sum(s.value for s in slices)
    r, stroke = size / 2 - 12, 18
    c = size / 2
    parts = [f'<svg class="donut" role="img" viewBox="0 0 {size} {size}" width="{size}" height="{size}">',
             f"<title>{escape(title)}: " + ", ".join(f"{escape(s.label)} {s.value:,}" for s in slices) + "</title>",
             f'<circle cx="{c}" cy="{c}" r="{r}" fill="none" stroke="{EMPTY}" stroke-width="{stroke}"/>']
    if total:
        circumference = 2 * math.pi * r
        offset = 0.0
        for s in slices:
            if not s.value:
                continue
            length = circumference * s.value / total
            parts.append(
                f'<circle cx="{c}" cy="{c}" r="{r}" fill="none" stroke="{s.color}" stroke-width="{stroke}" '
                f'stroke-dasharray="{length:.2f} {circumference - length:.2f}" stroke-dashoffset="{-offset:.2f}" '
                f'transform="rotate(-90 {c} {c})"/>')
            offset += length
    parts.append(f'<text x="{c}" y="{c + 5}" text-anchor="middle" class="donut-total">{total:,}</text></svg>')
    return Markup("".join(parts))


@dataclass(frozen=True)
class Line:
    name: str
    color: str
    values: list[int]


def nice_ticks(value: int, most: int = 5) -> list[int]:
    """Round y ticks from 0 to at least value: steps of 1, 2 or 5 x 10^n, at most `most` + 1 ticks."""
    value = max(1, value)
    magnitude = 1
    while True:
        for base in (1, 2, 5):
            step = base * magnitude
            if -(-value // step) <= most:
                top = -(-value // step) * step
                return list(range(0, top + 1, step))
        magnitude *= 10


def trend(labels: list[str], lines: list[Line], title: str, width: int = 720, height: int = 200,
          limit: int | None = None, limit_label: str = "limit") -> Markup:
    """Lines over buckets with round gridlines and values on the y axis, and a dashed line at the limit when
    given; hovering a point shows its values."""
    if not labels:
        return Markup('<p class="muted">No data in this period.</p>')
    ticks = nice_ticks(max(1, limit or 0, *(v for line in lines for v in line.values)))
    top = ticks[-1]
    pad_l, pad_b, pad_t = 56, 20, 10
    inner_w, inner_h = width - pad_l - 10, height - pad_b - pad_t
    step = inner_w / max(1, len(labels) - 1)

    def x(i: int) -> float:
        return pad_l + i * step

    def y(v: int) -> float:
        return pad_t + inner_h - inner_h * v / top

    grid = []
    for v in ticks:
        grid.append(f'<line x1="{pad_l}" y1="{y(v):.1f}" x2="{width - 10}" y2="{y(v):.1f}" class="gridline"/>'
                    f'<text x="{pad_l - 6}" y="{y(v) + 3:.1f}" class="axis" text-anchor="end">{v:,}</text>')
    if limit is not None:
        grid.append(f'<line x1="{pad_l}" y1="{y(limit):.1f}" x2="{width - 10}" y2="{y(limit):.1f}" class="limit">'
                    f"<title>{escape(limit_label)}: {limit:,}</title></line>"
                    f'<text x="{width - 12}" y="{y(limit) - 3:.1f}" class="axis limit-label" text-anchor="end">'
                    f"{escape(limit_label)} {limit:,}</text>")
    drawn = []
    for line in lines:
        coords = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(line.values))
        drawn.append(f'<polyline fill="none" stroke="{line.color}" stroke-width="2" points="{coords}">'
                     f"<title>{escape(line.name)}</title></polyline>")
    # One invisible hover target per bucket, naming every line's value there.
    targets = "".join(
        f'<rect x="{x(i) - step / 2:.1f}" y="{pad_t}" width="{max(step, 1):.1f}" height="{inner_h}" class="hover">'
        f"<title>{escape(label)}: " + ", ".join(f"{escape(line.name)} {line.values[i]:,}" for line in lines)
        + "</title></rect>"
        for i, label in enumerate(labels))
    label_every = max(1, len(labels) // 6)
    ticks_x = "".join(
        f'<text x="{x(i):.1f}" y="{height - 4}" class="axis" text-anchor="middle">{escape(label)}</text>'
        for i, label in enumerate(labels) if i % label_every == 0)
    return Markup(
        f'<svg class="trend" role="img" viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="none">'
        f"<title>{escape(title)}</title>{''.join(grid)}"
        f'<line x1="{pad_l}" y1="{pad_t + inner_h}" x2="{width - 10}" y2="{pad_t + inner_h}" stroke="#999"/>'
        f"{''.join(drawn)}{targets}{ticks_x}</svg>")
