"""The async client's connections: one URL, shards, a cluster, the embedded fakeredis.

The same topologies as the sync backends (``ratequota.clients.backends``),
with ``redis.asyncio`` clients: the same placement, the same timeouts, no
automatic replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ratequota.clients.backends import (
    EMBEDDED,
    ClusterRouting,
    Shards,
    _redis_from_url,
    cluster_url,
    fake_server,
)
from ratequota.clients.urls import placement_ids, redact, scrub
from ratequota.errors import ConfigError

__all__ = [
    "AsyncBackend",
    "AsyncClusterBackend",
    "async_embedded_backend",
    "async_sharded_backend",
    "async_url_backend",
]


class AsyncBackend(Shards):
    """Async connections by route: one server, or shards placed as the sync client places them."""

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

        try:
            self._cluster = RedisCluster.from_url(
                cluster_url(url),
                retry=AsyncRetry(NoBackoff(), 0),
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


def async_url_backend(url: str, *, socket_timeout: float) -> AsyncBackend:
    """An async backend on one Redis URL; timeouts on every call, no automatic replay."""
    return AsyncBackend([_redis_from_url(url, socket_timeout, aio=True)], redact(url))


def async_sharded_backend(
    urls: Sequence[str], *, socket_timeout: float, shard_ids: Sequence[str] | None = None
) -> AsyncBackend:
    """Independent shards, placed exactly as ``QuotaClient.sharded`` places them."""
    ids = placement_ids(urls, shard_ids)
    clients = [_redis_from_url(u, socket_timeout, aio=True) for u in urls]
    return AsyncBackend(clients, f"{len(urls)} shards", ids)


def async_embedded_backend(*, shared: bool = True, server: Any = None) -> AsyncBackend:
    """fakeredis's asyncio client with Lua; ``shared`` uses the process-wide embedded server.

    Sync and async embedded clients of one process therefore see the same state.
    """
    import fakeredis.aioredis

    client = fakeredis.aioredis.FakeRedis(server=fake_server(shared, server))
    return AsyncBackend([client], EMBEDDED)
