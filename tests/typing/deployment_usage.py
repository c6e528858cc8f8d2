"""Deployment-facing calls (shards, cluster, readiness), type-checked by mypy and never run."""

from __future__ import annotations

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.readiness import ReadinessReport, ShardReport
from ratequota.clients.sync import QuotaClient
from ratequota.engine.routing import Rendezvous


def sharded_and_cluster() -> None:
    """Constructors with settings, and the readiness report's fields."""
    shards = QuotaClient.sharded(
        ["redis://a:6379/0", "redis://b:6379/0"], shard_ids=["a", "b"], socket_timeout=0.5
    )
    cluster = QuotaClient.cluster("rediss://user:pw@node:7000", lease_ttl=30.0)
    report: ReadinessReport = shards.check(["g1", "g2"], allow_degraded=True)
    ready: bool = report.ready and cluster.check().ready
    first: ShardReport = report.shards[0]
    latency: float | None = first.latency_ms
    table: str = report.table()
    shard: str = Rendezvous(["a", "b"]).shard("g1")
    del ready, latency, table, shard


async def async_cluster() -> None:
    """The async client on a cluster."""
    quota = AsyncQuotaClient.cluster("redis://node:7000", socket_timeout=0.5)
    async with quota:
        decision = await quota.try_acquire("t", 1)
        del decision
