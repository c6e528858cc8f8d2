"""The asyncio client: the same flows as ``QuotaClient``, performed with awaits.

``AsyncQuotaClient`` has the sync client's API and semantics (``async with
quota.acquire(...)``, ``try_acquire``, ``release``, ``renew``, ``snapshot``,
``apply_policy``, ``load_policy``, the ``limit`` decorator on ``async def``
handlers). Every decision is taken by ``ratequota.clients.core`` and
``ratequota.clients.shell``; this module only sends, awaits and sleeps.

Two things are particular to it:

- concurrent script calls to one shard are pipelined into one round trip by a
  per-shard batcher (policy in ``ratequota.engine.batching``), and
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
import redis

from ratequota.clients import shell
from ratequota.clients.backends import (
    ClusterRouting,
    _redact,
    _redis_from_url,
    embedded_server,
    is_noscript,
    scrub,
    translate_error,
)
from ratequota.clients.explain import Explanation, explain_flow
from ratequota.clients.failure import FailureStats, log
from ratequota.clients.readiness import ReadinessReport
from ratequota.clients.renewal import RenewerBase
from ratequota.clients.requests import AcquireRequest
from ratequota.clients.runner import REDIS_ERRORS
from ratequota.clients.usage import When, usage_flow
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    ReleaseResult,
    RenewResult,
    UsageRow,
)
from ratequota.engine.batching import BatchPolicy
from ratequota.engine.ops import Batch, Compute, Flow, Sleep, Spawn, pipeline_args, wire_call
from ratequota.engine.protocol import MERGES, coalesce
from ratequota.engine.scripts import load_scripts, script
from ratequota.errors import ConfigError, InvalidType
from ratequota.policy import Policy

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "AsyncAcquisition",
    "AsyncBackend",
    "AsyncClusterBackend",
    "AsyncLease",
    "AsyncQuotaClient",
    "async_embedded_backend",
    "async_sharded_backend",
    "async_url_backend",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class AsyncBackend:
    """Async connections by route: one server, or shards placed by rendezvous hashing."""

    def __init__(
        self, clients: Sequence[Any], description: str, shard_ids: Sequence[str] | None = None
    ) -> None:
        from ratequota.engine.routing import Rendezvous

        self._clients = list(clients)
        self.description = description
        self.routing = None if shard_ids is None else Rendezvous(shard_ids)

    def connection(self, route: str) -> Any:
        """The connection serving ``route`` (a group name or the catalog's route)."""
        if self.routing is None:
            return self._clients[0]
        return self._clients[self.routing.index(route)]

    def connections(self) -> Sequence[Any]:
        """Every shard's connection."""
        return list(self._clients)

    def node_of(self, route: str) -> str:
        """The id of the shard serving ``route`` (the circuit breakers' key)."""
        return self.description if self.routing is None else self.routing.shard(route)

    async def close(self) -> None:
        """Close every pool."""
        for client in self._clients:
            await client.aclose()


class AsyncClusterBackend(ClusterRouting):
    """A Redis Cluster through ``redis.asyncio.cluster.RedisCluster`` (see ``ClusterBackend``).

    The hash tag places each group; redis-py follows MOVED/ASK (the command
    did not run) and its retries after connection errors and timeouts are off.
    """

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import NoBackoff

        if not isinstance(url, str) or not url:
            raise ConfigError("cluster", f"must be a redis:// URL of a cluster node, got {url!r}")
        try:
            self._cluster = RedisCluster.from_url(
                url,
                retry=AsyncRetry(NoBackoff(), 0),
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
            )
        except ValueError as exc:
            raise ConfigError("cluster", scrub(str(exc), url)) from None
        self.description = f"cluster at {_redact(url)}"

    def node_of(self, route: str) -> str:
        """The primary owning ``route``'s slot, once the topology is known (the breakers' key)."""
        try:
            return self._primary_of(route)
        except Exception:  # topology not discovered yet (the first call discovers it)
            return self.description

    async def close(self) -> None:
        """Close every node's connections."""
        await self._cluster.aclose()


def async_url_backend(url: str, *, socket_timeout: float) -> AsyncBackend:
    """An async backend on one Redis URL; timeouts on every call, no automatic replay."""
    return AsyncBackend([_redis_from_url(url, socket_timeout, aio=True)], _redact(url))


def async_sharded_backend(
    urls: Sequence[str], *, socket_timeout: float, shard_ids: Sequence[str] | None = None
) -> AsyncBackend:
    """Independent shards, placed exactly as ``QuotaClient.sharded`` places them."""
    if isinstance(urls, str) or not urls:
        raise ConfigError("shards", "must be a non-empty list of redis:// URLs")
    ids = [_redact(u) for u in urls] if shard_ids is None else list(shard_ids)
    if len(ids) != len(urls):
        raise ConfigError("shard_ids", "needs one id per shard URL")
    clients = [_redis_from_url(u, socket_timeout, aio=True) for u in urls]
    return AsyncBackend(clients, f"{len(urls)} shards", ids)


def async_embedded_backend(*, shared: bool = True, server: Any = None) -> AsyncBackend:
    """fakeredis's asyncio client with Lua; ``shared`` uses the process-wide embedded server.

    Sync and async embedded clients of one process therefore see the same state.
    """
    import fakeredis
    import fakeredis.aioredis

    if server is None:
        server = embedded_server() if shared else fakeredis.FakeServer()
    return AsyncBackend([fakeredis.aioredis.FakeRedis(server=server)], "embedded fakeredis")


#: Calls in flight per node when a cluster client cannot pipeline; well under
#: redis-py's per-node connection limit (100), which fails rather than waits.
_SOLO_IN_FLIGHT = 32


class _ShardBatcher:
    """Pipelines the concurrent commands of many tasks to one shard (see ``BatchPolicy``).

    It also bounds the connections a client opens to a shard at
    ``max_in_flight``: hundreds of tasks never exhaust the pool.
    """

    def __init__(
        self, conn: Any, policy: BatchPolicy, *, pipelines: bool = True, bound: float = 60.0
    ) -> None:
        self._conn = conn
        self._policy = policy
        self._bound = bound  # each round trip's timeout, from its send (the socket timeout)
        self._pipelines = pipelines
        self._queue: list[tuple[tuple[str, tuple[Any, ...]], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._cleanups: set[asyncio.Future[Any]] = set()  # cancelled calls winding down

    def submit(self, call: tuple[str, tuple[Any, ...]]) -> asyncio.Future[Any]:
        """Queue one (method, args) call; the future gets its reply or its exception."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        self._pump()
        return future

    def _pump(self) -> None:
        if self._pipelines:
            count = self._policy.take(len(self._queue), self._in_flight)
        else:  # a cluster client cannot pipeline EVALSHA: one call per send, a few at once
            count = 1 if self._queue and self._in_flight < _SOLO_IN_FLIGHT else 0
        if count:
            batch, self._queue = self._queue[:count], self._queue[count:]
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel the round trips still in flight and the clean-ups still winding down.

        Cancelling a round trip hands its Redis call over to the clean-ups, so
        this goes round until nothing is left (a few rounds at most), lest a
        task be destroyed pending when the loop closes.
        """
        for _ in range(5):
            pending = [t for t in (*self._tasks, *self._cleanups) if not t.done()]
            if not pending:
                return
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _fail_queued(self) -> None:
        """A round trip to this shard got no reply in time: fail every call queued behind it.

        They were queued because round trips were in flight, so each has waited
        less than one socket timeout; sent now, each would wait a full one more
        on a server that is not answering. They fail at once, never sent (the
        caller's failure mode applies); new calls try the shard again.
        """
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(NoReply(f"{_NO_REPLY} (queued behind a round trip)"))

    async def _send(
        self, batch: list[tuple[tuple[str, tuple[Any, ...]], asyncio.Future[Any]]]
    ) -> None:
        calls = [call for call, _ in batch]
        # Concurrent acquires (releases) of one group become one acquire_many (release_many)
        # call: one script run pays the clock, policy, purge and demand reads once for all.
        wire, where = coalesce(calls) if len(calls) > 1 else (calls, [(0, None)])
        replies: list[Any]
        try:
            replies = await self._exchange(wire)
            await self._reload_merged(wire, replies)
        except BaseException as exc:  # every waiter hears about it, cancellation included
            replies = [exc] * len(wire)
        finally:
            self._in_flight -= 1
        if any(isinstance(r, (NoReply, redis.exceptions.TimeoutError)) for r in replies):
            self._fail_queued()
        for (_, future), (index, part) in zip(batch, where, strict=True):
            reply = replies[index]
            if part is not None and not isinstance(reply, BaseException):
                reply = reply[part]
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, BaseException):
                future.set_exception(_fresh(reply))
            else:
                future.set_result(reply)
        self._pump()

    async def _exchange(self, wire: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """One round trip, at most one socket timeout; a call's error is its reply, in place."""
        if len(wire) == 1:
            method, args = wire[0]
            try:
                return [await self._bounded(getattr(self._conn, method)(*args))]
            except Exception as exc:
                return [exc]
        pipe = self._conn.pipeline(transaction=False)
        for method, args in wire:
            getattr(pipe, method)(*args)
        return list(await self._bounded(pipe.execute(raise_on_error=False)))

    async def _bounded(self, awaitable: Any) -> Any:
        """``awaitable``'s result within one socket timeout, else ``NoReply`` at once.

        Unlike ``asyncio.wait_for`` this does not wait for the cancelled call
        to finish cleaning up: redis-py drops the connection on cancellation,
        which against a paused server takes another socket timeout. The
        clean-up goes on in the background.
        """
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task}, timeout=self._bound)
        finally:
            if not task.done():
                task.cancel()
                self._cleanups.add(task)
                task.add_done_callback(_forget(self._cleanups))
        if not done:
            raise NoReply(f"{_NO_REPLY} within {self._bound:.3f}s")
        return task.result()

    async def _reload_merged(
        self, wire: list[tuple[str, tuple[Any, ...]]], replies: list[Any]
    ) -> None:
        """NOSCRIPT for a merged call: load its ``_many`` script and send it again, once.

        The callers never sent the merged script themselves, so their own NOSCRIPT
        rule (which reloads the script they did send) cannot recover it.
        """
        merged = {script(m.many).sha: script(m.many) for m in MERGES}
        again = [
            i
            for i, ((_, args), reply) in enumerate(zip(wire, replies, strict=True))
            if args and args[0] in merged and is_noscript(reply)
        ]
        if not again:
            return
        for sha in {wire[i][1][0] for i in again}:
            await self._bounded(self._conn.script_load(merged[sha].source))
        again_replies = await self._exchange([wire[i] for i in again])
        for i, reply in zip(again, again_replies, strict=True):
            replies[i] = reply


_NO_REPLY = "no reply from Redis"


class NoReply(TimeoutError):
    """A round trip (or the one a call queued behind) got no reply within the socket timeout.

    A ``TimeoutError``, hence an ``OSError``: callers see ``BackendUnavailable``.
    """


def _forget(cleanups: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback dropping a cancelled call, its outcome retrieved (never logged)."""

    def done(task: asyncio.Future[Any]) -> None:
        cleanups.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _fresh(exc: BaseException) -> BaseException:
    """A cancellation of the batch task is an outage for the callers, not their cancellation."""
    if isinstance(exc, asyncio.CancelledError):
        return ConnectionError("the batch was cancelled (client closing)")
    return exc


@attrs.define(eq=False)
class AsyncLease(shell.LeaseBase):
    """A held lease (see ``shell.LeaseBase``) that renews and releases through its async client."""

    _client: AsyncQuotaClient = attrs.field(kw_only=True, repr=False)

    async def renew(self, ttl: float | None = None) -> RenewResult:
        """Extend the lease by ``ttl`` seconds from now; marks it lost if it had expired."""
        return self.renewed(await self._client.renew(self.info, ttl))

    async def release(self) -> ReleaseResult:
        """Give the units back (and stop renewing); harmless when called twice."""
        self._client.renewer.drop(self)
        return self.ended(await self._client.release(self.info))


class AsyncAcquisition(shell.AcquisitionBase[AsyncLease]):
    """``async with quota.acquire(...) as lease``: waits on entry, releases on exit.

    The release is shielded, so a cancelled holder still gives its units back;
    a release that fails is counted and logged, never raised (as in the sync client).
    """

    def __init__(self, client: AsyncQuotaClient, request: AcquireRequest) -> None:
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

    def hold(self, lease: shell.LeaseBase) -> None:
        """Renew ``lease`` until ``drop``."""
        if not self.enabled:
            return
        self.book.hold(lease)
        if not self.background:
            return
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._loop(self._wake))
        assert self._wake is not None
        self._wake.set()

    async def renew_due(self) -> int:
        """Renew every held lease due now; returns how many."""
        due, _ = self.book.next()
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
        self._batchers: dict[object, _ShardBatcher] = {}
        # Each round trip's timeout, connection set-up included; a round trip that gets no
        # reply in time also fails the calls queued behind it (``_ShardBatcher``).
        self._call_bound = s.socket_timeout
        self.renewer = TaskRenewer(self)
        self._background: set[asyncio.Task[None]] = set()  # spawned flows (catalog refresh)

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

    def stats(self) -> FailureStats:
        """Counters: fail-open and local admissions, fast failures, fenced releases/renewals."""
        stats = self.core.failure.stats(self.core.breakers.fast_failures)
        return attrs.evolve(stats, fenced_refusals=self.core.fenced_refusals)

    # -- driving flows -----------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        run = self._runner(flow)
        while run.op is not None:
            await run.astep(self._perform)
        return run.result()

    async def _perform(self, op: Any) -> Any:
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
        if isinstance(op, Batch):
            calls = pipeline_args(op)
            if not getattr(self.backend, "pipelines", True):  # a cluster client
                replies: list[Any] = []
                for start in range(0, len(calls), _SOLO_IN_FLIGHT):
                    chunk = calls[start : start + _SOLO_IN_FLIGHT]
                    replies += await asyncio.gather(*(_one_of_batch(conn, a) for a in chunk))
                return replies
            return await _pipelined(conn, calls)
        # Each round trip is bounded in the batcher; a cancelled caller just drops its future.
        return await self._batcher(op.route, conn).submit(wire_call(op))

    def _batcher(self, route: str, conn: Any) -> _ShardBatcher:
        node = self._node_of(route)
        batcher = self._batchers.get(node)
        if batcher is None:
            pipelines = getattr(self.backend, "pipelines", True)
            batcher = self._batchers[node] = _ShardBatcher(
                conn, self._policy, pipelines=pipelines, bound=self._call_bound
            )
        return batcher

    async def load_scripts(self, *, strict: bool = True) -> None:
        """Load every script on every server (``strict=False`` tolerates one that is down)."""
        for conn in self.backend.connections():
            try:
                for spec in load_scripts().values():
                    await conn.script_load(spec.source)
            except REDIS_ERRORS as exc:
                if strict:
                    raise translate_error(exc, self._where) from exc

    async def check(
        self, groups: Iterable[str] | None = None, *, allow_degraded: bool = False
    ) -> ReadinessReport:
        """Readiness of every shard: may this pod take traffic? (as ``QuotaClient.check``)."""
        from ratequota.clients import readiness

        keyspace = self.core.keyspace
        catalog, error = await readiness.aread_catalog(self.backend, keyspace)
        served = readiness.served_groups(catalog, groups)
        facts = await readiness.agather(self.backend, keyspace, served)
        return readiness.conclude(
            facts,
            catalog,
            error,
            socket_timeout=self.core.settings.socket_timeout,
            allow_degraded=allow_degraded,
        )

    # -- policy ------------------------------------------------------------

    async def apply_policy(
        self, policy: Policy | str | Path, *, migrate: bool = False
    ) -> dict[str, int]:
        """Publish a policy (or a TOML file of one) for every pod; returns versions per group.

        ``migrate`` takes groups over from pods of the previous release still serving them in
        the previous key layout (their live leases move along; those pods then refuse the
        group). Without it such a group raises ``LegacyLayout``: see docs/deployment.md.
        """
        if isinstance(policy, (str, Path)):
            policy = Policy.from_toml(policy)
        return await self._run(self.core.apply_policy(policy, migrate=migrate))

    async def load_policy(self) -> Policy | None:
        """The published policy, or None; also refreshes this client's routing."""
        return await self._run(self.core.load_policy())

    # -- leases ------------------------------------------------------------

    async def try_acquire(
        self, tenant: str, units: int = 1, **options: Unpack[shell.TryOptions]
    ) -> Decision:
        """Decide now, never wait (options: ``shell.TryOptions``); release an admitted lease."""
        return await self._run(self.core.try_acquire(self.core.request(tenant, units, **options)))

    def acquire(
        self, tenant: str, units: int = 1, **options: Unpack[shell.AcquireOptions]
    ) -> AsyncAcquisition:
        """``async with``: waits up to ``timeout`` on entry, releases on exit, renews between.

        Options and errors as for ``QuotaClient.acquire``; arguments are
        validated here, before anything touches Redis.
        """
        return AsyncAcquisition(self, self.core.request(tenant, units, **options))

    async def release(self, lease: LeaseInfo | AsyncLease) -> ReleaseResult:
        """End a lease; idempotent, and says whether it was still live.

        Fenced: the release names the lease's tenant and token, so it can only
        end that very lease (state ``"fenced"`` otherwise, counted in ``stats()``).
        """
        info = lease.info if isinstance(lease, AsyncLease) else lease
        return await self._run(self.core.release(info))

    async def renew(self, lease: LeaseInfo | AsyncLease, ttl: float | None = None) -> RenewResult:
        """Extend a live lease; reports whether its tenant is above its fair limit.

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
        tenant: shell.TenantSpec,
        units: shell.UnitsSpec = 1,
        **options: Unpack[shell.WaitOptions],
    ) -> Callable[[F], F]:
        """Decorate an ``async def`` handler so each call holds a (renewed) lease while it runs.

        ``tenant`` and ``units`` are callables receiving the handler's
        arguments, names of its parameters, or constants.
        """

        def decorate(handler: F) -> F:
            if not inspect.iscoroutinefunction(handler):
                raise InvalidType("handler", "AsyncQuotaClient.limit needs an async def handler")
            arguments = shell.handler_arguments(handler, tenant, units)

            @functools.wraps(handler)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                who, how_many = arguments(*args, **kwargs)
                async with self.acquire(who, how_many, **options):
                    return await handler(*args, **kwargs)

            return cast(F, wrapper)

        return decorate


async def _one_of_batch(conn: Any, args: tuple[Any, ...]) -> Any:
    """One call of a batch sent alone; an error reply is returned, as a pipeline would."""
    import redis

    try:
        return await conn.evalsha(*args)
    except redis.exceptions.ResponseError as exc:
        return exc


async def _pipelined(conn: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    pipe = conn.pipeline(transaction=False)
    for args in calls:
        pipe.evalsha(*args)
    return cast(list[Any], await pipe.execute(raise_on_error=False))
