"""What the engine answers: decisions, leases, renewals, releases and snapshots.

These are plain data, decoded from script replies by ``ratequota.engine.protocol``;
the clients add behaviour (a ``Lease`` knows how to renew and release itself
through the client that granted it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs

__all__ = [
    "Decision",
    "GroupSnapshot",
    "LeaseInfo",
    "MeterResult",
    "MeterSettlement",
    "Reason",
    "ReleaseResult",
    "RenewResult",
    "TenantSnapshot",
    "UsageRow",
]

Reason = Literal[
    "admitted",
    "too_large",
    "tenant_limit",
    "group_full",
    "unknown_tenant",
    "id_mismatch",
    "recovering",
    "backend_unavailable",
    "meter",
]

_WHY = {
    "too_large": "the request is larger than this tenant can ever hold",
    "tenant_limit": "the tenant is at its fair limit",
    "group_full": "the group's capacity is in use",
    "unknown_tenant": "the tenant is not in the policy",
    "id_mismatch": (
        "the request id names a lease or waiting request of another tenant or another "
        "number of units"
    ),
    "recovering": (
        "Redis lost the group's state while leases may still be live; new work waits until "
        "they have certainly ended"
    ),
    "backend_unavailable": "the quota backend is unavailable",
    "meter": "a rate meter refused",
}


@attrs.frozen
class MeterSettlement:
    """How one meter of a lease settled (``ratequota.settlement.settle_reservation``).

    ``outcome``: ``settled`` (``delta`` = actual − estimate tokens was charged,
    once), ``replay`` (the same amount again: nothing), ``conflict`` (another
    amount after the first: nothing), ``closed`` (the lease ended and keeps its
    estimate), ``mismatch`` (another tenant's lease or token), ``unreserved``
    (the lease reserved nothing on that meter). ``clipped`` (tokens) is what
    the debt bound forgave (> 0) or a full bucket could not take back (< 0),
    on the ceiling bucket.
    """

    name: str
    outcome: Literal["settled", "replay", "conflict", "closed", "mismatch", "unreserved"]
    delta: int = 0
    clipped: float = 0.0


#: Why one rate meter refused (docs/rates.md, "The rule").
_METER_WHY = {
    "too_large": "larger than its buckets can ever hold",
    "ceil": "at its ceiling (or repaying a debt)",
    "rate": "above its own rate and too large to borrow",
    "group": "no spare rate in the group now",
    "share": "other borrowers of the spare come first",
}


@attrs.frozen
class MeterResult:
    """One rate meter's part of a decision (docs/rates.md), as the acquire script decided it.

    ``reason`` is ``"admitted"`` or why the meter refused (``too_large``,
    ``ceil``, ``rate``, ``group``, ``share``); ``retry_after`` (s) when the same
    amount would pass if nothing else happened, computed from the buckets (None:
    admitted, or never). ``remaining`` is what the tenant could take now,
    ``reset`` (s) until its ceiling bucket is full again, ``limit`` its ceil in
    tokens per ``window`` seconds: the numbers the RateLimit headers carry.
    ``path`` is how it was admitted: ``"rate"`` (its guarantee) or
    ``"borrow"`` (spare rate), None for a zero amount or a refusal.
    """

    name: str
    amount: int
    admitted: bool
    reason: str
    retry_after: float | None
    remaining: int
    reset: float
    limit: int
    window: int
    path: str | None = None

    def describe(self) -> str:
        """Why it refused, in words (empty when admitted)."""
        if self.admitted:
            return ""
        return f"meter {self.name!r}: {_METER_WHY.get(self.reason, self.reason)}"


# LeaseInfo and Decision are not slotted: a frozen class with a ``__dict__`` is built in
# about 40% less time, and every decision builds one of each.
@attrs.frozen(slots=False)
class LeaseInfo:
    """The facts of a granted lease: who holds how many units, until when, with which token.

    ``expires_at`` is Redis time in seconds since the epoch, never the pod's
    clock. ``token`` is the fencing token: strictly increasing per group, so a
    downstream system can reject a holder whose lease already expired; it stays
    above every earlier token even when Redis loses its data (it is at least
    Redis time in ms x 1000), and a lease re-asserted after such a loss keeps
    its token. Release and renew name the lease by id, tenant and token.
    ``replay`` is true when a retried acquire found its first attempt had
    committed (the units were charged once). ``synthetic`` marks a lease
    granted locally while Redis was unreachable (fail-open or local
    allowance): it holds no units in Redis and its token is 0.
    """

    id: str
    tenant: str
    group: str
    units: int
    token: int
    expires_at: float
    replay: bool = False
    synthetic: bool = False
    #: The rate meters decided with this lease at admission (``Decision.meters``): what the
    #: RateLimit headers of an admitted request show. Not part of the lease's identity.
    meters: tuple[MeterResult, ...] = attrs.field(default=(), eq=False, repr=False)


@attrs.frozen(slots=False)
class Decision:
    """Admitted or refused, why, and the numbers behind it.

    ``used`` and ``group_used`` are units held after the decision.
    ``limit`` is the tenant's fair limit *at its demand including this
    request*, as the engine computed it: the threshold ``used + units`` was
    compared with. It is not what the tenant may hold at most: a tenant asking
    for less than its guarantee gets a limit near what it asked. On a
    ``tenant_limit`` refusal it is never below the tenant's guarantee (a
    tenant asking within its guarantee is never refused for its limit), so
    that is the only decision whose ``describe()`` shows it. It is NaN for a
    replayed acquire (the engine did not decide again) and for a synthetic
    one. ``retry_after`` is a hint in seconds for when trying again may
    succeed: 0 when admitted, and 0 for ``too_large`` (trying again never
    helps). See docs/concepts.md, "What limit means".

    ``shadow_refused``: admitted only because the group or tenant is in shadow
    mode (``GroupPolicy.shadow`` / ``TenantPolicy.shadow``); enforcement would
    have refused it, and ``reason`` says why (``tenant_limit``, ``group_full``
    or ``meter``). The lease is real: its units are held in Redis like any other.

    ``meters``: one ``MeterResult`` per rate meter the request named
    (``tokens=...``), decided with the lease, all or nothing: a ``meter``
    refusal names them, and its ``retry_after`` is the longest wait of the
    refusing meters. Empty when the request named none, or when the lease
    itself was refused first.
    """

    admitted: bool
    reason: Reason
    tenant: str
    group: str
    units: int
    used: int
    limit: float
    group_used: int
    capacity: int
    retry_after: float = 0.0
    policy_version: int = 0
    lease: LeaseInfo | None = None
    shadow_refused: bool = False
    meters: tuple[MeterResult, ...] = ()

    @property
    def never_fits(self) -> bool:
        """Refused for good: the units, or a meter's amount, exceed what can ever be held."""
        return self.reason == "too_large" or any(m.reason == "too_large" for m in self.meters)

    def meter(self, name: str) -> MeterResult | None:
        """This decision's result on rate meter ``name`` (None: the request named no such meter)."""
        for result in self.meters:
            if result.name == name:
                return result
        return None

    def __bool__(self) -> bool:
        return self.admitted

    def describe(self) -> str:
        """One line for logs and exception messages; never prints NaN."""
        units = _units(self.units)
        if self.reason == "meter":
            refusing = "; ".join(m.describe() for m in self.meters if not m.admitted)
            verb = "admitted" if self.admitted else "refused"
            mode = " in shadow mode (enforcing would refuse)" if self.admitted else ""
            hint = f"; retry in {self.retry_after:.3f}s" if self.retry_after > 0 else ""
            return (
                f"{verb} {units} for tenant {self.tenant!r} in group {self.group!r}{mode}: "
                f"{refusing}{hint}"
            )
        if self.shadow_refused:
            return (
                f"admitted {units} for tenant {self.tenant!r} in shadow mode; enforcing would "
                f"refuse: {_WHY[self.reason]} (it holds {self.used}, its fair limit with this "
                f"request is {self.limit:.4g}; group holds {self.group_used} of {self.capacity})"
            )
        if self.admitted:
            lease = self.lease
            if lease is not None and lease.replay:
                detail = "a retry of an acquire already admitted; charged once"
            elif lease is not None and lease.synthetic:
                detail = "granted locally: the quota backend is unavailable"
            else:
                detail = f"it holds {self.used}; group holds {self.group_used} of {self.capacity}"
            return f"admitted {units} for tenant {self.tenant!r} ({detail})"
        why = _WHY.get(self.reason, self.reason)
        if self.reason == "tenant_limit" and math.isfinite(self.limit):
            numbers = (
                f"it holds {self.used}, its fair limit with this request is {self.limit:.4g}; "
                f"group holds {self.group_used} of {self.capacity}"
            )
        else:
            numbers = f"group holds {self.group_used} of {self.capacity}; it holds {self.used}"
        hint = (
            f"; retry in {self.retry_after:.3f}s"
            if self.retry_after > 0 and self.reason != "too_large"
            else ""
        )
        return (
            f"refused {units} for tenant {self.tenant!r} in group {self.group!r}: "
            f"{why} ({numbers}){hint}"
        )


def _units(n: int) -> str:
    return f"{n} unit" if n == 1 else f"{n} units"


@attrs.frozen(slots=False)  # one per release: built faster without slots (as Decision)
class ReleaseResult:
    """Outcome of a release: ``was_live`` is false when the lease had expired or was gone.

    ``state`` tells the cases apart: ``"expired"`` means the holder overran its
    TTL (its units may already have been granted to someone else),
    ``"unknown"`` that the lease was released before or purged after expiry,
    ``"fenced"`` that the lease id now names a lease of another tenant or with
    another fencing token: the release was refused and changed nothing (the
    caller's own lease is certainly gone).
    """

    state: Literal["released", "expired", "unknown", "fenced"]
    units: int

    @property
    def was_live(self) -> bool:
        """True only if the lease was still live when released."""
        return self.state == "released"


@attrs.frozen
class RenewResult:
    """Outcome of a renewal.

    ``over_limit`` is the hint that a lender wants its capacity back: the
    tenant holds more than its fair limit now, so it should not start more.
    ``reason``: ``"renewed"``; ``"reasserted"`` (Redis had lost the group's
    state and the lease was written back with its id and token, see
    docs/failure-modes.md); ``"lost"`` (expired or gone: stop trusting the
    token); ``"fenced"`` (the id names another tenant's lease or another
    token: refused, nothing changed). ``ttl`` is the lifetime granted in
    seconds: lower than asked when the group's max_lease_ttl was lowered. The
    lease lives at least that long from now, and until ``expires_at``: a
    renewal never moves a lease's expiry earlier.
    """

    renewed: bool
    expires_at: float
    over_limit: bool
    used: int
    limit: float
    group_used: int
    capacity: int
    reason: Literal["renewed", "reasserted", "lost", "fenced"] = "renewed"
    ttl: float = 0.0


@attrs.frozen
class TenantSnapshot:
    """One tenant of a group at one moment, as the engine reports it.

    ``limit`` is the engine's fair limit at the tenant's *current* demand
    (``used + pending``), ``lo``/``up`` its bounds: an idle tenant shows what
    it keeps back, not what it could get. What the tenant may hold at most if
    it asked now — the number ``ratequota inspect`` and ``top`` call
    ``limit`` — is ``ratequota.clients.explain.entitlements``. ``borrowed`` is what it
    holds above its guarantee.
    """

    name: str
    used: int
    pending: int
    limit: float
    lo: float
    up: float
    guarantee: int
    borrowed: int


@attrs.frozen
class GroupSnapshot:
    """A group at one moment, read by one script call: consistent across tenants.

    ``recovering_until`` (Redis time, s; 0 when none) is the end of the group's
    recovery window after Redis lost its state: until then new work is refused
    and holders re-assert their leases by renewing (docs/failure-modes.md).
    """

    group: str
    now: float
    capacity: int
    used: int
    policy_version: int
    level: float
    tenants: Mapping[str, TenantSnapshot]
    leases: tuple[LeaseInfo, ...]
    leases_truncated: bool
    recovering_until: float = 0.0

    @property
    def recovering(self) -> bool:
        """True while the group refuses new work after Redis lost its state."""
        return self.recovering_until > self.now


@attrs.frozen
class UsageRow:
    """What one tenant used in one hour of a group, read from the usage ledger (docs/usage.md).

    ``hour`` counts hours since the epoch (UTC); ``start`` is its first second.

    ``unit_seconds`` is the units × seconds held by the leases that *ended*
    in that hour (released, or expired and purged), ``leases`` how many they
    were. ``tokens_reserved`` is the estimates admitted leases charged on the
    group's ``tokens`` meter; ``tokens_settled`` the actual amounts of their
    first settlements (an unsettled lease keeps its estimate and adds
    nothing here). ``refusals`` counts
    refused requests by reason; ``shadow_refusals`` what shadow mode
    admitted but enforcing would have refused, by reason.
    """

    group: str
    tenant: str
    hour: int
    unit_seconds: float = 0.0
    leases: int = 0
    tokens_reserved: int = 0
    tokens_settled: int = 0
    refusals: Mapping[str, int] = attrs.field(factory=dict)
    shadow_refusals: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def start(self) -> float:
        """The hour's start, epoch seconds."""
        return self.hour * 3600.0

    @property
    def refused(self) -> int:
        """Refusals of every reason."""
        return sum(self.refusals.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "group": self.group,
            "tenant": self.tenant,
            "hour": self.hour,
            "start": self.start,
            "unit_seconds": self.unit_seconds,
            "leases": self.leases,
            "tokens_reserved": self.tokens_reserved,
            "tokens_settled": self.tokens_settled,
            "refusals": dict(sorted(self.refusals.items())),
            "shadow_refusals": dict(sorted(self.shadow_refusals.items())),
        }
