"""Real calls of the async client, failure settings and renewal hints; type-checked, never run.

If a signature of ``AsyncQuotaClient`` drifts from the sync client's in a way
that breaks users, mypy fails on this file.
"""

from __future__ import annotations

from ratequota.clients.aio import AsyncLease, AsyncQuotaClient
from ratequota.clients.failure import FailureStats
from ratequota.clients.sync import QuotaClient
from ratequota.decision import Decision, GroupSnapshot, ReleaseResult, RenewResult
from ratequota.errors import RequestIdConflict
from ratequota.policy import GroupPolicy, Policy, TenantPolicy


async def async_usage() -> None:
    """The async client as an asyncio service would use it."""
    quota = AsyncQuotaClient.from_url(
        "redis://127.0.0.1:6379/0", timeout=2.0, failure_mode="local", local_allowance=4
    )
    policy = Policy([GroupPolicy("g", capacity=8, tenants=[TenantPolicy("a", guarantee=4)])])
    versions: dict[str, int] = await quota.apply_policy(policy)
    assert versions["g"] >= 1
    async with quota.acquire("a", units=2, timeout=1.5, ttl=30.0) as lease:
        held: AsyncLease = lease
        renewed: RenewResult = await lease.renew(ttl=10.0)
        hints: tuple[bool, bool, bool] = (lease.over_limit, lease.lost, lease.synthetic)
        granted: tuple[str, float] = (renewed.reason, renewed.ttl)
        del held, renewed, hints, granted
    decision: Decision = await quota.try_acquire("a", 1, request_id="req-1", group="g")
    if decision.lease is not None:
        released: ReleaseResult = await quota.release(decision.lease)
        del released
    snapshot: GroupSnapshot = await quota.snapshot("g")
    stats: FailureStats = quota.stats()
    recovery: tuple[bool, float, int] = (
        snapshot.recovering,
        snapshot.recovering_until,
        stats.fenced_refusals,
    )
    try:  # req-1 was used with 1 unit above: another size under it is refused
        async with quota.acquire("a", 2, request_id="req-1"):
            pass
    except RequestIdConflict as conflict:
        refused: Decision = conflict.decision
        del refused
    del snapshot, stats, recovery

    @quota.limit(tenant=lambda job: str(job), units=1, timeout=0.5)
    async def handle(job: object) -> int:
        return 1

    await handle("job")
    urls = ["redis://a:6379/0", "redis://b:6379/0"]
    sharded = AsyncQuotaClient.sharded(urls, shard_ids=["a", "b"])
    await sharded.close()
    await quota.close()


def sync_failure_settings() -> None:
    """The sync client's failure policy, breaker and renewal settings."""
    quota = QuotaClient(
        socket_timeout=0.25,
        failure_mode="open",
        breaker_failures=2,
        breaker_reset=0.3,
        renew_fraction=0.25,
        auto_renew=True,
    )
    with quota.acquire("a", 1) as lease:
        lost: bool = lease.lost
        del lost
    assert quota.stats().fail_open_admits >= 0
    quota.close()
