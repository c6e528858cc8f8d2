"""Rate meters shared the way Linux HTB shares a link: the pure reference (docs/rates.md).

Per meter (``requests``, ``tokens``, ...) a group has one token bucket and every
tenant two: its guaranteed bucket (``rate``, ``burst``) and its ceiling bucket
(``ceil``, ``cburst``). A request of ``n`` tokens is admitted

* on its **rate** (the guarantee) when both of the tenant's buckets hold ``n``:
  asking within one's own rate never depends on anybody else;
* else by **borrowing** when the ceiling bucket holds ``n``, the group bucket
  holds ``n`` above the *reserve* (the sum of the tenants' bursts, kept for
  their guarantees), and the tenant is not ahead of the slowest contending
  borrower by more than one *quantum* in its weighted borrowing tag.

Every admission charges the group bucket and the ceiling bucket; the
guaranteed bucket is charged only on the rate path. Settlement charges the
difference between the actual amount and the estimate to the buckets the
admission charged, down to a bounded debt (beyond it the overrun is forgiven
and reported), and refunds up to each bucket's size.

Buckets count in *ticks* (``TICKS_PER_TOKEN`` to a token) and refill on Redis
time in ms, so an integer rate per second or per minute refills an integer
number of ticks every ms and every level is an exact integer. Refilling is
path independent — refilling to ``t1`` then to ``t2`` equals refilling to
``t2`` at once — so a refused call may write its refilled state or not.

Everything here is a plain function over frozen values; ``lua/_meters.lua``
mirrors it function by function and tests/test_rates_differential.py holds
the two to equality. Settlement and ``MeterBook`` (one group's meter state in memory, for
simulations and tests) live in ``ratequota.settlement``.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy

__all__ = [
    "CONTEND_MS",
    "TICKS_PER_TOKEN",
    "GroupBucket",
    "MeterDecision",
    "MeterLimits",
    "ShareLimits",
    "TenantBuckets",
    "decide",
    "group_at",
    "horizon",
    "lost_group",
    "lost_tenant",
    "meter_limits",
    "ms_until",
    "policy_horizon",
    "refill",
    "share_limits",
    "tenant_at",
]

#: Ticks in one token: divisible by 1,000 (ms in a second) and 60,000 (ms in a minute),
#: so a rate of r per second refills 60·r ticks per ms and r per minute refills r.
TICKS_PER_TOKEN = 60_000

#: A borrower stays in contention this long after its last borrowing attempt; the
#: slowest contender's tag (the floor) is taken over the tenants still in contention.
CONTEND_MS = 2_000

Path = Literal["rate", "borrow"]
#: Why a meter refused: ``too_large`` can never pass; ``ceil``: the tenant's ceiling bucket
#: (or its debt) is short; ``rate``: above its own rate and too large to borrow; ``group``:
#: no spare rate in the group now; ``share``: others contending for the spare come first.
Reason = Literal["admitted", "too_large", "ceil", "rate", "group", "share"]


def _per_ms(rate: int, per: str) -> int:
    """Ticks per ms for ``rate`` tokens per ``per``."""
    return rate * (TICKS_PER_TOKEN // 1000) if per == "second" else rate


@attrs.frozen
class MeterLimits:
    """One meter of one group, in ticks: what ``decide`` needs of the group's policy."""

    rate: int  # ticks per ms
    cap: int  # the group's burst, ticks
    reserve: int  # Σ of the tenants' bursts, ticks: kept in the bucket for their guarantees
    floor: int  # -debt, ticks: lowest level a settlement may push a bucket to
    quantum: float  # tokens a borrower may run ahead of the slowest contender

    @property
    def borrowable(self) -> int:
        """Ticks of the group's burst that borrowers may take at once."""
        return self.cap - self.reserve


@attrs.frozen
class ShareLimits:
    """One tenant's share of one meter, in ticks."""

    rate: int  # guaranteed, ticks per ms
    ceil: int  # ticks per ms
    cap: int  # guaranteed bucket size (burst), ticks
    ccap: int  # ceiling bucket size (cburst), ticks
    weight: float


def meter_limits(group: GroupPolicy, meter: str) -> MeterLimits:
    """The group-level limits of ``meter`` from the policy (KeyError if it has none)."""
    spec = group.meter(meter)
    if spec is None:
        raise KeyError(meter)
    reserve = 0
    for tenant in group.tenants:
        reserve += _share(tenant, spec).burst or 0
    return MeterLimits(
        rate=_per_ms(spec.rate, spec.per),
        cap=spec.burst * TICKS_PER_TOKEN,
        reserve=reserve * TICKS_PER_TOKEN,
        floor=-spec.debt_limit * TICKS_PER_TOKEN,
        quantum=float(spec.burst - reserve),
    )


def _share(tenant: TenantPolicy, spec: MeterPolicy) -> TenantMeter:
    share = tenant.meter(spec.name) or TenantMeter(spec.name)
    return share.resolved(spec)


def share_limits(group: GroupPolicy, tenant: TenantPolicy, meter: str) -> ShareLimits:
    """``tenant``'s limits on ``meter`` (a meter it does not list: rate 0, ceil = group rate)."""
    spec = group.meter(meter)
    if spec is None:
        raise KeyError(meter)
    share = _share(tenant, spec)
    assert share.ceil is not None and share.burst is not None and share.cburst is not None
    return ShareLimits(
        rate=_per_ms(share.rate, spec.per),
        ceil=_per_ms(share.ceil, spec.per),
        cap=share.burst * TICKS_PER_TOKEN,
        ccap=share.cburst * TICKS_PER_TOKEN,
        weight=float(share.weight),
    )


@attrs.frozen
class GroupBucket:
    """The group's bucket of one meter: level in ticks at ``stamp`` (ms of Redis time)."""

    level: int
    stamp: int


@attrs.frozen
class TenantBuckets:
    """A tenant's buckets of one meter at ``stamp``; ``tag`` is its borrowing tag (tokens/weight).

    ``own`` is the guaranteed bucket, ``ceil`` the ceiling bucket. A missing
    state (never used, or expired once every bucket is full again: ``horizon``)
    means both are full; a state Redis lost is ``lost_tenant``.
    """

    own: int
    ceil: int
    stamp: int
    tag: float = 0.0


def refill(level: int, stamp: int, now: int, rate: int, cap: int) -> int:
    """``level`` ticks at ``stamp`` refilled at ``rate`` ticks/ms until ``now``, at most ``cap``.

    A clock that went back (``now < stamp``) refills nothing. A level above
    ``cap`` (the policy shrank the burst) is cut to ``cap``. ``level + rate·dt``
    may exceed 2**53 in Lua for a long idle time; it is then far above ``cap``
    and the minimum is still exact.
    """
    if now <= stamp or rate == 0:
        return min(level, cap)
    return min(cap, level + rate * (now - stamp))


def group_at(limits: MeterLimits, state: GroupBucket | None, now: int) -> GroupBucket:
    """The group's bucket refilled to ``now`` (full when there is no state)."""
    if state is None:
        return GroupBucket(limits.cap, now)
    level = refill(state.level, state.stamp, now, limits.rate, limits.cap)
    return GroupBucket(level, max(state.stamp, now))


def tenant_at(limits: ShareLimits, state: TenantBuckets | None, now: int) -> TenantBuckets:
    """The tenant's buckets refilled to ``now`` (full, tag 0, when there is no state)."""
    if state is None:
        return TenantBuckets(limits.cap, limits.ccap, now, 0.0)
    return TenantBuckets(
        refill(state.own, state.stamp, now, limits.rate, limits.cap),
        refill(state.ceil, state.stamp, now, limits.ceil, limits.ccap),
        max(state.stamp, now),
        state.tag,
    )


def horizon(limits: MeterLimits, share: ShareLimits) -> int:
    """Ms until the group's bucket and both of the tenant's are full again from their lowest.

    After a charge to these buckets, this long with nothing drawn leaves them all
    full, so their state may then vanish (a missing state reads as full). A bucket
    that never refills (rate 0) has size 0 and is never charged below it.
    """
    longest = 0
    for cap, rate in ((limits.cap, limits.rate), (share.cap, share.rate), (share.ccap, share.ceil)):
        if rate > 0:
            longest = max(longest, -((limits.floor - cap) // rate))
    return longest


def policy_horizon(group: GroupPolicy) -> int:
    """The longest ``horizon`` of any meter and tenant of ``group`` (listed or default), in ms.

    A restored policy takes every bucket to have been drawn just before the loss.
    """
    longest = 0
    for spec in group.meters:
        limits = meter_limits(group, spec.name)
        for tenant in (*group.tenants, group.default_tenant):
            longest = max(longest, horizon(limits, share_limits(group, tenant, spec.name)))
    return longest


def lost_group(limits: MeterLimits, since: int) -> GroupBucket:
    """The group's bucket when its state was lost, the loss noticed at ``since``.

    The stored level could have been as low as the debt floor, so the bucket
    refills from there: never more admitted than if nothing had been lost.
    """
    return GroupBucket(limits.floor, since)


def lost_tenant(limits: MeterLimits, share: ShareLimits, since: int) -> TenantBuckets:
    """The tenant's buckets when their state was lost, noticed at ``since`` (see ``lost_group``).

    A bucket that never refills (rate 0) is never charged and stays at its size, 0.
    """
    own = limits.floor if share.rate > 0 else share.cap
    ceil = limits.floor if share.ceil > 0 else share.ccap
    return TenantBuckets(own, ceil, since, 0.0)


def ms_until(level: int, target: int, rate: int) -> int | None:
    """Whole ms until a bucket at ``level`` refilling at ``rate`` holds ``target`` (None: never)."""
    if level >= target:
        return 0
    if rate <= 0:
        return None
    return -((level - target) // rate)


@attrs.frozen
class MeterDecision:
    """The outcome of one meter for one request, and the states to store if it commits.

    ``path`` is how it was admitted (``"rate"``: within the guarantee;
    ``"borrow"``: spare rate). ``retry_ms`` on refusal is the earliest time
    the same request would be admitted if nothing else happened, computed
    from the buckets (None: too large, never). For a ``share`` refusal other
    borrowers must move first; ``retry_ms`` is then the time the group bucket
    needs to give them the tokens this tenant is ahead by. ``remaining`` is
    what the tenant could take right now after this decision (tokens, floored)
    and ``reset_ms`` when its ceiling bucket is full again; both feed the
    HTTP headers. ``contending`` says the request took the borrowing path
    (the caller marks the tenant as a contender until ``now + CONTEND_MS``).
    """

    admitted: bool
    reason: Reason
    path: Path | None
    retry_ms: int | None
    remaining: int
    reset_ms: int
    contending: bool
    group: GroupBucket
    tenant: TenantBuckets


def _remaining(meter: MeterLimits, share: ShareLimits, g: GroupBucket, t: TenantBuckets) -> int:
    on_rate = min(t.own, t.ceil)
    on_borrow = min(t.ceil, g.level - meter.reserve)
    return max(0, max(on_rate, on_borrow) // TICKS_PER_TOKEN)


def _reset_ms(share: ShareLimits, t: TenantBuckets) -> int:
    wait = ms_until(t.ceil, share.ccap, share.ceil)
    return 0 if wait is None else wait


def _later(*waits: int | None) -> int | None:
    if any(w is None for w in waits):
        return None
    return max(w for w in waits if w is not None)


def _sooner(*waits: int | None) -> int | None:
    known = [w for w in waits if w is not None]
    return min(known) if known else None


def decide(
    meter: MeterLimits,
    share: ShareLimits,
    group: GroupBucket | None,
    tenant: TenantBuckets | None,
    amount: int,
    now: int,
    floor: float | None = None,
    contends: bool = False,
) -> MeterDecision:
    """Admit or refuse ``amount`` tokens of one meter for one tenant at ``now`` (ms).

    ``floor`` is the smallest borrowing tag among the tenants still in
    contention, this one included if it ``contends`` (None: nobody does). A
    contender keeps its own tag; a tenant coming back to borrowing starts at
    the floor, neither hoarding credit nor paying for what it borrowed before
    it went away (and with nobody in contention, at 0: tags restart, so they
    never grow without bound). The rule is docs/rates.md's: the rate path
    first, then the borrowing path.
    """
    g = group_at(meter, group, now)
    t = tenant_at(share, tenant, now)
    need = amount * TICKS_PER_TOKEN
    if need == 0:
        return _done(meter, share, g, t, True, "admitted", None, None, False)
    on_rate = need <= share.cap
    on_borrow = need <= meter.borrowable
    if need > share.ccap or not (on_rate or on_borrow):
        return _done(meter, share, g, t, False, "too_large", None, None, False)
    if t.ceil >= need and t.own >= need:
        g = GroupBucket(g.level - need, g.stamp)
        t = TenantBuckets(t.own - need, t.ceil - need, t.stamp, t.tag)
        return _done(meter, share, g, t, True, "admitted", "rate", None, False)
    # A contender keeps its tag (>= floor, the floor being the least tag of all contenders);
    # a tenant coming back starts at the floor, or at 0 when nobody contends.
    start = t.tag if contends else (0.0 if floor is None else floor)
    lead = 0.0 if floor is None else share.weight * (start - floor)
    ceil_wait = ms_until(t.ceil, need, share.ceil)
    rate_wait = _later(ms_until(t.own, need, share.rate), ceil_wait) if on_rate else None
    fair = lead <= meter.quantum
    # Ahead of its share, a borrower waits (as an estimate) until the group bucket has also
    # given the contenders behind it the tokens it leads them by beyond the quantum.
    behind = 0 if fair else math.ceil((lead - meter.quantum) * TICKS_PER_TOKEN)
    borrow_wait = None
    if on_borrow:
        group_wait = ms_until(g.level - behind, meter.reserve + need, meter.rate)
        borrow_wait = _later(ceil_wait, group_wait)
    if t.ceil < need:
        return _done(
            meter, share, g, t, False, "ceil", None, _sooner(rate_wait, borrow_wait), False
        )
    if not on_borrow:
        # Only the rate path could ever serve it, and the guaranteed bucket is short.
        return _done(meter, share, g, t, False, "rate", None, rate_wait, False)
    contended = TenantBuckets(t.own, t.ceil, t.stamp, start)
    if not fair:
        # Checked before the group bucket, so that a "group" refusal is always fair and its
        # retry_ms exact.
        wait = _sooner(rate_wait, borrow_wait)
        return _done(meter, share, g, contended, False, "share", None, wait, True)
    if g.level - need < meter.reserve:
        return _done(
            meter, share, g, contended, False, "group", None, _sooner(rate_wait, borrow_wait), True
        )
    g = GroupBucket(g.level - need, g.stamp)
    t = TenantBuckets(t.own, t.ceil - need, t.stamp, start + amount / share.weight)
    return _done(meter, share, g, t, True, "admitted", "borrow", None, True)


def _done(
    meter: MeterLimits,
    share: ShareLimits,
    g: GroupBucket,
    t: TenantBuckets,
    admitted: bool,
    reason: Reason,
    path: Path | None,
    retry_ms: int | None,
    contending: bool,
) -> MeterDecision:
    return MeterDecision(
        admitted=admitted,
        reason=reason,
        path=path,
        retry_ms=retry_ms,
        remaining=_remaining(meter, share, g, t),
        reset_ms=_reset_ms(share, t),
        contending=contending,
        group=g,
        tenant=t,
    )
