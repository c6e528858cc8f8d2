"""The synchronous client: a thin shell that performs the core's flows with redis-py.

All decisions live in ``ratequota.clients.core`` and ``ratequota.clients.shell``; this module
only sends, receives and sleeps. It is safe to share one client between
threads: redis-py's pool hands each thread its own connection (waiting at
most ``socket_timeout`` for a free one), and the few locks behind it (circuit
breakers, failure counters, the renewal schedule) guard plain data and are
never held across a network call or a sleep. Held leases are renewed by one
daemon thread per client (``ratequota.clients.renewal``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs

from ratequota.clients import probes
from ratequota.clients.backends import (
    CALL_ERRORS,
    Backend,
    ClusterBackend,
    ShardedBackend,
    SyncShards,
    embedded_backend,
    pipelined,
    pipelined_commands,
    routes_itself,
    url_backend,
)
from ratequota.clients.explain import Explanation, explain_flow
from ratequota.clients.failure import log
from ratequota.clients.readiness import ReadinessReport
from ratequota.clients.renewal import ThreadRenewer
from ratequota.clients.requests import (
    AcquireOptions,
    AcquireRequest,
    LimitOptions,
    MeterOptions,
    TenantSpec,
    TryOptions,
    UnitsSpec,
    meter_amounts,
)
from ratequota.clients.shell import RELEASE_ERRORS, AcquisitionBase, ClientBase, LeaseBase
from ratequota.clients.usage import When, usage_flow
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    MeterSettlement,
    ReleaseResult,
    RenewResult,
    UsageRow,
)
from ratequota.engine.ops import (
    Batch,
    Commands,
    Compute,
    Flow,
    ScriptCall,
    Sleep,
    Spawn,
    pipeline_args,
    wire_call,
)
from ratequota.errors import InvalidType
from ratequota.policy import Policy

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Acquisition", "Lease", "QuotaClient"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@attrs.define(eq=False)
class Lease(LeaseBase):
    """A held lease (see ``LeaseBase``) that renews and releases through its client."""

    _client: QuotaClient = attrs.field(kw_only=True, repr=False)

    def renew(self, ttl: float | None = None) -> RenewResult:
        """Extend the lease by ``ttl`` seconds from now; marks it lost if it had expired."""
        return self.renewed(self._client.renew(self.info, ttl))

    def release(self, **actuals: Unpack[MeterOptions]) -> ReleaseResult:
        """Give the units back (and stop renewing); harmless when called twice.

        Meter amounts (``tokens=actual``) settle the lease first (``settle``).
        """
        self._client.renewer.drop(self)
        return self.ended(self._client.release(self.info, **actuals))

    def settle(self, **actuals: Unpack[MeterOptions]) -> tuple[MeterSettlement, ...]:
        """Charge the rate meters what the work really used (``tokens=actual``), once."""
        return self._client.settle(self.info, **actuals)


class Acquisition(AcquisitionBase[Lease]):
    """``with quota.acquire(...) as lease``: waits on entry, releases on exit, errors included.

    Leaving never raises because the release failed (Redis unreachable, out of
    memory, an error reply): the lease then ends by itself at its TTL, the
    failure is counted and logged, and the handler's own outcome is what the
    caller sees.
    """

    def __init__(self, client: QuotaClient, request: AcquireRequest) -> None:
        super().__init__(client, request, Lease)

    def __enter__(self) -> Lease:
        return self._granted(self._client._run(self._acquire_flow()))

    async def __aenter__(self) -> Lease:
        raise _not_async("quota.acquire(...)")

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        return None

    def __exit__(self, *exc_info: object) -> None:
        lease = self._leaving()
        if lease is not None:
            try:
                lease.release()
            except RELEASE_ERRORS as exc:
                self._release_failed(lease, exc)


def _not_async(what: str) -> InvalidType:
    """The error for ``async with`` on the blocking client: name the one to use instead."""
    return InvalidType(
        "async with",
        f"{what} belongs to the blocking QuotaClient; use `with {what}`, or "
        "ratequota.AsyncQuotaClient for `async with`",
    )


def _one_of_batch(conn: Any, args: tuple[Any, ...]) -> Any:
    """One call of a batch sent alone; an error reply is returned, as a pipeline would.

    Redis Cluster clients cannot pipeline EVALSHA (and redis-py's cluster
    pipeline would re-send timed-out commands), so their batches go call by call.
    """
    try:
        return conn.evalsha(*args)
    except CALL_ERRORS as exc:
        return exc


class QuotaClient(ClientBase):
    """Tenant quota against Redis, for threads; see ``AsyncQuotaClient`` for asyncio.

    With no URL it runs on an embedded in-process fakeredis shared by every
    client of the process, so ``QuotaClient()`` works with nothing installed.
    """

    embedded_backend = staticmethod(embedded_backend)
    url_backend = staticmethod(url_backend)
    sharded_backend = ShardedBackend
    cluster_backend = ClusterBackend
    connection_settings = ("max_connections",)

    backend: Backend

    def _start(self) -> None:
        # No I/O here: connections open on first use, and a script missing on a server is
        # loaded by the first call that meets its NOSCRIPT (or up front by ``with`` / check()).
        self.renewer = ThreadRenewer(self)
        #: The backend script calls were last sent on, and how (``_script_sender``).
        self._sender: tuple[object, Callable[[ScriptCall], Any]] = (None, self._evalsha)

    def close(self) -> None:
        """Stop the renewer and close connections; the client cannot be used afterwards."""
        self.renewer.close()
        self.backend.close()

    def __enter__(self) -> QuotaClient:
        """Load the scripts on every server now (an unreachable one is tolerated)."""
        self.load_scripts(strict=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> QuotaClient:
        raise _not_async("QuotaClient")

    async def __aexit__(self, *exc: object) -> None:  # pragma: no cover - never entered
        return None

    # -- driving flows -----------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        return self._runner(flow).run(self._perform)

    def _perform(self, op: Any) -> Any:
        if type(op) is ScriptCall:  # the hot path: one EVALSHA
            backend, send = self._sender
            if backend is not self.backend:  # the first call, or a backend swapped in since
                backend = self.backend
                self._sender = backend, send = backend, self._script_sender(backend)
            return send(op)
        if isinstance(op, Sleep):
            return self.core.clock.sleep(op.seconds)
        if isinstance(op, Compute):
            return op.function()
        if isinstance(op, Spawn):
            threading.Thread(
                target=self._run_detached, args=(op.flow,), name="ratequota-catalog", daemon=True
            ).start()
            return None
        conn = self.backend.connection(op.route)
        if isinstance(op, Commands):
            return pipelined_commands(conn, op.commands)
        if isinstance(op, Batch):
            if not getattr(self.backend, "pipelines", True):
                return [_one_of_batch(conn, args) for args in pipeline_args(op)]
            return pipelined(conn, pipeline_args(op))
        method, args = wire_call(op)
        return getattr(conn, method)(*args)

    def _script_sender(self, backend: object) -> Callable[[ScriptCall], Any]:
        """How one script call is sent on ``backend``: pre-packed on the backends made from
        URLs (``SyncShards.send_script``), else ``connection(route).evalsha``, so a backend
        that wraps or overrides ``connection`` (a simulation counting calls) sees every call."""
        if routes_itself(backend, SyncShards):
            return backend.send_script
        return self._evalsha

    def _evalsha(self, op: ScriptCall) -> Any:
        return self.backend.connection(op.route).evalsha(*op.wire)

    def _run_detached(self, flow: Flow[None]) -> None:
        """Run a spawned flow to its end in this thread; a bug is logged, never lost silently."""
        try:
            self._run(flow)
        except Exception:
            log.exception("ratequota: a background flow failed")

    def load_scripts(self, *, strict: bool = True) -> None:
        """Load every script on every server; ``strict=False`` tolerates an unreachable one.

        At start-up a server that is down is not fatal: the first call after
        it comes back loads the scripts through the NOSCRIPT path.
        """
        probes.run(self._load_rounds(strict))

    def check(
        self, groups: Iterable[str] | None = None, *, allow_degraded: bool = False
    ) -> ReadinessReport:
        """Readiness of every shard: may this pod take traffic? (see ``clients.readiness``).

        ``groups`` are the groups this pod serves (default: every published
        group). Missing scripts are loaded on the way, as a NOSCRIPT would.
        Never raises for an unreachable shard: that is reported.
        """
        nodes, node_of = probes.targets(self.backend)
        return probes.run(self._check_rounds(nodes, node_of, groups, allow_degraded))

    # -- policy ------------------------------------------------------------

    def apply_policy(self, policy: Policy | str | Path, *, migrate: bool = False) -> dict[str, int]:
        """Publish a policy (or a TOML file of one) for every pod; returns versions per group.

        ``migrate`` takes groups over from pods of the previous release still serving them in
        the previous key layout (their live leases move along; those pods then refuse the
        group). Without it such a group raises ``LegacyLayout``: see docs/deployment.md.
        """
        return self._run(self._publish(policy, migrate))

    def load_policy(self) -> Policy | None:
        """The published policy, or None; also refreshes this client's routing."""
        return self._run(self.core.load_policy())

    # -- leases ------------------------------------------------------------

    def try_acquire(self, tenant: str, units: int = 1, **options: Unpack[TryOptions]) -> Decision:
        """Decide now, never wait (options: ``TryOptions``); release an admitted lease."""
        return self._run(self.core.try_acquire(self.core.request(tenant, units, **options)))

    def acquire(
        self, tenant: str, units: int = 1, **options: Unpack[AcquireOptions]
    ) -> Acquisition:
        """A context manager holding a lease, renewed while held; waits up to ``timeout``.

        Options are ``group``, ``ttl``, ``timeout`` and ``request_id``
        (``AcquireOptions``). Raises ``RequestTooLarge`` at once for a request
        that can never fit, ``AcquireTimeout`` when still refused at the
        deadline. Arguments are validated here, before anything touches Redis.
        """
        return Acquisition(self, self.core.request(tenant, units, **options))

    def release(self, lease: LeaseInfo | Lease, **actuals: Unpack[MeterOptions]) -> ReleaseResult:
        """End a lease; idempotent, and says whether it was still live.

        Fenced: the release names the lease's tenant and token, so it can only
        end that very lease (state ``"fenced"`` otherwise, counted in ``stats()``).
        Meter amounts (``tokens=actual``) settle the lease first (``settle``).
        """
        info = lease.info if isinstance(lease, Lease) else lease
        return self._run(self.core.release(info, meter_amounts(**actuals) if actuals else None))

    def settle(
        self, lease: LeaseInfo | Lease, **actuals: Unpack[MeterOptions]
    ) -> tuple[MeterSettlement, ...]:
        """Reserve, then settle (docs/rates.md): charge the actual amounts a lease used.

        ``tokens=actual`` (or ``requests=``, or ``meters={name: actual}``)
        charges ``actual - estimate`` to the buckets the admission charged: a
        refund, or a debt repaid before the tenant's next admission. Exactly
        once per lease and meter: a repeat answers ``replay`` (or ``conflict``
        for another amount), a lease that ended answers ``closed`` and keeps
        its estimate. Amounts are checked before Redis is touched.
        """
        info = lease.info if isinstance(lease, Lease) else lease
        return self._run(self.core.settle(info, meter_amounts(**actuals)))

    def renew(self, lease: LeaseInfo | Lease, ttl: float | None = None) -> RenewResult:
        """Extend a live lease; reports whether its tenant is above its fair limit.

        Never shorter: a lease with more than ``ttl`` left keeps its expiry.

        Fenced like ``release``. A ttl above the group's max_lease_ttl is
        clamped (``RenewResult.ttl`` says what was granted). While the group
        recovers from lost Redis state, the renewal re-asserts the lease.
        """
        info = lease.info if isinstance(lease, Lease) else lease
        return self._run(self.core.renew(info, ttl))

    def snapshot(self, group: str, tenants: Iterable[str] = ()) -> GroupSnapshot:
        """Per-tenant used/limit/pending/borrowed and the group's totals, at one moment."""
        return self._run(self.core.snapshot(group, tenants))

    def usage(
        self, group: str, *, since: When | None = None, until: When | None = None
    ) -> list[UsageRow]:
        """What each tenant of ``group`` used, per hour, from the usage ledger (docs/usage.md).

        ``since`` / ``until``: epoch seconds, a datetime (naive: UTC) or a timedelta before
        now; by default the last 24 hours. One row per tenant and hour with something
        recorded: unit·seconds and leases of the leases that ended in it, refusals by reason.
        """
        return self._run(usage_flow(self.core, group, since, until))

    def explain(
        self, tenant: str, units: int | None = None, *, group: str | None = None
    ) -> Explanation:
        """Why ``tenant`` has its limit now, and whether ``units`` more would be admitted.

        Reads one snapshot; the rule is replayed by the pure reference
        (``ratequota.clients.explain``): bounds, the deciding bound, borrowing and lenders.
        """
        return self._run(explain_flow(self.core, tenant, units, group=group))

    def limit(
        self, *, tenant: TenantSpec, units: UnitsSpec = 1, **options: Unpack[LimitOptions]
    ) -> Callable[[F], F]:
        """Decorate a handler so each call holds a lease while it runs.

        ``tenant`` and ``units`` (and meter estimates such as ``tokens``) are
        callables receiving the handler's arguments, names of its parameters,
        or constants. ``async def`` handlers are supported: the blocking
        acquire runs in a worker thread so the event loop never blocks.
        """

        def decorate(handler: F) -> F:
            acquisition = self._acquisition_of(handler, tenant, units, options)

            if inspect.iscoroutinefunction(handler):

                @functools.wraps(handler)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    held = acquisition(*args, **kwargs)
                    await asyncio.to_thread(held.__enter__)
                    try:
                        return await handler(*args, **kwargs)
                    finally:
                        await asyncio.to_thread(held.__exit__, None, None, None)

                return cast(F, async_wrapper)

            @functools.wraps(handler)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with acquisition(*args, **kwargs):
                    return handler(*args, **kwargs)

            return cast(F, wrapper)

        return decorate
