"""Real calls of the public API, type-checked by mypy (strict) and never run.

If a signature changes in a way that breaks users, mypy fails on this file.
"""

from __future__ import annotations

import ratequota
from ratequota import (
    Decision,
    GroupPolicy,
    GroupSnapshot,
    Lease,
    MeterResult,
    MeterSettlement,
    Policy,
    QuotaClient,
    ReleaseResult,
    RenewResult,
    TenantPolicy,
)
from ratequota.ratelimit_headers import decision_headers
from ratequota.testing import ManualClock, fake_client


def sync_usage() -> None:
    """The sync client as a pod would use it."""
    quota: QuotaClient = ratequota.QuotaClient()
    remote = QuotaClient.from_url("redis://127.0.0.1:6379/0", lease_ttl=30.0, timeout=2.0)
    policy = Policy(
        [GroupPolicy("g", capacity=8, tenants=[TenantPolicy("a", guarantee=4, weight=2.0)])],
        default_group="g",
    )
    versions: dict[str, int] = quota.apply_policy(policy)
    assert versions["g"] >= 1
    with quota.acquire("a", units=2, timeout=1.5) as lease:
        token: int = lease.token
        renewed: RenewResult = lease.renew(ttl=10.0)
        hint: bool = renewed.over_limit or lease.over_limit
        del token, hint
    decision: Decision = quota.try_acquire("a", 1, request_id="req-1")
    if decision.admitted and decision.lease is not None:
        released: ReleaseResult = quota.release(decision.lease)
        assert released.was_live
    snap: GroupSnapshot = quota.snapshot("g", ["a"])
    used: int = snap.tenants["a"].used
    del used

    @quota.limit(tenant=lambda tenant, n: tenant, units=lambda tenant, n: n)
    def handle(tenant: str, n: int) -> str:
        return tenant * n

    result: str = handle("a", 2)
    del result
    rate_meter_usage(quota)
    remote.close()


def rate_meter_usage(quota: QuotaClient) -> None:
    """Rate meters: estimates at admission, the actual amount settled after (docs/rates.md)."""
    decision: Decision = quota.try_acquire("a", 1, tokens=1200, requests=1)
    result: MeterResult | None = decision.meter("tokens")
    if result is not None and result.retry_after is not None:
        wait: float = result.retry_after
        del wait
    headers: dict[str, str] = decision_headers(decision)
    del headers
    if decision.lease is not None:
        done: tuple[MeterSettlement, ...] = quota.settle(decision.lease, tokens=950)
        assert done[0].outcome in ("settled", "replay")
        quota.release(decision.lease, meters={"tokens": 950})
    with quota.acquire("a", 1, tokens=500, timeout=1.0) as lease:
        lease.settle(tokens=420)

    @quota.limit(tenant="tenant", tokens="estimate", requests=1)
    def generate(tenant: str, estimate: int) -> int:
        return estimate

    del generate


def testing_usage() -> None:
    """The test helpers users get."""
    clock = ManualClock()
    quota = fake_client(Policy([GroupPolicy("g", 2, [TenantPolicy("a")])]), clock=clock)
    with quota.acquire("a") as lease:
        clock.advance(61.0)
        assert isinstance(lease, Lease)


async def async_usage() -> None:
    """The asyncio client: the same calls, awaited."""
    quota = ratequota.AsyncQuotaClient()
    await quota.apply_policy(Policy([GroupPolicy("g", 4, [TenantPolicy("a", guarantee=2)])]))
    async with quota.acquire("a", units=1, timeout=0.5) as lease:
        token: int = lease.token
        del token
    decision: Decision = await quota.try_acquire("a", 2, tokens=300)
    if decision.lease is not None:
        settled: tuple[MeterSettlement, ...] = await quota.settle(decision.lease, tokens=200)
        del settled
        await quota.release(decision.lease, tokens=200)

    @quota.limit(tenant="tenant", units="n")
    async def handle(tenant: str, n: int) -> int:
        return n

    handled: int = await handle("a", 1)
    del handled
    await quota.close()


def explain_usage(quota: QuotaClient) -> None:
    """Why a tenant has its limit."""
    why: ratequota.Explanation = quota.explain("a", units=2)
    text: str = why.describe()
    del text


def ledger_usage(quota: QuotaClient) -> None:
    """What each tenant used, per hour, from the usage ledger."""
    import datetime as dt

    rows: list[ratequota.UsageRow] = quota.usage("g", since=dt.timedelta(hours=24))
    for row in rows:
        held: float = row.unit_seconds
        refused: dict[str, int] = dict(row.refusals)
        del held, refused
    quota.usage("g", since=1_800_000_000.0, until=dt.datetime.now(dt.timezone.utc))


async def async_ledger_usage(quota: ratequota.AsyncQuotaClient) -> None:
    """The same, awaited."""
    rows: list[ratequota.UsageRow] = await quota.usage("g")
    del rows
