"""Charts as inline SVG, drawn on the server: no JavaScript library, nothing to fetch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

GRANTED = "#2f7d4a"
REFUSED = "#c0392b"
EMPTY = "#d9dde3"


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


def trend(points: list[tuple[str, int, int]], width: int = 720, height: int = 180) -> Markup:
    """Granted and refused per bucket as two lines; points are (label, granted, refused)."""
    if not points:
        return Markup('<p class="muted">No data in this period.</p>')
    top = max(1, *(g for _, g, _ in points), *(r for _, _, r in points))
    pad_l, pad_b, pad_t = 40, 20, 10
    inner_w, inner_h = width - pad_l - 10, height - pad_b - pad_t
    step = inner_w / max(1, len(points) - 1)

    def line(index: int, color: str, name: str) -> str:
        coords = " ".join(
            f"{pad_l + i * step:.1f},{pad_t + inner_h - inner_h * p[index] / top:.1f}" for i, p in enumerate(points))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"><title>{name}</title></polyline>'

    label_every = max(1, len(points) // 6)
    labels = "".join(
        f'<text x="{pad_l + i * step:.1f}" y="{height - 4}" class="axis" text-anchor="middle">{escape(p[0])}</text>'
        for i, p in enumerate(points) if i % label_every == 0)
    return Markup(
        f'<svg class="trend" role="img" viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="none">'
        f"<title>Granted and refused handshakes per bucket</title>"
        f'<line x1="{pad_l}" y1="{pad_t + inner_h}" x2="{width - 10}" y2="{pad_t + inner_h}" stroke="#999"/>'
        f'<text x="4" y="{pad_t + 8}" class="axis">{top:,}</text><text x="4" y="{pad_t + inner_h}" class="axis">0</text>'
        f"{line(1, GRANTED, 'granted')}{line(2, REFUSED, 'refused')}{labels}</svg>")
