"""The overview's plot of instances received and delivered per minute, as plain SVG.

Drawn on the server (no script, no front-end build): two step lines over the last hours,
a time axis with local clock times, a count axis with a rounded maximum.
"""

from __future__ import annotations

import time
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 900, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40
COLOURS = {"received": "#2f6fb0", "delivered": "#2e9a52"}


def _nice(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^n that is at least ``value``."""
    if value <= 1:
        return 1
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= value:
                return step * scale
        scale *= 10


def throughput_svg(
    series: dict[str, dict[int, int]], start: float, end: float, bucket: int = 60
) -> str:
    first = int(start // bucket) * bucket
    buckets = list(range(first, int(end) + 1, bucket))
    top = _nice(max([1, *(max(s.values(), default=0) for s in series.values())]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + plot_w * (t - first) / max(end - first, 1)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" '
        'aria-label="instances received and delivered per minute" font-family="sans-serif" '
        'font-size="11">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" '
        'stroke="#d0d7de"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        value = top * frac
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#e5e8eb"/>'
            f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>'
        )
    hours = max(1, round((end - first) / 3600))
    step = 3600 if hours <= 12 else 6 * 3600
    tick = (int(first // step) + 1) * step
    while tick <= end:
        label = time.strftime("%H:%M", time.localtime(tick))
        parts.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" '
            'stroke="#eef0f2"/>'
            f'<text x="{x(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
            f"{label}</text>"
        )
        tick += step
    legend_x = LEFT + 8
    for name, colour in COLOURS.items():
        values = series.get(name, {})
        points = " ".join(
            f"{x(b):.1f},{y(values.get(b, 0)):.1f} {x(b + bucket):.1f},{y(values.get(b, 0)):.1f}"
            for b in buckets
        )
        total = sum(values.values())
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{points}"/>'
            f'<rect x="{legend_x}" y="{HEIGHT - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{HEIGHT - 5}">{escape(name)} ({total} in '
            f"{hours} h)</text>"
        )
        legend_x += 220
    parts.append(
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 5}" text-anchor="end">instances per minute'
        "</text></svg>"
    )
    return "".join(parts)


__all__ = ["throughput_svg"]
