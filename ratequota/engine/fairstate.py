"""A group's incremental fair state, recomputed from scratch: what ``lua/_state.lua`` keeps.

The scripts do not solve the fix-point of ``ratequota.fairness`` over every
active tenant on each call. They keep, in the group's ``demand`` hash (field
``g``) and ``fair`` zset, the quantities the rule needs, and update them by one
tenant's terms per change:

* exact sums over the active tenants of ``lo``, ``up`` and ``G(1-ℓ)``, and the
  units held by the group;
* the water level ``λ`` of the committed demand (``0`` when every tenant sits
  at its floor, ``inf`` when every ceiling fits), and at ``λ`` the split of
  ``Σ clamp(λw, lo, up)`` into ``base`` (floors of tenants below ``λ``,
  ceilings of tenants above it) and ``slope`` (weights of the tenants whose
  limit is ``λw``);
* the breakpoints ``lo/w`` and ``up/w`` of every active tenant with ``up > lo``.

Sums are exact: a value ``x`` counts as ``floor(x·2^52)`` units of ``2^-52``
(Lua holds them in two doubles, whole units and the rest, here they are plain
integers), so the state
never depends on the order of the updates that built it, and a long-running
group never drifts. This module is that state recomputed from the raw demand:
the oracle the tests compare the scripts' state with, and a reading aid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from ratequota.fairness import _water_level, claim_for
from ratequota.policy import GroupPolicy

__all__ = ["SCALE", "FairState", "breakpoints", "exact", "recompute", "side_of"]

#: Units of one exact sum per unit: 2^52.
SCALE = 2**52

#: The fair zset's sentinel, there while the group is in use (score -1, never walked).
ANCHOR = "~"

#: Beside the sentinels of the fair and exp zsets (same score): longer than Redis's
#: zset-max-listpack-value, so both zsets keep the skiplist encoding, where a ZADD or ZREM
#: does not rewrite the whole set (``lua/_codec.lua``, ``WIDE_MEMBER``).
WIDE_MEMBER = "w:kept in skiplist encoding on purpose: longer than zset-max-listpack-value"


def exact(x: float) -> int:
    """``x`` in units of ``2^-52``, rounded down: what one term adds to an exact sum."""
    return math.floor(x * SCALE)


def side_of(a: float, b: float, level: float, side: int = 0) -> int:
    """0 floor, 1 slope, 2 ceiling: where a tenant with breakpoints ``a <= b`` stands at
    ``level`` (approached from below for side -1, from above for +1); mirrors Lua."""
    if level < a or (level == a and side <= 0):
        return 0
    if level > b or (level == b and side >= 0):
        return 2
    return 1


@attrs.frozen
class FairState:
    """The ``g`` field of a group's demand hash, decoded (sums as exact integers)."""

    level: float
    base: int
    slope: int
    sum_lo: int
    sum_up: int
    reserve: int
    used: int

    @classmethod
    def decode(cls, text: str | bytes | None) -> FairState:
        """Read the packed field (``None``: the all-zero state a missing field stands for)."""
        if text is None:
            return cls(0.0, 0, 0, 0, 0, 0, 0)
        if isinstance(text, bytes):
            text = text.decode("ascii")
        f = [float(part) for part in text.split("|")]
        level = math.inf if f[0] < 0 else f[0]

        def pair(i: int) -> int:
            return int(f[i]) * 2**52 + int(f[i + 1])

        return cls(level, pair(1), pair(3), pair(5), pair(7), pair(9), int(f[11]))


def _bounds(
    group: GroupPolicy, demand: Mapping[str, int]
) -> list[tuple[str, float, float, float, float]]:
    """(name, lo, up, w, keep) of every active tenant the policy knows."""
    rows = []
    for name, d in sorted(demand.items()):
        policy = group.tenant(name)
        if d <= 0 or policy is None:
            continue
        claim = claim_for(policy, d)
        rows.append((name, claim.lo, claim.up, claim.weight, claim.reserve))
    return rows


def _fmt(x: float) -> str:
    return f"{x:.17g}"


def breakpoints(group: GroupPolicy, demand: Mapping[str, int]) -> dict[str, float]:
    """The fair zset's members and scores for ``demand`` (without the anchor)."""
    points: dict[str, float] = {}
    for name, lo, up, w, _ in _bounds(group, demand):
        if up > lo:
            tail = f"{_fmt(lo)}|{_fmt(up)}|{_fmt(w)}|{name}"
            points[f"l|{tail}"] = lo / w
            points[f"u|{tail}"] = up / w
    return points


def recompute(
    group: GroupPolicy,
    used: Mapping[str, int],
    pending: Mapping[str, int],
    level: float | None = None,
) -> FairState:
    """The state for this demand from scratch; at ``level`` when given (to check the split of a
    stored state at its own level), else at the rule's level."""
    demand = {n: used.get(n, 0) + pending.get(n, 0) for n in {*used, *pending}}
    rows = _bounds(group, demand)
    sum_lo = sum(exact(lo) for _, lo, _, _, _ in rows)
    sum_up = sum(exact(up) for _, _, up, _, _ in rows)
    reserve = sum(exact(keep) for *_, keep in rows)
    if level is None:
        lo_f, up_f = sum_lo / SCALE, sum_up / SCALE
        idle = max(0.0, group.reserve - reserve / SCALE)
        target = min(float(group.capacity), up_f + idle) - idle
        if target <= lo_f:
            level = 0.0
        elif target >= up_f:
            level = math.inf
        else:
            level = _water_level(target, lo_f, up_f, [(lo, up, w) for _, lo, up, w, _ in rows])
    base = slope = 0
    for _, lo, up, w, _ in rows:
        where = side_of(lo / w, up / w, level) if up > lo else 0
        if where == 0:
            base += exact(lo)
        elif where == 1:
            slope += exact(w)
        else:
            base += exact(up)
    return FairState(level, base, slope, sum_lo, sum_up, reserve, sum(used.values()))
