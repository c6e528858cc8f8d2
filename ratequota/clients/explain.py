"""Why a tenant got its limit, and why a request was admitted or refused (pure, no I/O).

An explanation is built from one ``GroupSnapshot`` (a consistent read of the
group) and the group's ``GroupPolicy`` by running the reference rule of
``ratequota.fairness`` on the snapshot's state. It names the tenant's bounds
``lo``/``up``, which of them (or the shared water level) decided the limit,
how many units the tenant borrows above its guarantee, and from whom.

Whom a tenant borrows from is a matter of accounting, not of enforcement (a
unit is a unit): here borrowed units are attributed to the *sources* of spare
capacity in proportion to what each source offers. The sources are the
tenants with unused lendable guarantee (``G − lo``: the part of their
guarantee they neither use, wait for, nor keep back as ``G(1−ℓ)``) and the
unguaranteed part of the capacity (``C − ΣG``), reported as ``POOL``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import attrs

from ratequota.clients.core import QuotaCore
from ratequota.clients.requests import validate_tenant, validate_units
from ratequota.decision import GroupSnapshot
from ratequota.engine.ops import Flow
from ratequota.errors import InvalidRequest, PolicyMissing, UnknownTenant
from ratequota.fairness import (
    Claim,
    GroupDecision,
    Share,
    claim_for,
    decide,
    group_allocation,
    solve,
)
from ratequota.policy import GroupPolicy, TenantPolicy

__all__ = [
    "POOL",
    "Explanation",
    "Loan",
    "entitlement",
    "entitlements",
    "explain",
    "explain_flow",
    "lenders",
]

#: Name of the source "capacity no tenant is guaranteed" among a tenant's lenders.
POOL = "(unguaranteed capacity)"

Bound = Literal["lo", "up", "share"]


@attrs.frozen
class Loan:
    """Units a tenant borrows from one source, and what that source has to lend in all."""

    lender: str
    units: float
    available: float


@attrs.frozen
class Explanation:
    """The numbers behind a tenant's limit and, when a request is given, behind its verdict.

    ``limit``, ``lo``, ``up`` and ``bound`` come from the reference rule on the
    snapshot's state (with the request's units added to the tenant's demand).
    ``borrowed`` is what the tenant holds above its guarantee (after the
    request, when it would be admitted), split over ``loans``.
    ``ceiling`` is ``G + B`` (``inf`` without a borrow limit). ``engine_limit``
    is the limit the Lua engine reported in the snapshot (before the request),
    for comparison (``None`` when the snapshot did not list the tenant).
    ``recovering_until`` (Redis time, s) is set while the group recovers from
    lost Redis state: the engine then refuses every new request whatever the
    fair limits say, so ``admitted`` is False (docs/failure-modes.md).
    ``entitled`` is the most the tenant may hold now if it asks (see
    ``entitlement``): what ``describe()``, ``ratequota inspect`` and ``top``
    call its limit; never below its guarantee.
    """

    tenant: str
    group: str
    capacity: int
    group_used: int
    used: int
    pending: int
    demand: float
    guarantee: int
    ceiling: float
    weight: float
    limit: float
    lo: float
    up: float
    bound: Bound
    level: float
    borrowed: float
    loans: tuple[Loan, ...]
    units: int | None = None
    verdict: GroupDecision | None = None
    engine_limit: float | None = None
    recovering_until: float = 0.0
    entitled: float = 0.0

    @property
    def admitted(self) -> bool | None:
        """Whether the request would be admitted now (None when no request was given)."""
        if self.verdict is None:
            return None
        return self.verdict.admitted and not self.recovering_until

    def why_limit(self) -> str:
        """One sentence on which term decided the limit."""
        if self.bound == "lo":
            if self.lo <= 0:
                return "it asks for nothing, so its limit is 0"
            if self.lo >= self.guarantee and self.demand >= self.guarantee:
                return f"it gets its guarantee {self.guarantee} (lo), as much as the others leave"
            return (
                f"its floor lo={self.lo:g}: the part of its guarantee it uses, waits for "
                f"or never lends"
            )
        if self.bound == "up":
            return f"its ceiling up={self.up:g}: " + (
                "the most it may hold (guarantee + borrow limit)"
                if self.up >= self.ceiling - 1e-9
                else "everything it asks for"
            )
        return (
            f"its weighted fair share of what is spare: level {self.level:g} × weight "
            f"{self.weight:g}"
        )

    def describe(self) -> str:
        """A few lines for humans: the limit, why, what is borrowed from whom, and the verdict."""
        ceiling = f", ceiling {self.ceiling:g}" if math.isfinite(self.ceiling) else ""
        asked = " with this request" if self.units is not None else ""
        lines = [
            f"tenant {self.tenant!r} in group {self.group!r}: limit {self.entitled:g} (the most "
            f"it may hold now if it asks; guarantee {self.guarantee}{ceiling}); holds "
            f"{self.used}, waits for {self.pending}; group holds {self.group_used} of "
            f"{self.capacity}",
            f"at its demand of {self.demand:g}{asked}: fair share {self.limit:g} (lo {self.lo:g}, "
            f"up {self.up:g}), decided by {self.why_limit()}",
        ]
        if self.borrowed > 0:
            parts = ", ".join(
                f"{loan.units:g} from {loan.lender!r} (lends {loan.available:g})"
                for loan in self.loans
            )
            lines.append(f"borrows {self.borrowed:g} above its guarantee: {parts or 'nobody'}")
        if self.recovering_until:
            lines.append(
                "the group is recovering from lost Redis state until "
                f"{self.recovering_until:.3f} (Redis time): holders re-assert their leases, "
                "new requests are refused"
            )
        if self.verdict is not None and self.units is not None:
            v = self.verdict
            if self.recovering_until and v.reason != "too_large":
                lines.append(f"a request for {self.units} units would be refused (recovering)")
            elif v.admitted:
                lines.append(f"a request for {self.units} units would be admitted")
            elif v.reason == "too_large":
                lines.append(f"a request for {self.units} units can never fit (too large)")
            elif v.reason == "tenant_limit":
                lines.append(
                    f"a request for {self.units} units would be refused: {self.used} + "
                    f"{self.units} is above its fair share {self.limit:g}"
                )
            elif v.reason == "group_full":
                lines.append(
                    f"a request for {self.units} units would be refused: the group holds "
                    f"{self.group_used} of {self.capacity}; it is admitted once "
                    f"{self.group_used + self.units - self.capacity} units are released"
                )
            else:
                lines.append(f"a request for {self.units} units would be refused ({v.reason})")
        return "\n".join(lines)


def _state(snapshot: GroupSnapshot) -> tuple[dict[str, int], dict[str, int]]:
    used = {n: t.used for n, t in snapshot.tenants.items() if t.used > 0}
    pending = {n: t.pending for n, t in snapshot.tenants.items() if t.pending > 0}
    return used, pending


def lenders(policy: GroupPolicy, shares: Mapping[str, Share], exclude: str) -> dict[str, float]:
    """What every source of spare capacity offers: unused lendable guarantees and the pool.

    ``shares`` must hold every tenant with demand; a tenant of the policy that
    is missing is idle, and lends ``G − G(1−ℓ) = ℓG``.
    """
    offers: dict[str, float] = {}
    for tenant in policy.tenants:
        if tenant.name == exclude or tenant.guarantee <= 0:
            continue
        share = shares.get(tenant.name)
        lo = share.lo if share is not None else tenant.reserve
        spare = tenant.guarantee - lo
        if spare > 1e-9:
            offers[tenant.name] = spare
    pool = policy.capacity - sum(t.guarantee for t in policy.tenants)
    if pool > 0:
        offers[POOL] = float(pool)
    return offers


def _demand(snapshot: GroupSnapshot) -> dict[str, float]:
    used, pending = _state(snapshot)
    demand: dict[str, float] = {}
    for source in (used, pending):
        for name, n in source.items():
            demand[name] = demand.get(name, 0.0) + n
    return demand


def entitlement(snapshot: GroupSnapshot, policy: GroupPolicy, tenant: str) -> float:
    """The most units ``tenant`` may hold now if it asks: what outputs call its ``limit``.

    The reference rule with the tenant's demand raised to the whole capacity
    (capped by its ceiling ``G + B``) and everyone else's as the snapshot
    shows. It is never below the tenant's guarantee (``lo = G`` at that
    demand), and a request of ``u`` units passes the tenant check exactly
    when ``used + u`` fits under it (strategy-proofness: asking for more never
    earns more than one's due). Units others borrow come back to the tenant
    as their leases end, so it may have to wait for them (``group_full``).
    """
    return entitlements(snapshot, policy, [tenant])[tenant]


def entitlements(
    snapshot: GroupSnapshot, policy: GroupPolicy, tenants: Iterable[str] | None = None
) -> dict[str, float]:
    """``entitlement`` of each of ``tenants`` (default: every tenant in the snapshot).

    ``group_allocation`` once per active tenant and once per distinct set of
    idle parameters, with the active tenants' claims built once: a view of a
    group with thousands of listed, mostly idle tenants stays cheap.
    """
    listed = {t.name: t for t in policy.tenants}

    def spec_of(name: str) -> TenantPolicy | None:
        return listed.get(name) or policy.tenant(name)

    demand = _demand(snapshot)
    base: dict[str, Claim] = {}
    for name, d in demand.items():
        spec = spec_of(name)
        if d > 0 and spec is not None:
            base[name] = claim_for(spec, d)
    base_reserve = math.fsum(c.reserve for c in base.values())
    total_reserve = policy.reserve
    capacity = float(policy.capacity)
    out: dict[str, float] = {}
    # Idle tenants with the same parameters are entitled to the same limit: solve once each.
    idle_limits: dict[tuple[float, float, float, float], float] = {}
    for name in snapshot.tenants if tenants is None else tenants:
        spec = spec_of(name)
        if spec is None:
            raise UnknownTenant(name, policy.name)
        key = (float(spec.guarantee), float(spec.lendable), spec.ceiling, float(spec.weight))
        if name not in base and key in idle_limits:
            out[name] = idle_limits[key]
            continue
        claims = dict(base)
        mine = claims.pop(name, None)
        reserve = base_reserve - (mine.reserve if mine is not None else 0.0) + spec.reserve
        claims[name] = claim_for(spec, capacity)
        idle = max(0.0, total_reserve - reserve)
        out[name] = solve(capacity, list(claims.values()), idle).shares[name].limit
        if mine is None:
            idle_limits[key] = out[name]
    return out


def explain(
    snapshot: GroupSnapshot,
    policy: GroupPolicy,
    tenant: str,
    units: int | None = None,
    *,
    already_pending: bool = False,
) -> Explanation:
    """Explain ``tenant``'s limit in ``snapshot``, and the verdict on ``units`` if given.

    The request is new (its units are added to the tenant's demand) unless
    ``already_pending`` says it is a waiting request whose units the snapshot
    already counts as pending. The tenant must be known to the policy (listed,
    or a stranger of a group that admits strangers). The per-tenant FIFO
    order of waiting requests is not visible in a snapshot, so the verdict
    assumes this request is its tenant's oldest.
    """
    if policy.name != snapshot.group:
        raise InvalidRequest(
            "policy", f"is group {policy.name!r}'s, the snapshot is of {snapshot.group!r}"
        )
    spec = policy.tenant(tenant)
    if spec is None:
        raise UnknownTenant(tenant, policy.name)
    used, pending = _state(snapshot)
    demand: dict[str, float] = {}
    for source in (used, pending):
        for name, n in source.items():
            demand[name] = demand.get(name, 0.0) + n
    verdict = None
    if units is not None:
        if not already_pending:
            demand[tenant] = demand.get(tenant, 0.0) + units
        verdict = decide(policy, used, pending, tenant, units, already_pending=already_pending)
    alloc = group_allocation(policy, demand, extra=[tenant])
    share = alloc.shares[tenant]
    held = used.get(tenant, 0)
    if verdict is not None and verdict.admitted and units is not None:
        held += units
    borrowed = float(max(0, held - spec.guarantee))
    offers = lenders(policy, alloc.shares, exclude=tenant)
    total = math.fsum(offers.values())
    loans: tuple[Loan, ...] = ()
    if borrowed > 0 and total > 0:
        loans = tuple(
            Loan(name, borrowed * offer / total, offer)
            for name, offer in sorted(offers.items(), key=lambda kv: (-kv[1], kv[0]))
        )
    row = snapshot.tenants.get(tenant)
    return Explanation(
        tenant=tenant,
        group=policy.name,
        capacity=policy.capacity,
        group_used=snapshot.used,
        used=used.get(tenant, 0),
        pending=pending.get(tenant, 0),
        demand=demand.get(tenant, 0.0),
        guarantee=spec.guarantee,
        ceiling=spec.ceiling,
        weight=float(spec.weight),
        limit=share.limit,
        lo=share.lo,
        up=share.up,
        bound=share.bound,
        level=alloc.level,
        borrowed=borrowed,
        loans=loans,
        units=units,
        verdict=verdict,
        engine_limit=None if row is None else row.limit,
        recovering_until=snapshot.recovering_until if snapshot.recovering else 0.0,
        entitled=entitlement(snapshot, policy, tenant),
    )


def explain_flow(
    core: QuotaCore, tenant: str, units: int | None = None, *, group: str | None = None
) -> Flow[Explanation]:
    """The I/O-free flow behind ``QuotaClient.explain``: one snapshot, policy from the catalog.

    The group's policy is the one the client routes by (re-read from Redis when
    this client has none for the group yet).
    """
    tenant = validate_tenant(tenant)
    if units is not None:
        units = validate_units(units)
    name = yield from core.group_of(tenant, group)
    policy = core.policy
    if policy is None or policy.group(name) is None:
        policy = yield from core.load_policy()
    group_policy = None if policy is None else policy.group(name)
    if group_policy is None:
        raise PolicyMissing(name)
    snapshot = yield from core.snapshot(name, [tenant])
    return explain(snapshot, group_policy, tenant, units)
