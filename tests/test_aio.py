"""AsyncQuotaClient: the sync client's API and semantics, awaited, on fakeredis and a real Redis.

Each test runs on the embedded async fakeredis and on a real redis-server
(through the same flows), so the two clients cannot drift apart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.async_backends import async_embedded_backend, async_url_backend
from ratequota.clients.backends import embedded_backend
from ratequota.clients.sync import QuotaClient
from ratequota.engine.batching import BatchPolicy
from ratequota.errors import AcquireTimeout, InvalidRequest, InvalidType, RequestTooLarge
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=6,
            tenants=[
                TenantPolicy("a", guarantee=3, borrow_limit=2),
                TenantPolicy("b", guarantee=3),
            ],
        )
    ]
)

Body = Callable[[AsyncQuotaClient], Awaitable[None]]


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.real_redis)])
def run_async(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    """Runs a test body with a fresh async client on fakeredis or on the real server."""

    def run(body: Body, **options: Any) -> None:
        async def main() -> None:
            if request.param == "real":
                server: RedisServer = request.getfixturevalue("real_redis")
                backend = async_url_backend(server.url, socket_timeout=5.0)
            else:
                backend = async_embedded_backend(server=fakeredis.FakeServer())
            quota = AsyncQuotaClient(backend=backend, **options)
            try:
                await quota.apply_policy(POLICY)
                await body(quota)
            finally:
                await quota.close()

        asyncio.run(main())

    return run


def test_acquire_release_snapshot(run_async: Callable[[Body], None]) -> None:
    """``async with acquire`` holds units, exposes the lease facts and releases on exit."""

    async def body(quota: AsyncQuotaClient) -> None:
        async with quota.acquire("a", 3) as lease:
            assert (lease.units, lease.tenant, lease.group) == (3, "a", "g")
            assert lease.token >= 1 and not lease.synthetic
            assert (await quota.snapshot("g")).used == 3
        assert lease.released
        assert (await quota.snapshot("g")).used == 0

    run_async(body)


def test_try_acquire_refusal_explains(run_async: Callable[[Body], None]) -> None:
    """A refusal is a Decision with the reason and numbers; an admission can be released."""

    async def body(quota: AsyncQuotaClient) -> None:
        first = await quota.try_acquire("a", 5)
        assert first.admitted and first.lease is not None
        refused = await quota.try_acquire("a", 1)
        assert not refused.admitted and refused.reason == "tenant_limit"
        assert refused.used == 5 and refused.capacity == 6
        assert (await quota.release(first.lease)).was_live
        assert not (await quota.release(first.lease)).was_live

    run_async(body)


def test_errors_match_the_sync_client(run_async: Callable[[Body], None]) -> None:
    """Bad input raises before any I/O; too large and timeouts raise the same errors."""

    async def body(quota: AsyncQuotaClient) -> None:
        with pytest.raises(InvalidType, match="units"):
            quota.acquire("a", "3")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="timeout"):
            quota.acquire("a", 1, timeout=-1)
        with pytest.raises(RequestTooLarge):
            async with quota.acquire("a", 6):
                pass
        async with quota.acquire("b", 3):
            with pytest.raises(AcquireTimeout, match="gave up after waiting"):
                async with quota.acquire("a", 4, timeout=0.05):
                    pass

    run_async(body)


def test_renew_and_request_id_idempotency(run_async: Callable[[Body], None]) -> None:
    """Explicit renew extends the lease; a retried acquire with the same id is not charged twice."""

    async def body(quota: AsyncQuotaClient) -> None:
        first = await quota.try_acquire("a", 2, request_id="req-1")
        again = await quota.try_acquire("a", 2, request_id="req-1")
        assert again.lease is not None and again.lease.replay
        assert (await quota.snapshot("g")).used == 2
        assert first.lease is not None
        result = await quota.renew(first.lease, ttl=30)
        assert result.renewed and not result.over_limit

    run_async(body)


def test_limit_decorator_releases_even_when_the_handler_raises(
    run_async: Callable[[Body], None],
) -> None:
    """``limit`` on ``async def`` holds a lease during the call and releases on error too."""

    async def body(quota: AsyncQuotaClient) -> None:
        seen: list[int] = []

        @quota.limit(tenant=lambda job, *_, **__: job["tenant"], units="size")
        async def handle(job: dict[str, str], size: int) -> int:
            seen.append((await quota.snapshot("g")).used)
            if size == 2:
                raise RuntimeError("handler failed")
            return size

        assert await handle({"tenant": "a"}, size=3) == 3
        with pytest.raises(RuntimeError):
            await handle({"tenant": "b"}, 2)
        assert seen == [3, 2]
        assert (await quota.snapshot("g")).used == 0
        with pytest.raises(InvalidType, match="handler"):
            quota.limit(tenant="a")(lambda: None)

    run_async(body)


def test_many_tasks_share_one_client(run_async: Callable[[Body], None]) -> None:
    """Over a hundred tasks on one client: capacity is never exceeded and nothing stays held."""

    async def body(quota: AsyncQuotaClient) -> None:
        held = [0, 0]  # now, most

        async def one(i: int) -> None:
            async with quota.acquire("ab"[i % 2], 1, timeout=30):
                held[0] += 1
                held[1] = max(held[1], held[0])
                await asyncio.sleep(0.001)
                held[0] -= 1

        await asyncio.gather(*(one(i) for i in range(120)))
        assert 0 < held[1] <= 6
        assert (await quota.snapshot("g")).used == 0

    run_async(body)


@pytest.mark.real_redis
def test_noscript_is_reloaded_once(real_redis: RedisServer) -> None:
    """After SCRIPT FLUSH (a restart, a failover) the next call reloads and succeeds."""

    async def main() -> None:
        quota = AsyncQuotaClient(backend=async_url_backend(real_redis.url, socket_timeout=5))
        await quota.apply_policy(POLICY)
        plain = real_redis.client()
        plain.script_flush()
        async with quota.acquire("a", 1) as lease:
            assert lease.units == 1
        plain.script_flush()
        decisions = await asyncio.gather(*(quota.try_acquire("b", 1) for _ in range(3)))
        assert all(d.admitted for d in decisions)
        plain.close()
        await quota.close()

    asyncio.run(main())


def test_embedded_default_is_shared_with_sync_clients() -> None:
    """``AsyncQuotaClient()`` and ``QuotaClient()`` in one process see the same embedded state."""
    prefix = "t" + uuid.uuid4().hex[:8]
    sync = QuotaClient(prefix=prefix)
    sync.apply_policy(POLICY)

    async def main() -> None:
        quota = AsyncQuotaClient(prefix=prefix)
        async with quota.acquire("a", 2):
            assert sync.snapshot("g").used == 2
        held = sync.try_acquire("b", 3)
        assert (await quota.snapshot("g")).used == 3
        assert held.lease is not None
        await quota.release(held.lease)
        await quota.close()

    asyncio.run(main())
    assert sync.snapshot("g").used == 0
    sync.close()
    # A private embedded backend really is private.
    assert embedded_backend(shared=False).connection("g") is not None


def test_batch_policy_sends_at_once_when_idle_and_batches_under_load() -> None:
    """A lone call never waits; calls arriving while pipelines are in flight go out together."""
    policy = BatchPolicy(max_batch=64, max_in_flight=2)
    assert policy.take(queued=1, in_flight=0) == 1
    assert policy.take(queued=5, in_flight=1) == 5
    assert policy.take(queued=5, in_flight=2) == 0
    assert policy.take(queued=100, in_flight=0) == 64
    assert policy.take(queued=0, in_flight=0) == 0
