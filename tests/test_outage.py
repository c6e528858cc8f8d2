"""Redis paused (SIGSTOP) and killed mid-run: calls return by their deadline, the failure
mode is applied, and service is normal again within a second of the server coming back.

Each scenario has its own redis-server (it is paused and killed). Worker
threads (or tasks) keep acquiring through the outage; every call is timed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.sync import QuotaClient
from ratequota.errors import AcquireTimeout, BackendUnavailable
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer, redis_server_binary

pytestmark = [
    pytest.mark.real_redis,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
]

POLICY = Policy([GroupPolicy("g", capacity=50, tenants=[TenantPolicy("a", guarantee=50)])])
SOCKET_TIMEOUT = 0.25
TIMEOUT = 0.5
#: A call may take its wait plus one socket timeout; the margin absorbs a loaded machine.
BOUND = TIMEOUT + SOCKET_TIMEOUT + 0.5
OPTIONS: dict[str, Any] = {
    "socket_timeout": SOCKET_TIMEOUT,
    "breaker_failures": 2,
    "breaker_reset": 0.3,
    "lease_ttl": 5.0,
}


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may pause and kill."""
    return private_redis


def publish(server: RedisServer) -> None:
    """Publish the policy (again, after a restart lost it) through a separate admin client."""
    admin = QuotaClient(server.url)
    try:
        admin.apply_policy(POLICY)
    finally:
        admin.close()


def one_call(quota: QuotaClient) -> str:
    """One acquire-and-release; the outcome's kind."""
    try:
        with quota.acquire("a", 1, timeout=TIMEOUT) as lease:
            return "synthetic" if lease.synthetic else "redis"
    except BackendUnavailable:
        return "unavailable"
    except AcquireTimeout:
        return "timeout"


def hammer(quota: QuotaClient, seconds: float) -> list[tuple[str, float]]:
    """Four threads calling for ``seconds``; every (outcome, duration)."""
    records: list[tuple[str, float]] = []
    end = time.monotonic() + seconds

    def work() -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            outcome = one_call(quota)
            records.append((outcome, time.monotonic() - started))
            time.sleep(0.01)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 5 * BOUND)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    return records


def recovery_time(quota: QuotaClient) -> float:
    """Seconds until a call is served by Redis again (polled every 20 ms, at most 3 s)."""
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        if one_call(quota) == "redis":
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def check_outage(records: list[tuple[str, float]], mode: str) -> None:
    """Every call returned in time and the failure mode decided the outcome."""
    assert records
    slowest = max(d for _, d in records)
    kinds = {k for k, _ in records}
    print(f"{mode}: {len(records)} calls, slowest {slowest:.3f}s, {sorted(kinds)}")
    assert slowest <= BOUND, f"a call took {slowest:.3f}s"
    if mode == "closed":
        assert "unavailable" in kinds and "synthetic" not in kinds
    elif mode == "open":
        assert "synthetic" in kinds and "unavailable" not in kinds
    else:
        assert "synthetic" in kinds


@pytest.mark.parametrize("mode", ["closed", "open", "local"])
def test_sync_client_survives_pause_and_kill(server: RedisServer, mode: str) -> None:
    """Pause, resume, kill, restart: bounded calls, the mode applied, recovery within 1 s."""
    publish(server)
    extra: dict[str, Any] = {"local_allowance": 2} if mode == "local" else {}
    quota = QuotaClient(server.url, failure_mode=mode, **OPTIONS, **extra)
    try:
        assert one_call(quota) == "redis"
        server.pause()
        try:
            check_outage(hammer(quota, 1.0), mode)
        finally:
            server.resume()
        recovered = recovery_time(quota)
        print(f"{mode}: recovered {recovered:.3f}s after resume")
        assert recovered <= 1.0

        server.kill()
        check_outage(hammer(quota, 0.6), mode)
        server.start()
        publish(server)  # nothing was persisted: the operator's policy comes back with it
        recovered = recovery_time(quota)
        print(f"{mode}: recovered {recovered:.3f}s after restart")
        assert recovered <= 1.0
        assert quota.snapshot("g").used == 0
    finally:
        quota.close()


def test_async_client_survives_pause_and_kill(server: RedisServer) -> None:
    """The async client under the same outage: bounded calls, fail-open applied, recovery."""
    publish(server)

    async def call(quota: AsyncQuotaClient) -> str:
        try:
            async with quota.acquire("a", 1, timeout=TIMEOUT) as lease:
                return "synthetic" if lease.synthetic else "redis"
        except BackendUnavailable:
            return "unavailable"
        except AcquireTimeout:
            return "timeout"

    async def hammer_tasks(quota: AsyncQuotaClient, seconds: float) -> list[tuple[str, float]]:
        records: list[tuple[str, float]] = []
        end = time.monotonic() + seconds

        async def work() -> None:
            while time.monotonic() < end:
                started = time.monotonic()
                outcome = await call(quota)
                records.append((outcome, time.monotonic() - started))
                await asyncio.sleep(0.01)

        await asyncio.wait_for(asyncio.gather(*(work() for _ in range(20))), seconds + 5 * BOUND)
        return records

    async def recovery(quota: AsyncQuotaClient) -> float:
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            if await call(quota) == "redis":
                return time.monotonic() - started
            await asyncio.sleep(0.02)
        return float("inf")

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, failure_mode="open", **OPTIONS)
        try:
            assert await call(quota) == "redis"
            server.pause()
            try:
                check_outage(await hammer_tasks(quota, 1.0), "open")
            finally:
                server.resume()
            assert await recovery(quota) <= 1.0
            server.kill()
            check_outage(await hammer_tasks(quota, 0.6), "open")
            server.start()
            publish(server)
            assert await recovery(quota) <= 1.0
            assert quota.stats().fail_open_admits > 0
        finally:
            await quota.close()

    asyncio.run(main())
