"""The async client's connections: one URL, shards, a cluster, the embedded fakeredis.

The same topologies as the sync backends (``ratequota.clients.backends``),
with ``redis.asyncio`` clients: the same placement, the same timeouts, no
automatic replay; and, as there, a script call goes pre-packed on the clients
ratequota makes from URLs: pipelined on a connection of its own
(``script_pipe.ScriptPipe``), or on the client's pool (``AsyncPackedScripts``)
where the pipe cannot take a connection over.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis

from ratequota.clients.backends import (
    EMBEDDED,
    ClusterRouting,
    Shards,
    _redis_from_url,
    async_no_retry,
    cluster_url,
    fake_server,
    packed_bytes,
    plain_pool,
)
from ratequota.clients.functions import Functions
from ratequota.clients.script_pipe import ScriptPipe
from ratequota.clients.urls import placement_ids, redact, scrub
from ratequota.engine.ops import ScriptCall
from ratequota.errors import ConfigError

__all__ = [
    "AsyncBackend",
    "AsyncClusterBackend",
    "AsyncPackedScripts",
    "async_embedded_backend",
    "async_sharded_backend",
    "async_url_backend",
]


#: How a shard's script call is sent pre-packed: awaited, it answers what ``evalsha`` would.
ScriptSender = Callable[[ScriptCall], Awaitable[Any]]


class AsyncBackend(Shards):
    """Async connections by route: one server, or shards placed as the sync client places them.

    ``packed`` (the backends made from URLs) gives each shard whose client
    qualifies a ``ScriptPipe`` (else an ``AsyncPackedScripts``), which the
    client's batcher sends a script call through (``script_sender``).
    """

    def __init__(
        self,
        clients: Sequence[Any],
        description: str,
        ids: Sequence[str] | None = None,
        *,
        packed: bool = False,
        functions: bool = True,
    ) -> None:
        super().__init__(clients, description, ids)
        self._senders: list[ScriptSender | None] = [
            (
                ScriptPipe.of(client, functions, name)
                or AsyncPackedScripts.of(client, functions, name)
                if packed
                else None
            )
            for name, client in self.nodes()
        ]

    def script_sender(self, route: str) -> ScriptSender | None:
        """The packed sender of the shard serving ``route``, or None (redis-py's ``evalsha``)."""
        return self._senders[0 if self.routing is None else self.routing.index(route)]

    async def close(self) -> None:
        """Close every pipe and every pool."""
        for sender in self._senders:
            if isinstance(sender, ScriptPipe):
                await sender.close()
        for client in self._clients:
            await client.aclose()


#: What the asyncio ``no_retry()`` treats as a failed attempt (redis.asyncio's default
#: ``Retry`` errors): after one, ``execute_command`` disconnects the connection and raises.
_ATTEMPT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


class AsyncPackedScripts:
    """EVALSHA on a ``redis.asyncio`` client's own pool, packed by ratequota (``PackedScripts``
    for the async client).

    ``await client.evalsha(...)`` encodes every argument in Python and runs the
    command through retry and observability closures. This sends the bytes of
    ``ScriptCall.packed`` (redis-py's own bytes for the call) with the
    connection's public ``send_packed_command`` and ``read_response``, between
    the pool's ``get_connection`` and ``release``, and ends each way
    ``execute_command`` ends under the ``no_retry()`` policy ratequota gives
    these connections: an attempt's error (connection, timeout) disconnects the
    connection and is raised, never replayed; an error reply (NOSCRIPT...) is
    raised as it is; the connection always goes back to the pool, which
    disconnects one marked for reconnection. Timeouts are the connection's own.

    Cancellation (a caller's task, or the batcher's timer at the deadline)
    mid-send or mid-read leaves the reply unread: redis-py's ``send_packed_command``
    and ``read_response`` disconnect on any ``BaseException``, and this makes
    sure of it before the connection goes back, so a pooled connection never
    holds another call's reply. Every await is bounded (the socket and
    connect timeouts, and the batcher's deadline around the whole call).

    A call ``packed_bytes`` leaves to redis-py (an argument it cannot pack,
    or redis-py's own metrics on) goes through ``evalsha``. Calls go as
    ``FCALL`` where ``functions`` says the server takes them (``PackedScripts``).
    """

    def __init__(self, client: Any, functions: bool = True, where: str = "redis") -> None:
        self._client = client
        self._pool = client.connection_pool
        self.functions = Functions(functions, where)

    @classmethod
    def of(
        cls, client: Any, functions: bool = True, where: str = "redis"
    ) -> AsyncPackedScripts | None:
        """A sender for ``client`` (the server ``where``), or None when it is not the plain
        client this mirrors (``backends.plain_pool``: a ``redis.asyncio.Redis`` made as
        ratequota makes its own)."""
        from redis.asyncio import Redis

        if plain_pool(client, Redis, async_no_retry()) is None:
            return None
        return cls(client, functions, where)

    async def __call__(self, call: ScriptCall) -> Any:
        """Send ``call`` and read its reply, as ``await client.evalsha(*call.wire)`` would."""
        functions = self.functions
        packed = packed_bytes(call, functions)
        if packed is None:
            return await self._client.evalsha(*call.wire)
        load = functions.take_load() if functions.due else None
        pool = self._pool
        conn = await pool.get_connection()
        try:
            if load is None:
                await conn.send_packed_command(packed)
            else:
                await conn.send_packed_command((load, packed))
                try:
                    functions.loaded(await conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    functions.loaded(exc)
            return await conn.read_response()
        except redis.exceptions.ResponseError as exc:
            raise functions.answer(exc) from None
        except _ATTEMPT_ERRORS as exc:
            await conn.disconnect()
            if load is not None:  # the load may not have been read: load again next time
                functions.loaded(exc)
            raise
        except asyncio.CancelledError:
            # redis-py has already dropped it; whatever the version, an unread reply never
            # goes back to the pool (nowait: no await, so a second cancellation cannot stop it).
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


#: The first redis-py whose asyncio cluster client checks a connection before writing to it.
#: Before it, a command cancelled at its time bound (the batcher bounds every round trip) can
#: drop a connection a concurrent command then writes to: ``AttributeError`` instead of a
#: connection error (found by the fault harness, docs/deployment.md).
ASYNC_CLUSTER_REDIS_PY = (8, 2)


def redis_py_version(text: str) -> tuple[int, int]:
    """``"8.1.0"`` -> ``(8, 1)``; an unreadable version reads as new enough."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else ASYNC_CLUSTER_REDIS_PY


class AsyncClusterBackend(ClusterRouting):
    """A Redis Cluster through ``redis.asyncio.cluster.RedisCluster`` (see ``ClusterBackend``).

    The hash tag places each group; redis-py follows MOVED/ASK (the command
    did not run) and its retries after connection errors and timeouts are off.
    """

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        from redis.asyncio.cluster import RedisCluster

        if redis_py_version(redis.__version__) < ASYNC_CLUSTER_REDIS_PY:
            warnings.warn(
                f"ratequota: the asyncio cluster client needs redis-py 8.2 or newer (found "
                f"{redis.__version__}): under load an older one can raise AttributeError "
                "instead of a connection error (docs/deployment.md)",
                RuntimeWarning,
                stacklevel=3,  # the caller of AsyncQuotaClient.cluster
            )
        try:
            self._cluster = RedisCluster.from_url(
                cluster_url(url),
                retry=async_no_retry(),
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
            )
        except ValueError as exc:
            raise ConfigError("cluster", scrub(str(exc), url)) from None
        self.description = f"cluster at {redact(url)}"

    def node_of(self, route: str) -> str:
        """The primary owning ``route``'s slot, once the topology is known (the breakers' key)."""
        try:
            return self._primary_of(route)
        except Exception:  # topology not discovered yet (the first call discovers it)
            return self.description

    async def close(self) -> None:
        """Close every node's connections."""
        await self._cluster.aclose()


def async_url_backend(url: str, *, socket_timeout: float, functions: bool = True) -> AsyncBackend:
    """An async backend on one Redis URL; timeouts on every call, no automatic replay."""
    client = _redis_from_url(url, socket_timeout, aio=True)
    return AsyncBackend([client], redact(url), packed=True, functions=functions)


def async_sharded_backend(
    urls: Sequence[str],
    *,
    socket_timeout: float,
    shard_ids: Sequence[str] | None = None,
    functions: bool = True,
) -> AsyncBackend:
    """Independent shards, placed exactly as ``QuotaClient.sharded`` places them."""
    ids = placement_ids(urls, shard_ids)
    clients = [_redis_from_url(u, socket_timeout, aio=True) for u in urls]
    return AsyncBackend(clients, f"{len(urls)} shards", ids, packed=True, functions=functions)


def async_embedded_backend(*, shared: bool = True, server: Any = None) -> AsyncBackend:
    """fakeredis's asyncio client with Lua; ``shared`` uses the process-wide embedded server.

    Sync and async embedded clients of one process therefore see the same state.
    """
    import fakeredis.aioredis

    client = fakeredis.aioredis.FakeRedis(server=fake_server(shared, server))
    return AsyncBackend([client], EMBEDDED)
