"""What a simulation run records, and units held over time as step functions.

The pods' threads record three things (``Interval``, ``Outcome``,
``Sample``); ``ratequota.sim.stats`` turns them into the report. The
functions here are the plain statistics it needs: a step function of units
held, its level, integral and binned average, peaks, percentiles, Jain's
index, and how long a level took to reach a target. Times are seconds since
the start of the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

__all__ = [
    "Interval",
    "Outcome",
    "Sample",
    "Steps",
    "binned_average",
    "integral",
    "jain_index",
    "level_at",
    "peak",
    "percentile",
    "reclaim_time",
    "step_function",
]


@attrs.frozen
class Interval:
    """Units a tenant held from ``start`` to ``end`` (one lease, client-side view)."""

    tenant: str
    group: str
    units: int
    start: float
    end: float


@attrs.frozen
class Outcome:
    """One request's fate: admitted after ``wait`` seconds, or refused after waiting."""

    tenant: str
    at: float
    wait: float
    admitted: bool


@attrs.frozen
class Sample:
    """One group snapshot: Redis's view of who holds what at ``at``."""

    group: str
    at: float
    capacity: int
    used: int
    tenant_used: Mapping[str, int]
    tenant_limit: Mapping[str, float]
    lease_units: int


Steps = list[tuple[float, int]]


def step_function(intervals: Iterable[Interval]) -> Steps:
    """Units held over time as ``(time, level)`` steps, level holding until the next time.

    Starts at ``(0.0, 0)``. At equal times releases apply before acquisitions,
    matching Redis, where a release must precede the acquire that reuses its
    units.
    """
    events: list[tuple[float, int]] = []
    for iv in intervals:
        events.append((iv.start, iv.units))
        events.append((iv.end, -iv.units))
    events.sort(key=lambda e: (e[0], e[1]))
    steps: Steps = [(0.0, 0)]
    level = 0
    for at, delta in events:
        level += delta
        if steps[-1][0] == at:
            steps[-1] = (at, level)
        else:
            steps.append((at, level))
    return steps


def level_at(steps: Steps, at: float) -> int:
    """The level of a step function at time ``at``."""
    level = 0
    for time, value in steps:
        if time > at:
            break
        level = value
    return level


def integral(steps: Steps, until: float, *, above: float = 0.0) -> float:
    """``∫ max(0, level - above) dt`` from 0 to ``until``: unit-seconds held (above a line)."""
    total = 0.0
    for (t0, level), (t1, _) in zip(steps, [*steps[1:], (until, 0)], strict=False):
        lo, hi = min(t0, until), min(t1, until)
        if hi > lo:
            total += max(0.0, level - above) * (hi - lo)
    return total


def binned_average(steps: Steps, until: float, width: float) -> tuple[list[float], list[float]]:
    """Mean level over consecutive bins of ``width`` seconds: (bin centres, means).

    What the picture draws: a lease that is released and at once re-acquired
    leaves a zero-width dip in the raw steps, which averaging hides.
    """
    count = max(1, math.ceil(until / width))
    centres: list[float] = []
    means: list[float] = []
    for k in range(count):
        lo, hi = k * width, min(until, (k + 1) * width)
        held = integral(steps, hi) - integral(steps, lo)
        centres.append((lo + hi) / 2)
        means.append(held / (hi - lo) if hi > lo else 0.0)
    return centres, means


def peak(steps: Steps) -> int:
    """Highest level reached."""
    return max((level for _, level in steps), default=0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index ``(Σx)² / (n·Σx²)``: 1 when all equal, 1/n when one takes all.

    NaN for no values; 1 when every value is zero (nobody was favoured).
    """
    if not values:
        return math.nan
    square_sum = math.fsum(x * x for x in values)
    if square_sum == 0:
        return 1.0
    return math.fsum(values) ** 2 / (len(values) * square_sum)


def reclaim_time(steps: Steps, since: float, target: int) -> float | None:
    """Seconds after ``since`` until the level first reaches ``target`` (None: never)."""
    if target <= 0:
        return 0.0
    level = level_at(steps, since)
    if level >= target:
        return 0.0
    for at, value in steps:
        if at > since and value >= target:
            return at - since
    return None
