"""The asyncio client: the same flows as ``QuotaClient``, performed with awaits.

``AsyncQuotaClient`` has the sync client's API and semantics (``async with
quota.acquire(...)``, ``try_acquire``, ``release``, ``renew``, ``snapshot``,
``apply_policy``, ``load_policy``, the ``limit`` decorator on ``async def``
handlers). Every decision is taken by ``ratequota.clients.core`` and
``ratequota.clients.shell``; this module only sends, awaits and sleeps.

Two things are particular to it:

- concurrent script calls to one shard are pipelined into one round trip by a
  per-shard batcher (``ratequota.clients.batcher``), and
- held leases are renewed by one background task per client.

A client belongs to the event loop it is first used on (redis.asyncio
connections do); it is safe to share between the tasks of that loop. It
takes no lock across an await.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs

from ratequota.clients import probes, requests, shell
from ratequota.clients.async_backends import (
    AsyncBackend,
    AsyncClusterBackend,
    async_embedded_backend,
    async_sharded_backend,
    async_url_backend,
)
from ratequota.clients.backends import CALL_ERRORS, pipelined, pipelined_commands, routes_itself
from ratequota.clients.batcher import SOLO_IN_FLIGHT, ShardBatcher
from ratequota.clients.explain import Explanation, explain_flow
from ratequota.clients.failure import log
from ratequota.clients.readiness import ReadinessReport
from ratequota.clients.renewal import RenewerBase
from ratequota.clients.script_pipe import ScriptPipe
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
from ratequota.engine.batching import BatchPolicy
from ratequota.engine.ops import (
    Batch,
    Commands,
    Compute,
    Flow,
    ScriptCall,
    Sleep,
    Spawn,
    pipeline_args,
)
from ratequota.engine.replies import granted_lease, refused_waiting
from ratequota.errors import InvalidType, RateQuotaError
from ratequota.policy import Policy

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncAcquisition", "AsyncLease", "AsyncQuotaClient", "TaskRenewer"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@attrs.define(eq=False)
class AsyncLease(shell.LeaseBase):
    """A held lease (see ``shell.LeaseBase``) that renews and releases through its async client."""

    _client: AsyncQuotaClient = attrs.field(kw_only=True, repr=False)

    async def renew(self, ttl: float | None = None) -> RenewResult:
        """Extend the lease by ``ttl`` seconds from now; marks it lost if it had expired."""
        return self.renewed(await self._client.renew(self.info, ttl))

    async def release(self, **actuals: Unpack[requests.MeterOptions]) -> ReleaseResult:
        """Give the units back (and stop renewing); harmless when called twice.

        Meter amounts (``tokens=actual``) settle the lease first (``settle``).
        """
        self._client.renewer.drop(self)
        return self.ended(await self._client.release(self.info, **actuals))

    async def settle(self, **actuals: Unpack[requests.MeterOptions]) -> tuple[MeterSettlement, ...]:
        """Charge the rate meters what the work really used (``tokens=actual``), once."""
        return await self._client.settle(self.info, **actuals)


class AsyncAcquisition(shell.AcquisitionBase[AsyncLease]):
    """``async with quota.acquire(...) as lease``: waits on entry, releases on exit.

    The release is shielded, so a cancelled holder still gives its units back;
    a release that fails is counted and logged, never raised (as in the sync client).
    """

    def __init__(self, client: AsyncQuotaClient, request: requests.AcquireRequest) -> None:
        super().__init__(client, request, AsyncLease)

    async def __aenter__(self) -> AsyncLease:
        return self._granted(await self._client._run(self._acquire_flow()))

    async def __aexit__(self, *exc_info: object) -> None:
        lease = self._leaving()
        if lease is not None:
            try:  # as in the sync client: counted and logged, never raised over the handler
                await asyncio.shield(lease.release())
            except shell.RELEASE_ERRORS as exc:
                self._release_failed(lease, exc)


class TaskRenewer(RenewerBase):
    """The async client's renewer: one task on the client's loop, started on the first hold."""

    def __init__(self, client: AsyncQuotaClient) -> None:
        super().__init__(client)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def _wake_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._loop(self._wake))
        assert self._wake is not None
        self._wake.set()

    async def renew_due(self) -> int:
        """Renew every held lease due now; returns how many."""
        due = self._due()
        if due:
            try:
                outcomes = await self._client._run(self._flow(due))
            except Exception as exc:  # see RenewerBase._failed
                outcomes = self._failed(due, exc)
            self._settle(due, outcomes)
        return len(due)

    async def close(self) -> None:
        """Cancel the task and wait for it."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, wake: asyncio.Event) -> None:
        while True:
            wake.clear()
            if not await self.renew_due():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.book.wait())


class AsyncQuotaClient(shell.ClientBase):
    """Tenant quota against Redis, for asyncio; the same API as ``QuotaClient``, awaited.

    With no URL it runs on the embedded in-process fakeredis shared with every
    sync ``QuotaClient()`` of the process.
    """

    embedded_backend = staticmethod(async_embedded_backend)
    url_backend = staticmethod(async_url_backend)
    sharded_backend = staticmethod(async_sharded_backend)
    cluster_backend = AsyncClusterBackend

    backend: AsyncBackend

    def _start(self) -> None:
        s = self.core.settings
        self._policy = BatchPolicy(s.batch_size, s.batch_in_flight)
        self._batchers: dict[object, ShardBatcher] = {}
        # Each round trip's timeout, connection set-up included; a round trip that gets no
        # reply in time also fails the calls queued behind it (``ShardBatcher``).
        self._call_bound = s.socket_timeout
        self.renewer = TaskRenewer(self)
        self._background: set[asyncio.Task[None]] = set()  # spawned flows (catalog refresh)
        # A waiting acquire its caller abandons withdraws its registration in the background.
        self.core.on_abandon = self._abandon

    async def close(self) -> None:
        """Stop the renewer and background work, then close connections."""
        await self.renewer.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for batcher in list(self._batchers.values()):
            await batcher.aclose()
        await self.backend.close()

    async def _run_detached(self, flow: Flow[None]) -> None:
        """Run a spawned flow to its end as a task; a bug is logged, never lost silently."""
        try:
            await self._run(flow)
        except Exception:
            log.exception("ratequota: a background flow failed")

    async def __aenter__(self) -> AsyncQuotaClient:
        await self.load_scripts(strict=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- driving flows -----------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        run = self._runner(flow)
        try:
            while run.op is not None:
                await run.astep(self._perform)
        except asyncio.CancelledError:
            # Closed now, not whenever it is collected: a waiting acquire withdraws its
            # registration as it closes (``core.on_abandon``).
            flow.close()
            raise
        return run.result()

    def _perform(self, op: Any) -> Awaitable[Any]:
        """What to await to perform ``op``: a script call's future from its shard's batcher.

        Not a coroutine itself, so the hot path hands the runner the batcher's
        future as it is, one coroutine frame fewer per call.
        """
        if type(op) is ScriptCall:  # the hot path: one call, through the shard's batcher
            return self._batcher(op.route, self.backend.connection(op.route)).submit(op)
        return self._perform_other(op)

    def _orphaned(self, call: Any, reply: Any) -> None:
        """The reply of a caller cancelled while its call was queued or in flight (a timeout
        around the handler, a closed request): the call went out all the same, and a lease
        it was granted goes back now instead of holding its units, unused, until its expiry.
        """
        if type(call) is not ScriptCall:
            return
        lease = granted_lease(call, reply)
        if lease is not None:
            self._in_background(self._release_orphan(lease))
            return
        waiting = refused_waiting(call, reply)
        if waiting is not None:  # its refusal registered the units as waiting demand
            self._abandon(self.core.withdraw(call.route, *waiting))

    def _abandon(self, withdrawal: Flow[None]) -> None:
        """Withdraw an abandoned acquire's waiting registration, in the background (it would
        otherwise count as demand, lowering other tenants' limits, until ``pending_ttl``)."""
        self._in_background(self._run_detached(withdrawal))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_orphan(self, lease: LeaseInfo) -> None:
        try:
            await self.release(lease)
        except RateQuotaError as exc:  # Redis is down: the lease ends at its expiry
            log.info(
                "ratequota: a cancelled caller's lease %s ends at its expiry: %s", lease.id, exc
            )

    async def _perform_other(self, op: Any) -> Any:
        if isinstance(op, Sleep):
            return await self.core.clock.asleep(op.seconds)
        if isinstance(op, Compute):
            return await asyncio.to_thread(op.function)
        if isinstance(op, Spawn):
            task = asyncio.ensure_future(self._run_detached(op.flow))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return None
        conn = self.backend.connection(op.route)
        if isinstance(op, Commands):
            return await pipelined_commands(conn, op.commands)
        if isinstance(op, Batch):
            pipe = self._pipe_of(op.route)
            if pipe is not None:  # one write on the shard's own connection
                return await pipe.call_many(op.calls)
            calls = pipeline_args(op)
            if not getattr(self.backend, "pipelines", True):  # a cluster client
                replies: list[Any] = []
                for start in range(0, len(calls), SOLO_IN_FLIGHT):
                    chunk = calls[start : start + SOLO_IN_FLIGHT]
                    replies += await asyncio.gather(*(_one_of_batch(conn, a) for a in chunk))
                return replies
            return cast(list[Any], await pipelined(conn, calls))
        # Each round trip is bounded in the batcher; a cancelled caller just drops its future.
        return await self._batcher(op.route, conn).submit(op)

    def _pipe_of(self, route: str) -> ScriptPipe | None:
        """The pipe of ``route``'s shard (backends made from URLs), or None."""
        backend = self.backend
        if not routes_itself(backend, AsyncBackend):
            return None
        sender = backend.script_sender(route)
        return sender if isinstance(sender, ScriptPipe) else None

    def _batcher(self, route: str, conn: Any) -> ShardBatcher:
        node = self._node_of(route)
        batcher = self._batchers.get(node)
        if batcher is None:
            backend = self.backend
            pipelines = getattr(backend, "pipelines", True)
            # Pre-packed script calls on the backends made from URLs (``AsyncPackedScripts``);
            # never on one that wraps or overrides ``connection``: it must see every call.
            send = backend.script_sender(route) if routes_itself(backend, AsyncBackend) else None
            batcher = self._batchers[node] = ShardBatcher(
                conn,
                self._policy,
                pipelines=pipelines,
                bound=self._call_bound,
                send_script=send,
                orphaned=self._orphaned,
            )
        return batcher

    async def load_scripts(self, *, strict: bool = True) -> None:
        """Load every script on every server (``strict=False`` tolerates one that is down)."""
        await probes.arun(self._load_rounds(strict))

    async def check(
        self, groups: Iterable[str] | None = None, *, allow_degraded: bool = False
    ) -> ReadinessReport:
        """Readiness of every shard: may this pod take traffic? (as ``QuotaClient.check``)."""
        nodes, node_of = await probes.atargets(self.backend)
        return await probes.arun(self._check_rounds(nodes, node_of, groups, allow_degraded))

    # -- policy ------------------------------------------------------------

    async def apply_policy(
        self, policy: Policy | str | Path, *, migrate: bool = False
    ) -> dict[str, int]:
        """Publish a policy (or a TOML file of one) for every pod; as ``QuotaClient``'s."""
        return await self._run(self._publish(policy, migrate))

    async def load_policy(self) -> Policy | None:
        """The published policy, or None; also refreshes this client's routing."""
        return await self._run(self.core.load_policy())

    # -- leases ------------------------------------------------------------

    async def try_acquire(
        self, tenant: str, units: int = 1, **options: Unpack[requests.TryOptions]
    ) -> Decision:
        """Decide now, never wait (options: ``requests.TryOptions``); release an admitted lease."""
        return await self._run(self.core.try_acquire(self.core.request(tenant, units, **options)))

    def acquire(
        self, tenant: str, units: int = 1, **options: Unpack[requests.AcquireOptions]
    ) -> AsyncAcquisition:
        """``async with``: waits up to ``timeout`` on entry, releases on exit, renews between.

        Options and errors as for ``QuotaClient.acquire``; arguments are
        validated here, before anything touches Redis.
        """
        return AsyncAcquisition(self, self.core.request(tenant, units, **options))

    async def release(
        self, lease: LeaseInfo | AsyncLease, **actuals: Unpack[requests.MeterOptions]
    ) -> ReleaseResult:
        """End a lease; idempotent, and says whether it was still live.

        Fenced: the release names the lease's tenant and token, so it can only
        end that very lease (state ``"fenced"`` otherwise, counted in ``stats()``).
        Meter amounts (``tokens=actual``) settle the lease first (``settle``).
        """
        info = lease.info if isinstance(lease, AsyncLease) else lease
        amounts = requests.meter_amounts(**actuals) if actuals else None
        return await self._run(self.core.release(info, amounts))

    async def settle(
        self, lease: LeaseInfo | AsyncLease, **actuals: Unpack[requests.MeterOptions]
    ) -> tuple[MeterSettlement, ...]:
        """Reserve, then settle: charge the actual amounts a lease used (``QuotaClient.settle``)."""
        info = lease.info if isinstance(lease, AsyncLease) else lease
        return await self._run(self.core.settle(info, requests.meter_amounts(**actuals)))

    async def renew(self, lease: LeaseInfo | AsyncLease, ttl: float | None = None) -> RenewResult:
        """Extend a live lease; reports whether its tenant is above its fair limit.

        Never shorter: a lease with more than ``ttl`` left keeps its expiry.

        Fenced like ``release``. A ttl above the group's max_lease_ttl is
        clamped (``RenewResult.ttl`` says what was granted). While the group
        recovers from lost Redis state, the renewal re-asserts the lease.
        """
        info = lease.info if isinstance(lease, AsyncLease) else lease
        return await self._run(self.core.renew(info, ttl))

    async def snapshot(self, group: str, tenants: Iterable[str] = ()) -> GroupSnapshot:
        """Per-tenant used/limit/pending/borrowed and the group's totals, at one moment."""
        return await self._run(self.core.snapshot(group, tenants))

    async def usage(
        self, group: str, *, since: When | None = None, until: When | None = None
    ) -> list[UsageRow]:
        """What each tenant of ``group`` used, per hour (as ``QuotaClient.usage``)."""
        return await self._run(usage_flow(self.core, group, since, until))

    async def explain(
        self, tenant: str, units: int | None = None, *, group: str | None = None
    ) -> Explanation:
        """Why ``tenant`` has its limit now (as ``QuotaClient.explain``), from one snapshot."""
        return await self._run(explain_flow(self.core, tenant, units, group=group))

    def limit(
        self,
        *,
        tenant: requests.TenantSpec,
        units: requests.UnitsSpec = 1,
        **options: Unpack[requests.LimitOptions],
    ) -> Callable[[F], F]:
        """Decorate an ``async def`` handler so each call holds a (renewed) lease while it runs.

        ``tenant`` and ``units`` (and meter estimates such as ``tokens``) are
        callables receiving the handler's arguments, names of its parameters,
        or constants.
        """

        def decorate(handler: F) -> F:
            if not inspect.iscoroutinefunction(handler):
                raise InvalidType("handler", "AsyncQuotaClient.limit needs an async def handler")
            acquisition = self._acquisition_of(handler, tenant, units, options)

            @functools.wraps(handler)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                async with acquisition(*args, **kwargs):
                    return await handler(*args, **kwargs)

            return cast(F, wrapper)

        return decorate


async def _one_of_batch(conn: Any, args: tuple[Any, ...]) -> Any:
    """One call of a batch sent alone; an error reply is returned, as a pipeline would."""

    try:
        return await conn.evalsha(*args)
    except CALL_ERRORS as exc:
        return exc
