"""The async client's connections: one URL, shards, a cluster, the embedded fakeredis.

The same topologies as the sync backends (``ratequota.clients.backends``),
with ``redis.asyncio`` clients: the same placement, the same timeouts, no
automatic replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ratequota.clients.backends import (
    ClusterRouting,
    _redact,
    _redis_from_url,
    embedded_server,
    scrub,
)
from ratequota.errors import ConfigError

__all__ = [
    "AsyncBackend",
    "AsyncClusterBackend",
    "async_embedded_backend",
    "async_sharded_backend",
    "async_url_backend",
]


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

    def nodes(self) -> list[tuple[str, Any]]:
        """(shard id, connection) of every shard, for per-shard checks."""
        if self.routing is None:
            return [(self.description, self._clients[0])]
        return list(zip(self.routing.shard_ids, self._clients, strict=True))

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
