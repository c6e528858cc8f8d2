"""What happens when Redis is slow or gone (§8): circuit breakers, fail-open, local allowance.

Pure state with an injected clock, shared by the sync and async clients:

- ``CircuitBreaker``: one per shard. *closed* lets every call through and
  counts consecutive failures; after ``failures`` of them it *opens* and
  callers fail at once instead of each paying the socket timeout. After
  ``reset`` seconds it turns *half-open*: exactly one probe call goes through
  (the others still fail fast); success closes it, failure opens it again.
  A probe that never reports back (a cancelled task) is forgotten after
  ``reset`` seconds so another one may go.
- ``Breakers``: the per-shard breakers of one client.
- ``FailureState``: applies the client's ``failure_mode`` when an acquire
  meets ``BackendUnavailable``: ``closed`` re-raises, ``open`` admits with a
  clearly marked synthetic lease, ``local`` admits up to ``local_allowance``
  units per tenant held locally at once, then re-raises. It counts all of it,
  and the releases on leaving ``acquire`` that failed (Redis unreachable, out
  of memory, ...): those are logged and counted, never raised over the
  handler's own outcome, since the lease ends by itself at its expiry.

Locks here guard a few integers and are never held across I/O.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Literal

import attrs

from ratequota.decision import Decision, LeaseInfo, RenewResult
from ratequota.errors import BackendUnavailable, RateQuotaError

#: Where ratequota logs what it absorbs instead of raising (failed releases on exit).
log = logging.getLogger("ratequota")

__all__ = [
    "FAILURE_MODES",
    "BreakerState",
    "Breakers",
    "CircuitBreaker",
    "FailureMode",
    "FailureState",
    "FailureStats",
    "synthetic_renewal",
]

FailureMode = Literal["closed", "open", "local"]
FAILURE_MODES: tuple[FailureMode, ...] = ("closed", "open", "local")
BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """The closed / open / half-open state machine of one shard; ``clock`` gives seconds."""

    def __init__(self, failures: int, reset: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self.state: BreakerState = "closed"
        self._count = 0
        self._opened_at = -math.inf
        self._probe_at: float | None = None

    def allow(self) -> bool:
        """May a call go to the shard now? In half-open, only the one probe may."""
        if self.state == "closed":
            return True
        now = self._clock()
        if self.state == "open":
            if now - self._opened_at < self.reset:
                return False
            self.state = "half_open"
            self._probe_at = None
        if self._probe_at is not None and now - self._probe_at < self.reset:
            return False  # a probe is in flight
        self._probe_at = now
        return True

    def is_settled(self) -> bool:
        """Closed with no failure counted and no probe out: a success would change nothing."""
        return self.state == "closed" and self._count == 0 and self._probe_at is None

    def success(self) -> None:
        """The shard answered: close."""
        self.state = "closed"
        self._count = 0
        self._probe_at = None

    def failure(self) -> None:
        """The shard did not answer: count, and open at the threshold (at once when probing)."""
        self._count += 1
        if self.state == "half_open" or self._count >= self.failures:
            self.state = "open"
            self._opened_at = self._clock()
            self._probe_at = None

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when closed)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self._opened_at + self.reset - self._clock())


class Breakers:
    """One ``CircuitBreaker`` per shard key, created on first use; safe across threads.

    ``listener`` (the client's observer) hears every change of a shard's
    state, called after the lock is released.
    """

    def __init__(
        self,
        failures: int,
        reset: float,
        clock: Callable[[], float],
        listener: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self._failures, self._reset, self._clock = failures, reset, clock
        self._by_shard: dict[object, CircuitBreaker] = {}
        self._lock = threading.Lock()  # guards the state machines; never held across I/O
        self._listener = listener
        self.fast_failures = 0

    def _breaker(self, shard: object) -> CircuitBreaker:
        breaker = self._by_shard.get(shard)
        if breaker is None:
            breaker = CircuitBreaker(self._failures, self._reset, self._clock)
            self._by_shard[shard] = breaker
        return breaker

    def refuse(self, shard: object, where: str) -> BackendUnavailable | None:
        """The error to fail fast with when ``shard``'s breaker is open, else None."""
        breaker = self._by_shard.get(shard)
        if breaker is not None and breaker.state == "closed":
            # The common case, read without the lock: a closed breaker lets the call through
            # and changes nothing, exactly as ``allow`` would under the lock.
            return None
        with self._lock:
            breaker = self._breaker(shard)
            before = breaker.state
            allowed = breaker.allow()
            after = breaker.state
            if not allowed:
                self.fast_failures += 1
                wait = breaker.retry_in()
        if after != before and self._listener is not None:
            self._listener(str(shard), after)
        if allowed:
            return None
        return BackendUnavailable(
            f"Redis at {where} is unavailable (circuit open after repeated failures; "
            f"next probe in {wait:.3f}s)"
        )

    def record(self, shard: object, ok: bool) -> None:
        """Report how a call to ``shard`` went."""
        breaker = self._by_shard.get(shard)
        if ok and breaker is not None and breaker.is_settled():
            return  # a success on a closed breaker with no failure counted changes nothing
        with self._lock:
            breaker = self._breaker(shard)
            before = breaker.state
            if ok:
                breaker.success()
            else:
                breaker.failure()
            after = breaker.state
        if after != before and self._listener is not None:
            self._listener(str(shard), after)

    def states(self) -> dict[object, BreakerState]:
        """Each known shard's breaker state, for health checks and tests."""
        with self._lock:
            return {shard: b.state for shard, b in self._by_shard.items()}


@attrs.frozen
class FailureStats:
    """Counters of the failure policy since the client was made."""

    fail_open_admits: int
    local_admits: int
    local_units_held: int
    fallback_refusals: int
    fast_failures: int
    #: Releases and renewals refused because the lease id named another tenant's
    #: lease or another fencing token (counted by the client, not the failure policy).
    fenced_refusals: int = 0
    #: Releases on leaving ``acquire`` (or a ``limit`` handler) that failed; those
    #: leases end at their expiry instead.
    release_failures: int = 0


class FailureState:
    """Applies ``failure_mode`` to an acquire that met ``BackendUnavailable``."""

    def __init__(self, mode: FailureMode, local_allowance: int, lease_ttl: float) -> None:
        self.mode = mode
        self.local_allowance = local_allowance
        self.lease_ttl = lease_ttl
        self._lock = threading.Lock()  # guards the counters below; never held across I/O
        self._local: dict[str, int] = {}
        self._open_admits = 0
        self._local_admits = 0
        self._refusals = 0
        self._release_failures = 0

    def fallback(
        self,
        error: BackendUnavailable,
        *,
        tenant: str,
        units: int,
        group: str | None,
        lease_id: str,
        now: float,
        ttl: float | None = None,
    ) -> Decision:
        """A synthetic admission under fail-open / local allowance, or ``error`` re-raised.

        The lease is marked ``synthetic=True``, has fencing token 0 (below any
        real token, so fencing downstream rejects it) and never touches Redis:
        releasing it only gives back the local allowance. ``now`` is epoch
        seconds, so its ``expires_at`` (``now + ttl``, default the client's
        ``lease_ttl``) reads like a real lease's, which is Redis time.
        """
        with self._lock:
            if self.mode == "open":
                self._open_admits += 1
            elif self.mode == "local":
                held = self._local.get(tenant, 0)
                if held + units > self.local_allowance:
                    self._refusals += 1
                    raise error
                self._local[tenant] = held + units
                self._local_admits += 1
            else:
                self._refusals += 1
                raise error
        lease = LeaseInfo(
            id=lease_id,
            tenant=tenant,
            group=group or "",
            units=units,
            token=0,
            expires_at=now + (self.lease_ttl if ttl is None else ttl),
            synthetic=True,
        )
        return Decision(
            admitted=True,
            reason="backend_unavailable",
            tenant=tenant,
            group=group or "",
            units=units,
            used=units,
            limit=math.nan,
            group_used=0,
            capacity=0,
            lease=lease,
        )

    def give_back(self, lease: LeaseInfo) -> None:
        """A synthetic lease ended: return its units to the local allowance."""
        if self.mode != "local":
            return
        with self._lock:
            left = self._local.get(lease.tenant, 0) - lease.units
            if left > 0:
                self._local[lease.tenant] = left
            else:
                self._local.pop(lease.tenant, None)

    def release_failed(self, lease: LeaseInfo, error: RateQuotaError) -> None:
        """Leaving ``acquire`` could not release ``lease``: count and log it, never raise.

        The handler's result (or its exception) is what its caller must see; the
        lease ends by itself at ``expires_at`` and its units come back then.
        """
        with self._lock:
            self._release_failures += 1
        log.warning(
            "ratequota: releasing lease %s (tenant %r, group %r, %d units) failed: %s; "
            "it ends by itself at its expiry",
            lease.id,
            lease.tenant,
            lease.group,
            lease.units,
            error,
        )

    def stats(self, fast_failures: int) -> FailureStats:
        """The counters, with the breakers' fast-failure count."""
        with self._lock:
            return FailureStats(
                fail_open_admits=self._open_admits,
                local_admits=self._local_admits,
                local_units_held=sum(self._local.values()),
                fallback_refusals=self._refusals,
                fast_failures=fast_failures,
                release_failures=self._release_failures,
            )


def synthetic_renewal(lease: LeaseInfo) -> RenewResult:
    """Renewing a synthetic lease: nothing to extend in Redis, never over a limit."""
    return RenewResult(
        renewed=True,
        expires_at=lease.expires_at,
        over_limit=False,
        used=lease.units,
        limit=math.nan,
        group_used=0,
        capacity=0,
    )
