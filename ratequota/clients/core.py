"""The client logic shared by the sync and async clients, written without I/O.

Every operation is a *flow*: a generator that yields what it needs done — a
script call, a plain Redis command, a sleep — and receives the result. The
sync client drives flows with blocking calls, the async client with awaits;
neither holds any logic of its own (the httpcore/h11 "sans-I/O" pattern).
Errors met while performing an operation are thrown back into the flow, so
decisions such as "retry once after a stale route" live here too.

The op types a flow yields are in ``ratequota.engine.ops``, the one runner
that steps a flow in ``ratequota.clients.runner``. Routing and the policy
(catalog refresh, restore, publish, shadow mode) are ``Router``'s, which
``QuotaCore`` extends; ``Settings`` and argument validation have modules of
their own. No lock here is ever held across I/O.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ratequota.clients.failure import Breakers, FailureState, synthetic_renewal
from ratequota.clients.metering import settle_flow
from ratequota.clients.reports import decision_event, error_event
from ratequota.clients.requests import (
    AcquireRequest,
    acquire_request,
    check_lease,
    lease_ttl_ms,
    new_request_id,
    plain_request,
    validate_tenant,
)
from ratequota.clients.router import Router
from ratequota.clients.settings import FIRST_PAUSE, LAST_PAUSE, Settings
from ratequota.clock import Clock, SystemClock
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    MeterSettlement,
    ReleaseResult,
    RenewResult,
)
from ratequota.engine.ops import Flow, ScriptCall, Sleep
from ratequota.engine.protocol import acquire_call, release_call, renew_call, snapshot_call
from ratequota.engine.replies import (
    decode_acquire,
    decode_release,
    decode_renew,
    decode_snapshot,
)
from ratequota.errors import (
    AcquireTimeout,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    PolicyMissing,
    QuotaExceeded,
    RequestIdConflict,
    RequestTooLarge,
    UnknownTenant,
)
from ratequota.observe import Observer

__all__ = ["QuotaCore"]

#: Shadow-mode admissions are logged here (INFO), one line per admission.
shadow_log = logging.getLogger("ratequota.shadow")


class QuotaCore(Router):
    """Validation and every lease flow (routing comes from ``Router``); one per client."""

    def __init__(
        self,
        settings: Settings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
    ) -> None:
        super().__init__(settings or Settings(), clock or SystemClock())
        if observer is not None and not isinstance(observer, Observer):
            raise ConfigError(
                "observer", f"must be a ratequota.Observer, got {type(observer).__name__}"
            )
        #: Told of every decision, Redis call, held lease... (None: nothing is measured).
        self.observer = observer
        s = self.settings
        self.breakers = Breakers(
            s.breaker_failures,
            s.breaker_reset,
            self.clock.monotonic,
            listener=None if observer is None else observer.breaker,
        )
        self.failure = FailureState(s.failure_mode, s.local_allowance, s.lease_ttl)
        #: How long a waiting request's units count as demand, ms (``Settings.pending_ttl``).
        self._pending_ms = round(s.pending_ttl * 1000)
        self._fenced = 0
        self._fenced_lock = threading.Lock()  # guards _fenced only; never held across I/O
        #: Hears the flow withdrawing the waiting registration of an ``acquire`` its caller
        #: abandoned (the async client runs it in the background; None: the registration
        #: lapses by itself after ``pending_ttl``).
        self.on_abandon: Callable[[Flow[None]], None] | None = None

    @property
    def fenced_refusals(self) -> int:
        """Releases and renewals refused because the lease belongs to another tenant or token."""
        with self._fenced_lock:
            return self._fenced

    def count_fenced(self, refused: bool) -> None:
        """Count one release or renewal the scripts refused as fenced."""
        if refused:
            with self._fenced_lock:
                self._fenced += 1

    # -- validation ----------------------------------------------------------

    def ttl_ms(self, ttl: float | None) -> int:
        """Lease lifetime in ms from seconds (None: the client's default)."""
        return lease_ttl_ms(self.settings, ttl)

    new_request_id = staticmethod(new_request_id)

    # -- acquire -------------------------------------------------------------

    def attempt(
        self,
        tenant: str,
        units: int,
        group: str | None,
        lease_id: str,
        ttl_ms: int,
        *,
        wait: bool,
        meters: Mapping[str, int] | None = None,
    ) -> Flow[Decision]:
        """One acquire round trip; re-routes once if the catalog was stale.

        ``meters``: rate-meter amounts decided with the lease (docs/rates.md). A
        group whose policy hash is gone although the policy still lists it (its
        Redis restarted empty, or failed over to an empty replica) gets its
        policy restored once, then the request is retried. A group dropped on
        purpose sends a routed request to the tenant's group in the catalog
        just re-read.
        """
        routed = None if group is not None else self.routed(tenant)
        if routed is not None:  # the held catalog routes it: no flow to step
            name = routed
        else:
            name = yield from self.group_of(tenant, group)
            if group is not None:
                yield from self._recheck_shadow()
        try:
            # ``_acquire_once`` in line (the hot path: one generator frame fewer).
            reply = yield self._acquire_call(tenant, units, name, lease_id, ttl_ms, wait, meters)
            decision = self._decided(reply, tenant, units, name, lease_id, meters)
        except PolicyMissing:
            if not (yield from self._restore_policy(name)):
                if group is not None:
                    raise
                # Dropped on purpose: the catalog was just re-read, so route again (the
                # tenant may have moved to another group, or be gone: UnknownTenant).
                fresh = yield from self.group_of(tenant, None)
                if fresh == name:
                    raise
                name = fresh
            decision = yield from self._acquire_once(
                tenant, units, name, lease_id, ttl_ms, wait, meters
            )
        if decision.reason == "unknown_tenant" and group is None:
            # The tenant may have moved to another group since we read the catalog.
            fresh = yield from self.group_of(tenant, None, refresh=True)
            if fresh != name:
                name = fresh
                decision = yield from self._acquire_once(
                    tenant, units, name, lease_id, ttl_ms, wait, meters
                )
        if decision.reason == "unknown_tenant":
            raise UnknownTenant(tenant, name)
        return decision

    def _acquire_once(
        self,
        tenant: str,
        units: int,
        group: str,
        lease_id: str,
        ttl_ms: int,
        wait: bool,
        meters: Mapping[str, int] | None = None,
    ) -> Flow[Decision]:
        """One acquire round trip to ``group``: the call, then its decision."""
        reply = yield self._acquire_call(tenant, units, group, lease_id, ttl_ms, wait, meters)
        return self._decided(reply, tenant, units, group, lease_id, meters)

    def _acquire_call(
        self,
        tenant: str,
        units: int,
        group: str,
        lease_id: str,
        ttl_ms: int,
        wait: bool,
        meters: Mapping[str, int] | None,
    ) -> ScriptCall:
        return acquire_call(
            self.keyspace,
            group,
            tenant,
            units,
            lease_id,
            ttl_ms,
            wait=wait,
            pending_ms=self._pending_ms,
            purge=self.settings.purge_limit,
            now_ms=self.clock.redis_ms(),
            shadow=self.in_shadow(group, tenant),
            meters=meters,
        )

    def _decided(
        self,
        reply: Any,
        tenant: str,
        units: int,
        group: str,
        lease_id: str,
        meters: Mapping[str, int] | None,
    ) -> Decision:
        decision = decode_acquire(
            reply, group=group, tenant=tenant, units=units, lease_id=lease_id, meters=meters
        )
        if decision.shadow_refused:
            shadow_log.info("shadow mode: %s", decision.describe())
        return decision

    def request(self, tenant: str, units: int, **options: Any) -> AcquireRequest:
        """Validate an acquire's arguments (before any I/O) into a request."""
        if options:
            return acquire_request(self.settings, tenant, units, **options)
        return plain_request(self.settings, tenant, units)

    def try_acquire(self, request: AcquireRequest) -> Flow[Decision]:
        """Admit now or refuse now; a refusal is a ``Decision``, not an exception."""
        if self.observer is None:
            return self._try_acquire(request)  # no observer: one generator fewer to step
        return self._observed_try_acquire(request)

    def _observed_try_acquire(self, request: AcquireRequest) -> Flow[Decision]:
        try:
            decision = yield from self._try_acquire(request)
        except (BackendUnavailable, UnknownTenant) as exc:
            self._observe_error(request, exc)
            raise
        self._observe(decision)
        return decision

    def _try_acquire(self, request: AcquireRequest) -> Flow[Decision]:
        r = request
        try:
            return (
                yield from self.attempt(
                    r.tenant, r.units, r.group, r.lease_id, r.ttl_ms, wait=False, meters=r.meters
                )
            )
        except BackendUnavailable as exc:
            return self._fallback(exc, r)

    def _fallback(self, error: BackendUnavailable, r: AcquireRequest) -> Decision:
        """Redis is unreachable: apply the failure mode (raise, or a synthetic admission)."""
        group = r.group if r.group is not None else self._catalog.routes.get(r.tenant)
        return self.failure.fallback(
            error,
            tenant=r.tenant,
            units=r.units,
            group=group,
            lease_id=r.lease_id,
            now=self._wall_ms() / 1000,  # epoch seconds, as a real lease's Redis time
            ttl=r.ttl_ms / 1000,
        )

    def acquire(self, request: AcquireRequest) -> Flow[LeaseInfo]:
        """Wait up to the request's timeout for a lease; raise on refusal at the deadline.

        While waiting, the request's units are registered as pending demand
        (§3 step 2) so fair limits account for it; each retry refreshes the
        registration, and giving up withdraws it.
        """
        if self.observer is None:
            decision = yield from self._acquire(request)
        else:
            started = self.clock.monotonic()
            try:
                decision = yield from self._acquire(request)
            except QuotaExceeded as exc:
                timed_out = isinstance(exc, AcquireTimeout)
                waited = self.clock.monotonic() - started
                self._observe(exc.decision, waited=waited, timed_out=timed_out)
                raise
            except (BackendUnavailable, UnknownTenant) as exc:
                self._observe_error(request, exc, waited=self.clock.monotonic() - started)
                raise
            self._observe(decision, waited=self.clock.monotonic() - started)
        assert decision.lease is not None
        return decision.lease

    def _observe(
        self, decision: Decision, *, waited: float | None = None, timed_out: bool = False
    ) -> None:
        """Tell the observer an acquire's final outcome (the one place both clients report)."""
        assert self.observer is not None
        event = decision_event(
            decision,
            failure_mode=self.failure.mode,
            policy=self._catalog.policy,
            waited=waited,
            timed_out=timed_out,
        )
        self.observer.decision(event)

    def _observe_error(
        self,
        r: AcquireRequest,
        error: BackendUnavailable | UnknownTenant,
        *,
        waited: float | None = None,
    ) -> None:
        """Report an acquire that raised: the tenant is unknown, or Redis is unreachable."""
        assert self.observer is not None
        event = error_event(r, error, routes=self._catalog.routes, waited=waited)
        self.observer.decision(event)

    def _acquire(self, request: AcquireRequest) -> Flow[Decision]:
        """The waiting loop; a flow closed while it waits (its async caller was cancelled)
        withdraws the registration its refusals made, through ``on_abandon``."""
        r = request
        started = self.clock.monotonic()
        deadline = started + r.timeout
        pause = FIRST_PAUSE
        waiting = r.timeout > 0
        registered: str | None = None  # the group holding this request's waiting registration
        while True:
            try:
                decision = yield from self.attempt(
                    r.tenant, r.units, r.group, r.lease_id, r.ttl_ms, wait=waiting, meters=r.meters
                )
            except BackendUnavailable as exc:
                decision = self._fallback(exc, r)
            except GeneratorExit:
                self._abandoned(registered, r)
                raise
            if decision.admitted:
                return decision
            if decision.never_fits:
                raise RequestTooLarge(decision)
            if decision.reason == "id_mismatch":
                raise RequestIdConflict(decision)
            now = self.clock.monotonic()
            if now >= deadline:
                if waiting:
                    yield from self.withdraw(decision.group, r.lease_id, r.tenant)
                raise AcquireTimeout(decision, now - started)
            if waiting and decision.group:
                registered = decision.group
            try:
                yield Sleep(min(deadline - now, _jittered(decision.retry_after, pause)))
            except GeneratorExit:
                self._abandoned(registered, r)
                raise
            pause = min(pause * 2, LAST_PAUSE)

    def _abandoned(self, group: str | None, r: AcquireRequest) -> None:
        """Hand ``on_abandon`` the withdrawal of ``r``'s waiting registration in ``group``.

        The same withdrawal a timed-out acquire makes (a release with token 0:
        it ends no lease, only a waiting request of that id). A call in flight
        when the caller went is the client's to follow up (its reply may
        register: ``withdraw``).
        """
        if group is not None and self.on_abandon is not None:
            self.on_abandon(self.withdraw(group, r.lease_id, r.tenant))

    def withdraw(self, group: str, lease_id: str, tenant: str) -> Flow[None]:
        """Best effort: drop a waiting registration (it would expire by itself anyway)."""
        with contextlib.suppress(BackendUnavailable):
            yield self._release_call(group, lease_id, tenant, 0)

    # -- release / renew / snapshot -------------------------------------------

    def _release_call(self, group: str, lease_id: str, tenant: str, token: int) -> ScriptCall:
        return release_call(
            self.keyspace,
            group,
            lease_id,
            tenant=tenant,
            token=token,
            purge=self.settings.purge_limit,
            now_ms=self.clock.redis_ms(),
        )

    def settle(
        self, lease: LeaseInfo, actuals: Mapping[str, int]
    ) -> Flow[tuple[MeterSettlement, ...]]:
        """Charge a lease's rate meters the actual amounts it used (``metering.settle_flow``)."""
        return settle_flow(self.keyspace, self.clock, lease, actuals)

    def release(
        self, lease: LeaseInfo, actuals: Mapping[str, int] | None = None
    ) -> Flow[ReleaseResult]:
        """End a lease; safe to call twice (the second reports ``unknown``).

        The lease is named by id, tenant and fencing token: a release naming
        another tenant's lease, or an older holder's token under a reused id,
        is refused as ``fenced``, changes nothing, and is counted. ``actuals``
        (checked amounts) settle the lease's rate meters first (``settle``).
        """
        check_lease(lease)
        if actuals:
            yield from self.settle(lease, actuals)
        if lease.synthetic:  # granted locally while Redis was down: nothing to tell Redis
            self.failure.give_back(lease)
            return ReleaseResult(state="released", units=lease.units)
        reply = yield self._release_call(lease.group, lease.id, lease.tenant, lease.token)
        result = decode_release(reply)
        self.count_fenced(result.state == "fenced")
        return result

    def renew(self, lease: LeaseInfo, ttl: float | None = None) -> Flow[RenewResult]:
        """Extend a live lease by ``ttl`` from now (None: the client's lease_ttl).

        Never shorter: a lease with more than ``ttl`` left keeps its expiry. So any
        expiry a holder learned (a ``LeaseInfo`` kept from the acquire, say) is at most
        the true one, which the re-assert after a loss of Redis's data relies on.

        Fenced like ``release``. A group whose policy Redis lost gets it
        restored (which opens its recovery window), then the renewal re-asserts
        the lease.
        """
        check_lease(lease)
        if lease.synthetic:
            return synthetic_renewal(lease)
        try:
            reply = yield self.renew_call(lease, ttl)
            result = decode_renew(reply, group=lease.group)
        except PolicyMissing:
            if not (yield from self._restore_policy(lease.group)):
                raise
            reply = yield self.renew_call(lease, ttl)
            result = decode_renew(reply, group=lease.group)
        self.count_fenced(result.reason == "fenced")
        return result

    def renew_call(self, lease: LeaseInfo, ttl: float | None = None) -> ScriptCall:
        """The renew script call for ``lease`` (also batched by the background renewer)."""
        return renew_call(
            self.keyspace,
            lease,
            self.ttl_ms(ttl),
            purge=self.settings.purge_limit,
            now_ms=self.clock.redis_ms(),
        )

    def snapshot(
        self, group: str, tenants: Iterable[str] = (), *, max_leases: int = 1000
    ) -> Flow[GroupSnapshot]:
        """One consistent read of a group; ``tenants`` are reported even when idle."""
        group = validate_tenant(group, "group")
        names = [validate_tenant(t) for t in tenants]
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 0:
            raise InvalidRequest("max_leases", f"must be an integer >= 0, got {max_leases!r}")
        call = snapshot_call(
            self.keyspace, group, tenants=names, max_leases=max_leases, now_ms=self.clock.redis_ms()
        )
        reply = yield call
        return decode_snapshot(reply, group=group)


def _jittered(hint: float, pause: float) -> float:
    """Next pause: the backoff step, shortened by the script's hint, with jitter.

    Jitter (50-100%) keeps many pods refused at once from retrying in lockstep.
    """
    base = min(pause, hint) if hint > 0 else pause
    return max(0.001, base * random.uniform(0.5, 1.0))
