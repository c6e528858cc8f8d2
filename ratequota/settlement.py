"""Reserve, then settle: the arithmetic of a settlement, and one group's meters in memory.

An admission charges a meter's *estimate*; the actual amount is known only
when the work is done. Settling charges the difference to the buckets the
admission charged (``ratequota.rates`` decides admissions), down to a
bounded debt, and refunds up to each bucket's size, so no tick is lost or
counted twice. ``Reservation`` records what a lease reserved per meter and
makes a settlement idempotent. ``MeterBook`` keeps one group's meter state
in memory, the reference engine for simulations and tests;
``lua/_meters.lua`` mirrors these functions and
tests/test_rates_differential.py holds the two to equality.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

from ratequota.policy import GroupPolicy
from ratequota.rates import (
    CONTEND_MS,
    TICKS_PER_TOKEN,
    GroupBucket,
    MeterDecision,
    MeterLimits,
    Path,
    ShareLimits,
    TenantBuckets,
    decide,
    group_at,
    meter_limits,
    share_limits,
    tenant_at,
)

__all__ = [
    "MeterBook",
    "Reservation",
    "SettleOutcome",
    "Settlement",
    "charge",
    "close_reservation",
    "settle",
    "settle_reservation",
]


def charge(level: int, delta: int, floor: int, cap: int) -> tuple[int, int]:
    """``level`` charged ``delta`` ticks (negative: a refund): the new level and the clipped part.

    A charge stops at ``floor`` (the debt bound; a level already below it is
    not lowered further) and the rest is *forgiven*: clipped > 0. A refund
    stops at ``cap`` (a level already above it is not raised) and the rest
    *overflows*: clipped < 0. ``new + clipped == level - delta`` always, so no
    tick is lost from the books.
    """
    wanted = level - delta
    new = max(wanted, min(level, floor)) if delta >= 0 else min(wanted, max(level, cap))
    return new, new - wanted


@attrs.frozen
class Settlement:
    """The states after a settlement, and the ticks clipped per bucket (own, ceil, group)."""

    group: GroupBucket
    tenant: TenantBuckets
    clipped: tuple[int, int, int]


def settle(
    meter: MeterLimits,
    share: ShareLimits,
    group: GroupBucket | None,
    tenant: TenantBuckets | None,
    path: Path,
    delta: int,
    now: int,
) -> Settlement:
    """Charge ``delta`` tokens (actual − estimate) at ``now`` to the buckets ``path`` charged.

    Buckets are refilled to ``now`` first, so a settlement long after the
    admission (across any refill) charges exactly ``delta`` to the current
    level: there are no windows to fall between. A debt bounds each bucket at
    ``meter.floor``; a borrower's tag moves by ``delta / weight`` as well, so
    its share counts what it really used.
    """
    g = group_at(meter, group, now)
    t = tenant_at(share, tenant, now)
    ticks = delta * TICKS_PER_TOKEN
    level, clip_g = charge(g.level, ticks, meter.floor, meter.cap)
    ceil, clip_c = charge(t.ceil, ticks, meter.floor, share.ccap)
    own, clip_o = t.own, 0
    tag = t.tag
    if path == "rate":
        own, clip_o = charge(t.own, ticks, meter.floor, share.cap)
    else:
        tag = t.tag + delta / share.weight
    return Settlement(
        GroupBucket(level, g.stamp),
        TenantBuckets(own, ceil, t.stamp, tag),
        (clip_o, clip_c, clip_g),
    )


SettleOutcome = Literal["settled", "replay", "conflict", "closed", "mismatch"]


@attrs.frozen
class Reservation:
    """What a lease reserved on one meter: the record that makes settlement idempotent.

    ``final`` is None until the lease settles (the actual amount) or ends
    unsettled (release without an amount, expiry, purge: the estimate); after
    that nothing changes it. Only the lease's holder, naming its ``lease_id``
    and fencing ``token``, can settle.
    """

    lease_id: str
    token: int
    tenant: str
    estimate: int
    path: Path
    final: int | None = None


def settle_reservation(
    record: Reservation, lease_id: str, token: int, actual: int
) -> tuple[Reservation, int | None, SettleOutcome]:
    """Settle ``record`` at ``actual`` tokens: the new record, the delta to charge, the outcome.

    The delta (``actual - estimate``) is returned exactly once: the first
    settlement fixes ``final``; repeating it is a ``replay`` (no delta), a
    different amount afterwards a ``conflict``, a settlement after the lease
    ended unsettled ``closed``, and a wrong id or token a ``mismatch`` —
    none of which charge anything.
    """
    if record.lease_id != lease_id or record.token != token:
        return record, None, "mismatch"
    if record.final is not None:
        return record, None, ("replay" if record.final == actual else "conflict")
    return attrs.evolve(record, final=actual), actual - record.estimate, "settled"


def close_reservation(record: Reservation) -> Reservation:
    """The lease ended (release, expiry, purge): an unsettled reservation keeps its estimate."""
    if record.final is not None:
        return record
    return attrs.evolve(record, final=record.estimate)


@attrs.define
class MeterBook:
    """One group's state of one meter, in memory: the reference engine for simulations and tests.

    It keeps what the Redis keys will keep (docs/rates.md, "Integration
    plan"): the group bucket, each tenant's buckets and tag, and when each
    borrower was last in contention. ``floor`` is the O(n) reference of
    what the scripts read from a sorted set in O(log n).
    """

    meter: MeterLimits
    shares: Mapping[str, ShareLimits]
    group: GroupBucket | None = None
    tenants: dict[str, TenantBuckets] = attrs.Factory(dict)
    contending: dict[str, int] = attrs.Factory(dict)

    @classmethod
    def for_policy(cls, policy: GroupPolicy, meter: str) -> MeterBook:
        """A fresh book for ``meter`` of ``policy``'s listed tenants."""
        shares = {t.name: share_limits(policy, t, meter) for t in policy.tenants}
        return cls(meter_limits(policy, meter), shares)

    def floor(self, now: int) -> float | None:
        """The smallest tag among the tenants in contention at ``now``."""
        tags = [
            self.tenants[name].tag
            for name, until in self.contending.items()
            if until > now and name in self.tenants
        ]
        return min(tags) if tags else None

    def contends(self, tenant: str, now: int) -> bool:
        """Whether ``tenant`` is still in contention for the spare at ``now``."""
        return self.contending.get(tenant, now) > now and tenant in self.tenants

    def ask(self, tenant: str, amount: int, now: int) -> MeterDecision:
        """Decide and commit one request (an admission's charge, a refusal's contention)."""
        decision = decide(
            self.meter,
            self.shares[tenant],
            self.group,
            self.tenants.get(tenant),
            amount,
            now,
            self.floor(now),
            self.contends(tenant, now),
        )
        self.group = decision.group
        self.tenants[tenant] = decision.tenant
        if decision.contending:
            self.contending[tenant] = now + CONTEND_MS
        return decision

    def settle(self, tenant: str, path: Path, delta: int, now: int) -> Settlement:
        """Charge a settlement's ``delta`` for ``tenant`` and keep the result."""
        done = settle(
            self.meter, self.shares[tenant], self.group, self.tenants.get(tenant), path, delta, now
        )
        self.group = done.group
        self.tenants[tenant] = done.tenant
        return done
