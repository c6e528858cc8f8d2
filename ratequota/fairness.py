"""The admission rule in pure Python: the reference the Lua scripts must agree with.

Per group, every tenant ``j`` with demand ``d_j`` (units held plus units its
waiting requests ask for) gets a fair limit ``L_j``:

* ``lo_j = max(G_j(1-ℓ_j), min(d_j, G_j))`` — what it keeps whatever others do;
* ``up_j = min(G_j + B_j, max(d_j, lo_j))`` — what it could use;
* one water level ``λ >= 0`` with ``Σ clamp(λ·w_j, lo_j, up_j) = min(C, Σ up_j)``;
* ``L_j = clamp(λ·w_j, lo_j, up_j)``.

This is the clamped-proportional fix-point of Kubernetes API Priority and
Fairness and of YARN's fair scheduler. Idle tenants (``d = 0``) have
``lo = up = G(1-ℓ)``: a constant, so callers pass only the *active* tenants
plus the idle tenants' summed reserve, and the cost grows with activity, not
with the number of registered tenants.

``solve`` finds ``λ`` exactly by walking the sorted breakpoints of the
piecewise-linear left-hand side; the Lua script (``lua/_fair.lua``) walks the
same breakpoints in the same way, so the two agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs

from ratequota.policy import GroupPolicy, TenantPolicy

__all__ = [
    "EPSILON",
    "Allocation",
    "Claim",
    "GroupDecision",
    "Share",
    "claim_for",
    "decide",
    "group_allocation",
    "solve",
]

#: Slack added to a limit before comparing integer units with it, in Lua and
#: here alike, so that a limit that is an integer up to rounding admits it.
EPSILON = 1e-9

Reason = Literal["admitted", "too_large", "tenant_limit", "group_full", "unknown_tenant"]


@attrs.frozen
class Claim:
    """One tenant's parameters and demand, as the rule sees them.

    ``ceiling`` is ``G + B`` (``inf`` when the borrow limit is unbounded).
    Numbers are floats so that properties such as homogeneity can scale them.
    """

    name: str
    guarantee: float
    demand: float
    lendable: float = 1.0
    ceiling: float = math.inf
    weight: float = 1.0

    @property
    def reserve(self) -> float:
        """The part of the guarantee never lent: ``G(1-ℓ)``."""
        return self.guarantee * (1.0 - self.lendable)

    @property
    def lo(self) -> float:
        """What the tenant keeps whatever the others do."""
        return max(self.reserve, min(self.demand, self.guarantee))

    @property
    def up(self) -> float:
        """What the tenant could use: its demand, capped by ``G + B``."""
        return min(self.ceiling, max(self.demand, self.lo))


@attrs.frozen
class Share:
    """The outcome for one tenant: its bounds and its fair limit."""

    name: str
    lo: float
    up: float
    limit: float
    weight: float

    @property
    def bound(self) -> Literal["lo", "up", "share"]:
        """Which term decided the limit: the floor, the ceiling, or the shared water level."""
        if self.limit <= self.lo + EPSILON:
            return "lo"
        if self.limit >= self.up - EPSILON:
            return "up"
        return "share"


@attrs.frozen
class Allocation:
    """Fair limits of every tenant passed to ``solve``, and the water level found."""

    capacity: float
    level: float
    shares: Mapping[str, Share]
    idle_reserve: float

    def limit(self, name: str) -> float:
        """The fair limit of ``name``."""
        return self.shares[name].limit

    @property
    def total(self) -> float:
        """Sum of all limits, idle tenants' reserve included (never above the capacity)."""
        return math.fsum(s.limit for s in self.shares.values()) + self.idle_reserve


def solve(capacity: float, claims: Sequence[Claim], idle_reserve: float = 0.0) -> Allocation:
    """Fair limits for ``claims``, with idle tenants summed up in ``idle_reserve``.

    Assumes the policy's guarantees sum to at most ``capacity``, which
    ``GroupPolicy`` enforces; then ``Σ lo <= target`` and a level always exists.
    """
    los = [c.lo for c in claims]
    ups = [c.up for c in claims]
    sum_lo = math.fsum(los)
    sum_up = math.fsum(ups)
    target = min(capacity, sum_up + idle_reserve) - idle_reserve
    level = _water_level(
        target,
        sum_lo,
        sum_up,
        [(lo, up, c.weight) for c, lo, up in zip(claims, los, ups, strict=True)],
    )
    shares = {
        c.name: Share(c.name, lo, up, min(max(level * c.weight, lo), up), c.weight)
        for c, lo, up in zip(claims, los, ups, strict=True)
    }
    return Allocation(capacity=capacity, level=level, shares=shares, idle_reserve=idle_reserve)


def _water_level(
    target: float, sum_lo: float, sum_up: float, bounds: Sequence[tuple[float, float, float]]
) -> float:
    """Smallest ``λ`` with ``Σ clamp(λw, lo, up) = target``, found on the breakpoints."""
    if target <= sum_lo:
        return 0.0
    events: list[tuple[float, float]] = []
    for lo, up, weight in bounds:
        if up > lo:
            events.append((lo / weight, weight))
            events.append((up / weight, -weight))
    if not events:
        return 0.0
    if target >= sum_up:
        return max(x for x, _ in events)
    events.sort(key=lambda e: e[0])
    value, slope, previous = sum_lo, 0.0, 0.0
    for x, delta in events:
        reached = value + slope * (x - previous)
        if reached >= target and slope > 0:
            return previous + (target - value) / slope
        value, previous, slope = reached, x, slope + delta
    return previous


def claim_for(tenant: TenantPolicy, demand: float) -> Claim:
    """The ``Claim`` of a tenant policy at a given demand."""
    return Claim(
        name=tenant.name,
        guarantee=float(tenant.guarantee),
        demand=float(demand),
        lendable=float(tenant.lendable),
        ceiling=tenant.ceiling,
        weight=float(tenant.weight),
    )


def group_allocation(
    group: GroupPolicy, demand: Mapping[str, float], extra: Iterable[str] = ()
) -> Allocation:
    """Fair limits of a group's active tenants given each tenant's demand.

    Tenants with zero demand are summed into the idle reserve unless named in
    ``extra`` (used to report a limit for a tenant that is not asking).
    Unknown tenants take the group's default policy; refused ones are skipped.
    """
    wanted = [name for name, d in demand.items() if d > 0]
    wanted += [name for name in extra if name not in demand or demand[name] <= 0]
    claims: list[Claim] = []
    active_reserve = 0.0
    for name in dict.fromkeys(wanted):
        policy = group.tenant(name)
        if policy is None:
            continue
        claims.append(claim_for(policy, demand.get(name, 0.0)))
        active_reserve += policy.reserve
    idle = max(0.0, group.reserve - active_reserve)
    return solve(float(group.capacity), claims, idle)


@attrs.frozen
class GroupDecision:
    """What the rule decides for one request on one group state."""

    admitted: bool
    reason: Reason
    tenant_used: int
    limit: float
    group_used: int
    capacity: int


def decide(
    group: GroupPolicy,
    used: Mapping[str, int],
    pending: Mapping[str, int],
    tenant: str,
    units: int,
    *,
    already_pending: bool = False,
    reserve: int = 0,
) -> GroupDecision:
    """Admit or refuse ``units`` for ``tenant`` (§3), exactly as the acquire script does.

    ``already_pending`` says the request's own units are already counted in
    ``pending`` (a retry of a registered waiting request), so they are not
    added twice to its demand. ``reserve`` is the units of the tenant's
    oldest waiting request when that is another request: waiting requests of
    a tenant are served in arrival order, so this one must leave room for it
    in the tenant's limit and in the group.
    """
    group_used = sum(used.values())
    tenant_used = used.get(tenant, 0)
    policy = group.tenant(tenant)
    if policy is None:
        return GroupDecision(False, "unknown_tenant", tenant_used, 0.0, group_used, group.capacity)
    largest = min(group.capacity, policy.ceiling)
    if policy.max_units is not None:
        largest = min(largest, policy.max_units)
    demand: dict[str, float] = {}
    for name in set(used) | set(pending):
        demand[name] = float(used.get(name, 0) + pending.get(name, 0))
    if not already_pending:
        demand[tenant] = demand.get(tenant, 0.0) + units
    limit = group_allocation(group, demand, extra=[tenant]).limit(tenant)
    if units > largest:
        reason: Reason = "too_large"
    elif tenant_used + units + reserve > limit + EPSILON:
        reason = "tenant_limit"
    elif group_used + units + reserve > group.capacity:
        reason = "group_full"
    else:
        reason = "admitted"
    return GroupDecision(
        reason == "admitted", reason, tenant_used, limit, group_used, group.capacity
    )
