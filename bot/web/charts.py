"""Server-side SVG charts: markup the page embeds as is, so the console needs no JavaScript at all."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 40
COLORS = ["#2f7d32", "#c77700", "#6a4fb3", "#c62828", "#78909c", "#1565c0"]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def _frame(title: str, y_max: float, labels: Sequence[str], names: Sequence[str], kind: str) -> list[str]:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [
        f'<svg class="chart" data-kind="{kind}" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>',
    ]
    for i in range(5):  # horizontal grid with its values
        y = TOP + plot_h - plot_h * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(y_max * i / 4)}</text>')
    every = max(1, len(labels) // 8)  # at most ~8 x labels
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + plot_w * (i + 0.5) / max(1, len(labels))
            out.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" class="tick">'
                       f"{escape(label)}</text>")  # fmt: skip
    for i, name in enumerate(names):  # legend
        x = LEFT + i * 120
        out.append(f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{x + 14}" y="{HEIGHT - 5}" class="tick">{escape(name)}</text>')
    return out


def empty(title: str) -> str:
    return (f'<svg class="chart" data-kind="empty" viewBox="0 0 {WIDTH} 60" width="100%" '
            f'xmlns="http://www.w3.org/2000/svg"><text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>'
            f'<text x="{LEFT}" y="44" class="tick">no data in this period</text></svg>')  # fmt: skip


def stacked_bars(title: str, labels: Sequence[str], series: dict[str, Sequence[float]]) -> str:
    """One bar per label, its parts stacked in the order of ``series``."""
    if not labels:
        return empty(title)
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    y_max = _nice_max(max(totals))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(labels)
    out = _frame(title, y_max, labels, list(series), "bars")
    for i, label in enumerate(labels):
        base = 0.0
        for j, (name, values) in enumerate(series.items()):
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / y_max
            y = TOP + plot_h - plot_h * base / y_max - h
            out.append(
                f'<rect class="bar" x="{LEFT + i * slot + slot * 0.15:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
                f'height="{h:.1f}" fill="{COLORS[j % len(COLORS)]}"><title>{escape(label)} {escape(name)}: '
                f"{_fmt(value)}</title></rect>"
            )
            base += value
    out.append("</svg>")
    return "".join(out)


def lines(title: str, labels: Sequence[str], series: dict[str, Sequence[float | None]], *, y_max: float | None = None,
          connect: bool = False) -> str:
    """One polyline per series; a None value leaves a gap, or with ``connect`` is skipped (a validation loss
    measured every few steps)."""
    known = [v for values in series.values() for v in values if v is not None]
    if not labels or not known:
        return empty(title)
    top = y_max if y_max is not None else _nice_max(max(known))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = _frame(title, top, labels, list(series), "lines")
    for j, (name, values) in enumerate(series.items()):
        color = COLORS[j % len(COLORS)]
        points: list[str] = []
        segments: list[list[str]] = [points]
        for i, value in enumerate(values):
            if value is None:
                if not connect:
                    points = []
                    segments.append(points)
                continue
            x = LEFT + plot_w * (i + 0.5) / len(labels)
            y = TOP + plot_h - plot_h * min(value, top) / top
            points.append(f"{x:.1f},{y:.1f}")
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"><title>{escape(labels[i])} '
                       f"{escape(name)}: {value:.4g}</title></circle>")  # fmt: skip
        for segment in segments:
            if len(segment) > 1:
                out.append(f'<polyline class="line" fill="none" stroke="{color}" stroke-width="2" '
                           f'points="{" ".join(segment)}"/>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)
