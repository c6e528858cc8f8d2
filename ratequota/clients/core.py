"""The client logic shared by the sync and async clients, written without I/O.

Every operation is a *flow*: a generator that yields what it needs done — a
script call, a plain Redis command, a sleep — and receives the result. The
sync client drives flows with blocking calls, the async client with awaits;
neither holds any logic of its own (the httpcore/h11 "sans-I/O" pattern).
Errors met while performing an operation are thrown back into the flow, so
decisions such as "retry once after a stale route" live here too.

Nothing here takes a lock: the only mutable state is the routing catalog,
replaced whole by a single assignment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import threading
from collections.abc import Generator, Iterable, Mapping
from typing import Any, TypeVar

import attrs

from ratequota.clients.failure import FAILURE_MODES, Breakers, FailureMode, FailureState
from ratequota.clock import Clock, SystemClock
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    ReleaseResult,
    RenewResult,
)
from ratequota.engine.keys import SCHEMA_VERSION, KeySpace
from ratequota.engine.protocol import (
    ScriptCall,
    acquire_call,
    apply_policy_call,
    decode_acquire,
    decode_apply_policy,
    decode_release,
    decode_renew,
    decode_snapshot,
    release_call,
    renew_call,
    snapshot_call,
)
from ratequota.errors import (
    AcquireTimeout,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    InvalidType,
    PolicyMissing,
    QuotaExceeded,
    RequestIdConflict,
    RequestTooLarge,
    SchemaMismatch,
    UnknownTenant,
)
from ratequota.observe import DecisionEvent, DecisionResult, Observer
from ratequota.policy import MAX_LEASE_TTL_LIMIT, MAX_UNITS, Policy

__all__ = ["AcquireRequest", "Command", "Flow", "Op", "QuotaCore", "Settings", "Sleep"]

T = TypeVar("T")

#: Shadow-mode admissions are logged here (INFO), one line per admission.
shadow_log = logging.getLogger("ratequota.shadow")


@attrs.frozen
class Sleep:
    """Wait ``seconds`` before resuming the flow (always bounded by a deadline)."""

    seconds: float


@attrs.frozen
class Command:
    """A plain Redis command on the shard that ``route`` maps to."""

    route: str
    args: tuple[str | int, ...]


Op = ScriptCall | Command | Sleep
Flow = Generator[Op, Any, T]

#: Backoff between tries of a waiting acquire: from the first to the last, doubling.
_FIRST_PAUSE = 0.005
_LAST_PAUSE = 0.2


def _positive_seconds(field: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(field, f"must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        low = ">= 0" if allow_zero else "> 0"
        raise InvalidRequest(field, f"must be a finite number of seconds {low}, got {value!r}")
    return seconds


def _setting_seconds(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    try:
        _positive_seconds(attribute.name, value)
    except InvalidRequest as exc:
        raise ConfigError(attribute.name, str(exc).split(": ", 1)[1]) from None


def _setting_count(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(attribute.name, f"must be an integer >= 1, got {value!r}")


def _setting_mode(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in FAILURE_MODES:
        raise ConfigError(attribute.name, f"must be one of {FAILURE_MODES}, got {value!r}")


def _setting_allowance(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(attribute.name, f"must be an integer >= 0, got {value!r}")


def _setting_flag(_instance: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(attribute.name, f"must be True or False, got {value!r}")


def _setting_fraction(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not 0.05 <= float(value) <= 0.9:  # type: ignore[arg-type]
        raise ConfigError(attribute.name, f"must be a number from 0.05 to 0.9, got {value!r}")


@attrs.frozen
class Settings:
    """Per-client settings; every one has a safe default.

    ``lease_ttl``: lifetime of a lease unless renewed. ``timeout``: how long
    ``acquire`` waits by default. ``pending_ttl``: how long a refused, waiting
    request keeps its demand registered without retrying. ``purge_limit``:
    most expired entries one call cleans up (bounds each script's work).
    ``catalog_ttl``: how often tenant-to-group routing is re-read.
    ``socket_timeout``: every Redis call's timeout.

    Failure policy (§8, see ``ratequota.clients.failure``): ``failure_mode`` is
    ``"closed"`` (raise ``BackendUnavailable``), ``"open"`` (admit with a
    synthetic lease, counted) or ``"local"`` (admit up to ``local_allowance``
    units per tenant held locally at once). ``breaker_failures`` consecutive
    failures open a shard's circuit breaker; after ``breaker_reset`` seconds
    one probe call may close it again.

    Renewal: with ``auto_renew`` leases held by ``acquire`` and ``limit`` are
    renewed every ``renew_fraction`` of their TTL, measured on the client's
    clock: by a background thread (task) unless ``renew_in_background`` is
    False, in which case the holder calls ``quota.renewer.renew_due()`` (tests on
    a ``ManualClock`` do, so renewal happens exactly when they say).
    ``batch_size`` / ``batch_in_flight``: the async client pipelines up to
    ``batch_size`` concurrent script calls per shard into one round trip, with
    at most ``batch_in_flight`` such round trips per shard at once.
    """

    prefix: str = "rq"
    lease_ttl: float = attrs.field(default=60.0, validator=_setting_seconds)
    timeout: float = attrs.field(default=10.0, validator=_setting_seconds)
    pending_ttl: float = attrs.field(default=2.0, validator=_setting_seconds)
    purge_limit: int = attrs.field(default=64, validator=_setting_count)
    catalog_ttl: float = attrs.field(default=5.0, validator=_setting_seconds)
    socket_timeout: float = attrs.field(default=1.0, validator=_setting_seconds)
    failure_mode: FailureMode = attrs.field(default="closed", validator=_setting_mode)
    local_allowance: int = attrs.field(default=0, validator=_setting_allowance)
    breaker_failures: int = attrs.field(default=3, validator=_setting_count)
    breaker_reset: float = attrs.field(default=0.5, validator=_setting_seconds)
    auto_renew: bool = attrs.field(default=True, validator=_setting_flag)
    renew_in_background: bool = attrs.field(default=True, validator=_setting_flag)
    renew_fraction: float = attrs.field(default=1 / 3, validator=_setting_fraction)
    batch_size: int = attrs.field(default=64, validator=_setting_count)
    batch_in_flight: int = attrs.field(default=2, validator=_setting_count)

    def __attrs_post_init__(self) -> None:
        if self.pending_ttl < 2 * _LAST_PAUSE:
            raise ConfigError(
                "pending_ttl", f"must be at least {2 * _LAST_PAUSE}s, longer than a retry pause"
            )
        if self.lease_ttl > MAX_LEASE_TTL_LIMIT:
            raise ConfigError("lease_ttl", f"must be at most {MAX_LEASE_TTL_LIMIT:g}s")
        # Scripts unpack() these many values at once; Lua's C stack holds a few thousand.
        for name in ("purge_limit", "batch_size"):
            if getattr(self, name) > 1000:
                raise ConfigError(name, f"must be at most 1000, got {getattr(self, name)}")
        if self.failure_mode == "local" and self.local_allowance < 1:
            raise ConfigError("local_allowance", "must be >= 1 when failure_mode is 'local'")


@attrs.frozen
class AcquireRequest:
    """A validated acquire: what to ask for, under which id, for how long, waiting how long."""

    tenant: str
    units: int
    group: str | None
    lease_id: str
    ttl_ms: int
    timeout: float


@attrs.frozen
class _Catalog:
    """Tenant-to-group routing as last read from Redis (or set by apply_policy)."""

    policy: Policy | None
    routes: Mapping[str, str]
    loaded_at: float

    @classmethod
    def of(cls, policy: Policy | None, loaded_at: float) -> _Catalog:
        routes = (
            {} if policy is None else {t.name: g.name for g in policy.groups for t in g.tenants}
        )
        return cls(policy, routes, loaded_at)


def validate_tenant(tenant: object, field: str = "tenant") -> str:
    """A tenant (or group) name: a non-empty ``str``."""
    if not isinstance(tenant, str):
        raise InvalidType(field, f"must be a string, got {type(tenant).__name__}")
    if not tenant:
        raise InvalidRequest(field, "must not be empty")
    return tenant


def validate_units(units: object) -> int:
    """Units of a request: an ``int`` (not bool, not float, not str) >= 1."""
    if isinstance(units, bool) or not isinstance(units, int):
        raise InvalidType("units", f"must be an integer, got {units!r}")
    if units < 1:
        raise InvalidRequest("units", f"must be >= 1, got {units}")
    if units > MAX_UNITS:
        raise InvalidRequest("units", f"must be at most 2**50 ({MAX_UNITS}), got {units}")
    return units


def validate_request_id(request_id: object) -> str:
    """A caller-chosen request id, used as the lease id (idempotent retries)."""
    if not isinstance(request_id, str):
        raise InvalidType("request_id", f"must be a string, got {type(request_id).__name__}")
    if not request_id or len(request_id) > 200:
        raise InvalidRequest("request_id", "must be 1 to 200 characters")
    return request_id


class QuotaCore:
    """Validation, routing and every flow; one instance per client."""

    def __init__(
        self,
        settings: Settings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        self.keyspace = KeySpace(prefix=self.settings.prefix)
        self._catalog = _Catalog.of(None, -math.inf)
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
        self._fenced = 0
        self._fenced_lock = threading.Lock()  # guards _fenced only; never held across I/O
        #: Shadow mode of the policy last read, indexed (replaced whole, by one assignment).
        self._shadow = _ShadowIndex.of(None)

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
        seconds = self.settings.lease_ttl if ttl is None else _positive_seconds("ttl", ttl)
        if seconds > MAX_LEASE_TTL_LIMIT:
            raise InvalidRequest("ttl", f"must be at most {MAX_LEASE_TTL_LIMIT:g}s")
        return max(1, round(seconds * 1000))

    def timeout_seconds(self, timeout: float | None) -> float:
        """How long a waiting acquire may wait (None: the client's default)."""
        if timeout is None:
            return self.settings.timeout
        return _positive_seconds("timeout", timeout, allow_zero=True)

    @staticmethod
    def new_request_id() -> str:
        """A fresh request id: random, so concurrent pods never collide."""
        return os.urandom(16).hex()

    # -- routing -------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        """The policy this client last read or published, if any."""
        return self._catalog.policy

    def set_policy(self, policy: Policy | None) -> None:
        """Route by ``policy`` from now on (after publishing or reading it)."""
        self._catalog = _Catalog.of(policy, self.clock.monotonic())

    def _read_catalog(self) -> Flow[Policy | None]:
        raw = yield Command(self.keyspace.catalog_route, ("GET", self.keyspace.catalog))
        policy = parse_catalog(raw)
        self.set_policy(policy)
        return policy

    def group_of(self, tenant: str, group: str | None, *, refresh: bool = False) -> Flow[str]:
        """The group charged for ``tenant``: explicit, routed by the catalog, or the default."""
        if group is not None:
            return validate_tenant(group, "group")
        catalog = self._catalog
        stale = self.clock.monotonic() - catalog.loaded_at > self.settings.catalog_ttl
        fresh = refresh or stale
        if fresh:
            try:
                yield from self._read_catalog()
            except BackendUnavailable:
                # The catalog's shard is down: route by the last catalog read, so the
                # groups on the other shards keep working (the next call tries again).
                if catalog.policy is None:
                    raise
            catalog = self._catalog
        routed = catalog.routes.get(tenant)
        if routed is None and catalog.policy is not None:
            routed = catalog.policy.default_group
        if routed is None:
            raise UnknownTenant(
                tenant,
                published=catalog.policy is not None,
                catalog_ttl=None if fresh else self.settings.catalog_ttl,
            )
        return routed

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
    ) -> Flow[Decision]:
        """One acquire round trip; re-routes once if the catalog was stale.

        A group whose policy hash is gone although the policy still lists it
        (its Redis restarted empty, or failed over to an empty replica) gets its
        policy restored once, then the request is retried.
        """
        name = yield from self.group_of(tenant, group)
        if group is not None:
            yield from self._recheck_shadow()
        try:
            decision = yield from self._acquire_once(tenant, units, name, lease_id, ttl_ms, wait)
        except PolicyMissing:
            if not (yield from self._restore_policy(name)):
                raise
            decision = yield from self._acquire_once(tenant, units, name, lease_id, ttl_ms, wait)
        if decision.reason == "unknown_tenant" and group is None:
            # The tenant may have moved to another group since we read the catalog.
            fresh = yield from self.group_of(tenant, None, refresh=True)
            if fresh != name:
                name = fresh
                decision = yield from self._acquire_once(
                    tenant, units, name, lease_id, ttl_ms, wait
                )
        if decision.reason == "unknown_tenant":
            raise UnknownTenant(tenant, name)
        return decision

    def _restore_policy(self, group: str) -> Flow[bool]:
        """Republish ``group``'s policy after Redis lost it; False when it was removed on purpose.

        The published catalog is the authority: if it lists the group, its
        policy is written again (the same content, so every pod restoring it at
        once writes the same thing). If the catalog is gone too, the whole
        Redis lost its data, and this pod restores the policy it last knew. A
        catalog that exists but does not list the group means the group was
        dropped: nothing is restored.

        Leases granted before the loss may still be running, and Redis lost
        the record of them: the restored policy opens the group's recovery
        window (one ``max_lease_ttl``, the longest any of them can still
        live), during which holders re-assert their leases by renewing and
        new work is refused (docs/failure-modes.md).
        """
        raw = yield Command(self.keyspace.catalog_route, ("GET", self.keyspace.catalog))
        published = parse_catalog(raw)
        source = published if published is not None else self._catalog.policy
        group_policy = None if source is None else source.group(group)
        if source is None or group_policy is None:
            return False
        if published is None:
            # NX: never overwrite a catalog another pod (or an operator) has just written.
            document = catalog_document(source)
            yield Command(
                self.keyspace.catalog_route, ("SET", self.keyspace.catalog, document, "NX")
            )
        recover_ms = round(group_policy.max_lease_ttl * 1000)
        reply = yield apply_policy_call(
            self.keyspace, group_policy, recover_ms=recover_ms, now_ms=self.clock.redis_ms()
        )
        decode_apply_policy(group, reply)
        self.set_policy(source)
        return True

    def _acquire_once(
        self, tenant: str, units: int, group: str, lease_id: str, ttl_ms: int, wait: bool
    ) -> Flow[Decision]:
        call = acquire_call(
            self.keyspace,
            group,
            tenant,
            units,
            lease_id,
            ttl_ms,
            wait=wait,
            pending_ms=round(self.settings.pending_ttl * 1000),
            purge=self.settings.purge_limit,
            now_ms=self.clock.redis_ms(),
            shadow=self.in_shadow(group, tenant),
        )
        reply = yield call
        decision = decode_acquire(reply, group=group, tenant=tenant, units=units, lease_id=lease_id)
        if decision.shadow_refused:
            shadow_log.info("shadow mode: %s", decision.describe())
        return decision

    def _recheck_shadow(self) -> Flow[None]:
        """Re-read a stale policy that has shadow mode somewhere, for calls naming their group.

        Routing re-reads the policy every ``catalog_ttl``, but a call that
        names its group skips routing: without this, a pod that saw a group in
        shadow mode would keep admitting above its limits after the operator
        turned enforcement back on. A policy without shadow mode costs
        nothing here (a pod that never saw shadow mode enforces, the safe side).
        """
        catalog = self._catalog
        stale = self.clock.monotonic() - catalog.loaded_at > self.settings.catalog_ttl
        if stale and self._shadow_index().any:
            with contextlib.suppress(BackendUnavailable):  # keep the last policy read
                yield from self._read_catalog()

    def _shadow_index(self) -> _ShadowIndex:
        policy = self._catalog.policy
        index = self._shadow
        if index.policy is not policy:
            index = self._shadow = _ShadowIndex.of(policy)
        return index

    def in_shadow(self, group: str, tenant: str) -> bool:
        """Is ``tenant`` of ``group`` in shadow mode, by the policy this client last read?

        Shadow mode is set per group or per tenant in the policy: the decision
        runs in full, but a would-be refusal for the tenant's limit or the
        group's capacity admits (``Decision.shadow_refused``). A pod picks up
        a change with its routing, within ``catalog_ttl``.
        """
        index = self._shadow_index()
        if not index.any:
            return False
        if group in index.groups or (group, tenant) in index.tenants:
            return True
        # A tenant the group does not list is its default tenant.
        return group in index.defaults and self._catalog.routes.get(tenant) != group

    def request(
        self,
        tenant: str,
        units: int,
        *,
        group: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **unknown: object,
    ) -> AcquireRequest:
        """Validate an acquire's arguments (before any I/O) into a request.

        A misspelt option is reported by its name and the options that exist,
        never as a TypeError about this internal method.
        """
        if unknown:
            raise InvalidType(
                sorted(unknown)[0],
                "unexpected keyword argument (the options are group, ttl, timeout and request_id)",
            )
        return AcquireRequest(
            tenant=validate_tenant(tenant),
            units=validate_units(units),
            group=None if group is None else validate_tenant(group, "group"),
            lease_id=self.new_request_id()
            if request_id is None
            else validate_request_id(request_id),
            ttl_ms=self.ttl_ms(ttl),
            timeout=self.timeout_seconds(timeout),
        )

    def try_acquire(self, request: AcquireRequest) -> Flow[Decision]:
        """Admit now or refuse now; a refusal is a ``Decision``, not an exception."""
        if self.observer is None:
            return (yield from self._try_acquire(request))
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
                    r.tenant, r.units, r.group, r.lease_id, r.ttl_ms, wait=False
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
            now=self.clock.monotonic(),
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
        d = decision
        result: DecisionResult = "refused"
        reason: str = d.reason
        if d.lease is not None and d.lease.synthetic:
            result = "fallback_admitted"
            reason = "fail_open" if self.failure.mode == "open" else "local_allowance"
        elif d.shadow_refused:
            result = "shadow_admitted"
        elif d.admitted:
            result = "admitted"
        elif timed_out:
            result = "timed_out"
        synthetic = result == "fallback_admitted"
        self.observer.decision(
            DecisionEvent(
                group=d.group,
                tenant=d.tenant,
                units=d.units,
                result=result,
                reason=reason,
                used=None if synthetic else d.used,
                limit=d.limit,
                group_used=None if synthetic else d.group_used,
                capacity=d.capacity,
                guarantee=self._guarantee(d.group, d.tenant),
                waited=waited,
            )
        )

    def _observe_error(
        self,
        r: AcquireRequest,
        error: BackendUnavailable | UnknownTenant,
        *,
        waited: float | None = None,
    ) -> None:
        """Report an acquire that raised: the tenant is unknown, or Redis is unreachable."""
        assert self.observer is not None
        if isinstance(error, UnknownTenant):
            group = error.group or r.group or ""
            result: DecisionResult = "refused"
            reason = "unknown_tenant"
        else:
            group = r.group or self._catalog.routes.get(r.tenant, "")
            result, reason = "failed", "backend_unavailable"
        self.observer.decision(
            DecisionEvent(
                group=group,
                tenant=r.tenant,
                units=r.units,
                result=result,
                reason=reason,
                waited=waited,
            )
        )

    def _guarantee(self, group: str, tenant: str) -> int | None:
        policy = self._catalog.policy
        group_policy = None if policy is None else policy.group(group)
        tenant_policy = None if group_policy is None else group_policy.tenant(tenant)
        return None if tenant_policy is None else tenant_policy.guarantee

    def _acquire(self, request: AcquireRequest) -> Flow[Decision]:
        r = request
        started = self.clock.monotonic()
        deadline = started + r.timeout
        pause = _FIRST_PAUSE
        waiting = r.timeout > 0
        while True:
            try:
                decision = yield from self.attempt(
                    r.tenant, r.units, r.group, r.lease_id, r.ttl_ms, wait=waiting
                )
            except BackendUnavailable as exc:
                decision = self._fallback(exc, r)
            if decision.admitted:
                return decision
            if decision.reason == "too_large":
                raise RequestTooLarge(decision)
            if decision.reason == "id_mismatch":
                raise RequestIdConflict(decision)
            now = self.clock.monotonic()
            if now >= deadline:
                if waiting:
                    yield from self._withdraw(decision.group, r.lease_id, r.tenant)
                raise AcquireTimeout(decision, now - started)
            yield Sleep(min(deadline - now, _jittered(decision.retry_after, pause)))
            pause = min(pause * 2, _LAST_PAUSE)

    def _withdraw(self, group: str, lease_id: str, tenant: str) -> Flow[None]:
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

    def release(self, lease: LeaseInfo) -> Flow[ReleaseResult]:
        """End a lease; safe to call twice (the second reports ``unknown``).

        The lease is named by id, tenant and fencing token: a release naming
        another tenant's lease, or an older holder's token under a reused id,
        is refused as ``fenced``, changes nothing, and is counted.
        """
        _check_lease(lease)
        if lease.synthetic:  # granted locally while Redis was down: nothing to tell Redis
            self.failure.give_back(lease)
            return ReleaseResult(state="released", units=lease.units)
        reply = yield self._release_call(lease.group, lease.id, lease.tenant, lease.token)
        result = decode_release(reply)
        self.count_fenced(result.state == "fenced")
        return result

    def renew(self, lease: LeaseInfo, ttl: float | None = None) -> Flow[RenewResult]:
        """Extend a live lease by ``ttl`` from now (None: the client's lease_ttl).

        Fenced like ``release``. A group whose policy Redis lost gets it
        restored (which opens its recovery window), then the renewal re-asserts
        the lease.
        """
        _check_lease(lease)
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

    # -- policy ----------------------------------------------------------------

    def apply_policy(self, policy: Policy, *, migrate: bool = False) -> Flow[dict[str, int]]:
        """Publish every group's policy, then the routing catalog; returns versions.

        Each group switches atomically (one script). Groups dropped from the
        policy lose their policy hash, so their tenants are refused from then on.
        ``migrate``: take groups over from the previous release's key layout.
        """
        if not isinstance(policy, Policy):
            raise InvalidType("policy", f"must be a Policy, got {type(policy).__name__}")
        previous = yield from self._read_catalog()
        versions: dict[str, int] = {}
        for group in policy.groups:
            reply = yield apply_policy_call(self.keyspace, group, migrate=migrate)
            versions[group.name] = decode_apply_policy(group.name, reply)
        if previous is not None:
            for old in previous.groups:
                if policy.group(old.name) is None:
                    yield Command(old.name, ("DEL", self.keyspace.group(old.name).policy))
        yield Command(
            self.keyspace.catalog_route, ("SET", self.keyspace.catalog, catalog_document(policy))
        )
        self.set_policy(policy)
        return versions

    def load_policy(self) -> Flow[Policy | None]:
        """Read the published policy (and route by it from now on)."""
        return (yield from self._read_catalog())


@attrs.frozen
class _ShadowIndex:
    """Where ``policy`` has shadow mode: whole groups, (group, tenant) pairs, default tenants."""

    policy: Policy | None
    groups: frozenset[str]
    tenants: frozenset[tuple[str, str]]
    defaults: frozenset[str]

    @property
    def any(self) -> bool:
        """True when some group, tenant or default tenant is in shadow mode."""
        return bool(self.groups or self.tenants or self.defaults)

    @classmethod
    def of(cls, policy: Policy | None) -> _ShadowIndex:
        groups = () if policy is None else policy.groups
        return cls(
            policy,
            frozenset(g.name for g in groups if g.shadow),
            frozenset((g.name, t.name) for g in groups for t in g.tenants if t.shadow),
            frozenset(g.name for g in groups if g.default_tenant.shadow),
        )


def catalog_document(policy: Policy) -> str:
    """The catalog key's value for ``policy`` (read back by ``parse_catalog``)."""
    return json.dumps({"schema": SCHEMA_VERSION, "policy": policy.to_dict()})


def parse_catalog(raw: object) -> Policy | None:
    """The policy held by the catalog key's value (None if nothing is published)."""
    if raw is None:
        return None
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    document = json.loads(text)
    schema = int(document.get("schema", 0))
    if schema > SCHEMA_VERSION:
        raise SchemaMismatch("(catalog)", schema, SCHEMA_VERSION)
    return Policy.from_dict(document["policy"])


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


def _check_lease(lease: object) -> None:
    """A lease named by release/renew: the facts the scripts store back on re-assertion."""
    if not isinstance(lease, LeaseInfo):
        raise InvalidType("lease", f"must be a lease, got {type(lease).__name__}")
    validate_tenant(lease.tenant, "lease.tenant")
    token = lease.token
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise InvalidRequest("lease.token", f"must be an integer >= 0, got {token!r}")
    validate_units(lease.units)


def _jittered(hint: float, pause: float) -> float:
    """Next pause: the backoff step, shortened by the script's hint, with jitter.

    Jitter (50-100%) keeps many pods refused at once from retrying in lockstep.
    """
    base = min(pause, hint) if hint > 0 else pause
    return max(0.001, base * random.uniform(0.5, 1.0))
