"""What a client reports about itself: the ``Observer`` interface (no-op by default).

A client given ``observer=...`` calls it at a few fixed points, each shared
by the sync and the async client (so both report the same events):

- ``decision``: the final outcome of every ``try_acquire`` and ``acquire``
  (``QuotaCore``): admitted, refused with its reason, timed out, admitted
  only because of shadow mode, admitted by the failure mode while Redis was
  down, or failed;
- ``redis_call``: every Redis round trip a flow makes, timed around the
  perform (``Runner``), by shard and script or command;
- ``lease_held`` / ``lease_ended``: a lease taken by ``acquire`` or
  ``limit`` starts and stops being held (``AcquisitionBase``);
- ``lease_lost``: a held lease turned out to be gone (expired, fenced, or
  never renewed within its lifetime);
- ``renewal``: each background renewal's result (``RenewalBook.settle``);
- ``breaker``: a shard's circuit breaker changed state.

A client without an observer (the default) skips every hook behind one
``is None`` test: no timing, no event objects. Observer methods run on the
caller's thread or task, outside every lock of the client, and must not block
(``PrometheusMetrics`` only updates in-memory counters). An observer that
raises breaks the call that reported, so implementations should not.

Names of results and reasons are part of the metrics API: see docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from ratequota.decision import LeaseInfo
from ratequota.errors import ConfigError

__all__ = [
    "BreakerStateName",
    "DecisionEvent",
    "DecisionResult",
    "LostCause",
    "Observer",
    "Observers",
    "RenewalResultName",
]

#: The final outcome of one ``try_acquire`` / ``acquire``.
#: ``admitted``: a lease was granted within the limits. ``shadow_admitted``:
#: a lease was granted although enforcement would have refused (the group or
#: tenant is in shadow mode; the reason says what the refusal would have
#: been). ``fallback_admitted``: Redis was unreachable and the failure mode
#: admitted with a synthetic lease (reason ``fail_open`` or ``local_allowance``).
#: ``refused``: ``try_acquire`` refused, or ``acquire`` refused at once (too
#: large, id mismatch, unknown tenant). ``timed_out``: ``acquire`` was still
#: refused at its deadline (the reason is the last refusal's). ``failed``: Redis
#: was unreachable and the failure mode did not admit (``backend_unavailable``).
DecisionResult = Literal[
    "admitted", "shadow_admitted", "fallback_admitted", "refused", "timed_out", "failed"
]
#: Why a held lease was found gone: ``expired`` (a renewal or the release found
#: it past its lifetime), ``fenced`` (its id now names another holder's lease),
#: ``unrenewed`` (no renewal got through before its lifetime ended).
LostCause = Literal["expired", "fenced", "unrenewed"]
#: A background renewal's result: ``RenewResult.reason`` or ``error`` (Redis unreachable).
RenewalResultName = Literal["renewed", "reasserted", "lost", "fenced", "error"]
BreakerStateName = Literal["closed", "open", "half_open"]


@attrs.frozen
class DecisionEvent:
    """One acquire's final outcome, with the numbers the decision carried.

    ``used`` / ``group_used`` are units held after the decision, ``limit`` the
    tenant's fair limit at that moment (NaN when unknown: no Redis answer, or
    a replayed request), ``capacity`` the group's (0 when unknown),
    ``guarantee`` the tenant's guarantee by the client's last policy read
    (None when unknown). ``waited`` is the seconds ``acquire`` spent from its
    call to this outcome (None for ``try_acquire``, which never waits).
    """

    group: str
    tenant: str
    units: int
    result: DecisionResult
    reason: str
    used: int | None = None
    limit: float = math.nan
    group_used: int | None = None
    capacity: int = 0
    guarantee: int | None = None
    waited: float | None = None


class Observer:
    """Receives a client's events; every method does nothing unless overridden.

    Subclass it and override what you need (``ratequota.metrics.PrometheusMetrics``
    is one), then pass the instance as ``observer=`` to a client. One observer
    may serve several clients.
    """

    def decision(self, event: DecisionEvent) -> None:
        """An acquire's final outcome."""

    def redis_call(self, shard: str, call: str, seconds: float, ok: bool) -> None:
        """One Redis round trip: ``call`` is a script name, a command, or ``script_load``.

        ``ok`` is false when it raised (a timeout, a refused connection, an
        error reply); ``seconds`` are read from the client's clock.
        """

    def lease_held(self, lease: LeaseInfo) -> None:
        """``acquire`` (or ``limit``) now holds ``lease``."""

    def lease_ended(self, lease: LeaseInfo) -> None:
        """The holder of ``lease`` left ``acquire`` (released, or given up on)."""

    def lease_lost(self, lease: LeaseInfo, cause: LostCause) -> None:
        """A held lease was found gone: stop trusting its token."""

    def renewal(self, lease: LeaseInfo, result: RenewalResultName) -> None:
        """A background renewal of ``lease`` ended with ``result``."""

    def breaker(self, shard: str, state: BreakerStateName) -> None:
        """The circuit breaker of ``shard`` is now in ``state``."""


class Observers(Observer):
    """Several observers as one (e.g. Prometheus metrics and OpenTelemetry spans).

    Each event goes to every observer, in the order given.
    """

    def __init__(self, *observers: Observer) -> None:
        for observer in observers:
            if not isinstance(observer, Observer):
                raise ConfigError(
                    "observers", f"must be ratequota.Observer, got {type(observer).__name__}"
                )
        self.observers = observers

    def decision(self, event: DecisionEvent) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.decision(event)

    def redis_call(self, shard: str, call: str, seconds: float, ok: bool) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.redis_call(shard, call, seconds, ok)

    def lease_held(self, lease: LeaseInfo) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.lease_held(lease)

    def lease_ended(self, lease: LeaseInfo) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.lease_ended(lease)

    def lease_lost(self, lease: LeaseInfo, cause: LostCause) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.lease_lost(lease, cause)

    def renewal(self, lease: LeaseInfo, result: RenewalResultName) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.renewal(lease, result)

    def breaker(self, shard: str, state: BreakerStateName) -> None:
        """Tell every observer."""
        for observer in self.observers:
            observer.breaker(shard, state)
