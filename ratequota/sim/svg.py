"""The simulation's picture as a standalone SVG file, drawn without any plotting library.

``ratequota simulate`` is the first command a new user runs; its picture
must appear on a fresh install. A PNG needs a rasteriser (matplotlib is an
optional extra, ~50 MB with numpy and pillow, that no pod needs); an SVG is
text any browser opens. This module draws exactly one kind of chart — panels
of step lines over time with horizontal reference lines — and nothing more.

Pure: ``render`` turns ``Panel`` values into SVG text; the caller averages
the samples and writes the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

import attrs

if TYPE_CHECKING:
    from ratequota.sim.fleet import RunResult
    from ratequota.sim.scenario import Scenario

__all__ = ["PALETTE", "Line", "Panel", "render", "timeline"]

#: Line colours, chosen to stay apart from each other and from the grey total.
PALETTE = (
    "#1f6fb4",
    "#e6780f",
    "#2a9d3a",
    "#c8322d",
    "#8a5cc2",
    "#8b5a4a",
    "#d65fb0",
    "#6f6f6f",
    "#a7a51d",
    "#1aa8bd",
)
#: Dash patterns of guarantee lines, so equal guarantees stay distinguishable.
DASHES = ("2,3", "6,3", "1,2", "8,2,2,2")

WIDTH = 900
PANEL_HEIGHT = 230
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 28, 34
TITLE = 30


@attrs.frozen
class Line:
    """One tenant: units held at ``times`` (same length as ``values``), its guarantee, and
    the units the rule owed it at the same times (``owed``; empty when not measured)."""

    name: str
    times: Sequence[float]
    values: Sequence[float]
    guarantee: float = 0.0
    owed: Sequence[float] = ()
    #: A second reference line (a token meter's ceil; 0: none), and the names of both.
    ceil: float = 0.0
    marks: tuple[str, str] = ("G", "ceil")


@attrs.frozen
class Panel:
    """One group: its title, capacity, the group total, and one line per tenant."""

    title: str
    capacity: float
    until: float
    total: Line
    lines: Sequence[Line]
    limit_name: str = "capacity"


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top``."""
    if top <= 0:
        return [0.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}"


def _panel(panel: Panel, y0: float) -> list[str]:
    """SVG elements of one panel whose frame starts at height ``y0``."""
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = PANEL_HEIGHT - TOP - BOTTOM
    top_value = max(panel.capacity * 1.25, 1.0)
    until = max(panel.until, 1e-9)

    def x(t: float) -> float:
        return LEFT + plot_w * min(max(t / until, 0.0), 1.0)

    def y(v: float) -> float:
        return y0 + TOP + plot_h * (1 - min(max(v / top_value, 0.0), 1.0))

    out = [
        f'<text x="{LEFT}" y="{y0 + 18}" class="title">{escape(panel.title)}</text>',
        f'<rect x="{LEFT}" y="{y0 + TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for tick in _ticks(top_value):
        out.append(
            f'<line x1="{LEFT - 4}" x2="{LEFT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'class="axis"/>'
            f'<text x="{LEFT - 7}" y="{y(tick) + 4:.1f}" class="ytick">{_label(tick)}</text>'
        )
    for tick in _ticks(until, 8):
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y0 + TOP + plot_h}" '
            f'y2="{y0 + TOP + plot_h + 4}" class="axis"/>'
            f'<text x="{x(tick):.1f}" y="{y0 + TOP + plot_h + 17}" class="xtick">'
            f"{_label(tick)}</text>"
        )
    total = panel.total
    if total.times:
        points = [(x(total.times[0]), y(0))]
        points += [(x(t), y(v)) for t, v in zip(total.times, total.values, strict=True)]
        points.append((x(total.times[-1]), y(0)))
        out.append(f'<polygon points="{_points(points)}" class="total"/>')
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(panel.capacity):.1f}" '
        f'y2="{y(panel.capacity):.1f}" class="capacity"/>'
        f'<text x="{LEFT + plot_w + 6}" y="{y(panel.capacity) + 4:.1f}" class="note">'
        f"{escape(panel.limit_name)} {_label(panel.capacity)}</text>"
    )
    # Guarantee labels sit at the right edge; equal guarantees are stacked, never overlaid.
    placed: dict[float, int] = {}
    for i, line in enumerate(panel.lines):
        colour = PALETTE[i % len(PALETTE)]
        if line.guarantee > 0:
            dash = DASHES[placed.get(line.guarantee, 0) % len(DASHES)]
            row = placed.get(line.guarantee, 0)
            placed[line.guarantee] = row + 1
            gy = y(line.guarantee)
            out.append(
                f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{gy:.1f}" y2="{gy:.1f}" '
                f'stroke="{colour}" stroke-dasharray="{dash}" class="guarantee"/>'
                f'<text x="{LEFT + plot_w + 6}" y="{gy + 4 + 12 * row:.1f}" fill="{colour}" '
                f'class="note">{escape(line.marks[0])} {_label(line.guarantee)}: '
                f"{escape(line.name)}</text>"
            )
        if line.ceil > 0:
            cy = y(line.ceil)
            out.append(
                f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{cy:.1f}" y2="{cy:.1f}" '
                f'stroke="{colour}" stroke-dasharray="8,3" class="guarantee"/>'
                f'<text x="{LEFT + plot_w + 6}" y="{cy - 4:.1f}" fill="{colour}" '
                f'class="note">{escape(line.marks[1])} {_label(line.ceil)}: '
                f"{escape(line.name)}</text>"
            )
        if line.owed:
            owed = [(x(t), y(v)) for t, v in zip(line.times, line.owed, strict=True)]
            out.append(
                f"<polyline points={quoteattr(_points(owed))} stroke={quoteattr(colour)} "
                f'class="owed"><title>{escape(line.name)} owed</title></polyline>'
            )
        points = [(x(t), y(v)) for t, v in zip(line.times, line.values, strict=True)]
        out.append(
            f"<polyline points={quoteattr(_points(points))} stroke={quoteattr(colour)} "
            f'class="tenant"><title>{escape(line.name)}</title></polyline>'
        )
    legend_x = LEFT + 8
    for i, line in enumerate(panel.lines):
        colour = PALETTE[i % len(PALETTE)]
        out.append(
            f'<rect x="{legend_x}" y="{y0 + TOP + 6}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{y0 + TOP + 15}" class="legend">'
            f"{escape(line.name)}</text>"
        )
        legend_x += 24 + 7 * len(line.name)
    return out


def _points(points: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{px:.1f},{py:.1f}" for px, py in points)


def render(panels: Sequence[Panel], title: str, footer: str = "") -> str:
    """The whole picture: a title, one panel per group, a footer naming the x axis."""
    height = TITLE + PANEL_HEIGHT * len(panels) + 24
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        "<style>"
        ".title{font-size:12px;font-weight:bold}.frame{fill:none;stroke:#444}"
        ".axis{stroke:#444}.ytick{text-anchor:end}.xtick{text-anchor:middle}"
        ".total{fill:#e0e0e0;stroke:none}.capacity{stroke:#000;stroke-dasharray:6,4}"
        ".guarantee{stroke-width:1}.tenant{fill:none;stroke-width:1.6}"
        ".owed{fill:none;stroke-width:1;stroke-dasharray:5,3}"
        ".legend{font-size:11px}.note{font-size:10px}"
        "</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" class="title">{escape(title)}</text>',
    ]
    for index, panel in enumerate(panels):
        body += _panel(panel, TITLE + index * PANEL_HEIGHT)
    if footer:
        body.append(
            f'<text x="{WIDTH / 2}" y="{height - 8}" text-anchor="middle">{escape(footer)}</text>'
        )
    body.append("</svg>")
    return "\n".join(body) + "\n"


def timeline(result: RunResult, scenario: Scenario) -> str:
    """The picture of a simulation run: units held against units owed per tenant over time.

    The same content as the matplotlib PNG: one panel per group; each tenant's
    units held (solid) and the units the reference rule owed it from the demand
    its clients really had (dashed, same colour), averaged over short bins; its
    guarantee as a line labelled at the right edge with the tenant's name (so
    equal guarantees stay apart); the group's total as a grey area and the
    capacity as a black dashed line.
    """
    from ratequota.sim.stats import binned_average, step_function

    until = min(result.report.duration, scenario.duration)
    width = max(0.1, until / 150)
    gaps = {t.tenant: t.gap for t in result.report.tenants if t.gap is not None}
    panels = []
    for group in scenario.policy.groups:
        loads = scenario.group_loads(group.name)
        if not loads:
            continue
        mine = [iv for iv in result.intervals if iv.group == group.name]
        times, total = binned_average(step_function(mine), until, width)
        lines = []
        for load in loads:
            policy = group.tenant(load.tenant)
            guarantee = float(policy.guarantee) if policy is not None else 0.0
            gap = gaps.get(load.tenant)
            if gap is not None and gap.times:
                line = Line(load.tenant, gap.times, gap.held, guarantee, gap.owed)
            else:
                steps = step_function(iv for iv in mine if iv.tenant == load.tenant)
                held_times, held = binned_average(steps, until, width)
                line = Line(load.tenant, held_times, held, guarantee)
            lines.append(line)
        panels.append(
            Panel(
                f"group {group.name}: capacity {group.capacity}; solid: units held, dashed: "
                "units owed by the rule, thin lines: guarantees",
                float(group.capacity),
                until,
                Line("group total", times, total),
                lines,
            )
        )
    panels += token_panels(result, scenario, until)
    return render(
        panels,
        f"ratequota simulate: {scenario.name}, {scenario.pods} pods",
        f"seconds (units averaged over {width:.2f} s bins)",
    )


def token_panels(result: RunResult, scenario: Scenario, until: float) -> list[Panel]:
    """One panel per group metering tokens: each tenant's tokens/s (used, spread over its
    batches) against its guaranteed rate (dotted) and its ceil (dashed); the group's
    total as the grey area, its rate as the black dashed line."""
    from ratequota.sim.tokens import token_series

    panels = []
    for group, width, total, lines in token_series(result.batches, scenario, until):
        panels.append(
            Panel(
                f"group {group.name}: tokens/s over {width:.2f} s bins; solid: used, "
                "dotted: guaranteed rate, dashed: ceil",
                lines[0].group_rate if lines else 0.0,
                until,
                Line("group total", total[0], total[1]),
                [
                    Line(t.tenant, t.times, t.rates, t.rate, ceil=t.ceil, marks=("rate", "ceil"))
                    for t in lines
                ],
                limit_name="group rate",
            )
        )
    return panels
