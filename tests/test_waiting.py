"""Waiting acquires: bounded, jittered, never past the deadline; no starvation of large batches.

Most tests pin time with ``ManualClock`` (sleeps advance it), so "never
busy-loops" and "never sleeps past the deadline" are exact statements about
the sleeps the flow asked for. The starvation test runs several real clients
against a real redis-server for a bounded time.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ratequota.clients.aio import AsyncQuotaClient, async_embedded_backend
from ratequota.clients.backends import url_backend
from ratequota.clients.sync import QuotaClient
from ratequota.errors import AcquireTimeout
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock, fake_client
from tests.servers import RedisServer

POLICY = Policy([GroupPolicy("g", capacity=4, tenants=[TenantPolicy("a", guarantee=4)])])


class CountingClock(ManualClock):
    """A ManualClock that records every sleep the client asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        """Record, then advance."""
        self.sleeps.append(seconds)
        super().sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """Record, then advance."""
        self.sleeps.append(seconds)
        await super().asleep(seconds)


def test_wait_is_bounded_jittered_and_ends_exactly_at_the_deadline() -> None:
    """A refused acquire retries a bounded number of times and gives up at the deadline.

    Never busy-loops (every pause > 0, few tries), never sleeps past the
    deadline (total sleep equals the timeout), and the error says how long it
    waited and why it was last refused.
    """
    clock = CountingClock()
    quota = fake_client(POLICY, clock=clock)
    blocker = quota.try_acquire("a", 4)
    assert blocker.admitted
    with pytest.raises(AcquireTimeout) as info, quota.acquire("a", 1, timeout=2.0):
        pass
    assert all(s > 0 for s in clock.sleeps)
    # The first two in a tenant's queue are told to retry within 20 ms (a jittered 10-20 ms
    # pause): at most ~2 s / 10 ms tries, far from a busy loop, each pause bounded below.
    assert len(clock.sleeps) <= 2.0 / 0.01 + 10
    assert sum(clock.sleeps) == pytest.approx(2.0)
    assert clock.monotonic() == pytest.approx(2.0)
    assert info.value.waited == pytest.approx(2.0)
    assert "waiting 2.000s" in str(info.value)
    assert info.value.decision.reason in ("tenant_limit", "group_full")
    assert "refused 1 units" in str(info.value)
    quota.close()


def test_timeout_zero_never_waits() -> None:
    """``timeout=0`` tries once and raises at once: no sleep at all."""
    clock = CountingClock()
    quota = fake_client(POLICY, clock=clock)
    quota.try_acquire("a", 4)
    with pytest.raises(AcquireTimeout), quota.acquire("a", 1, timeout=0):
        pass
    assert clock.sleeps == []
    assert clock.monotonic() == 0
    quota.close()


def test_waiter_is_admitted_when_units_come_back() -> None:
    """A waiting acquire succeeds as soon as a release frees units, well before its deadline."""
    clock = CountingClock()
    quota = fake_client(POLICY, clock=clock)
    blocker = quota.try_acquire("a", 4)
    assert blocker.lease is not None

    original = clock.sleep

    def release_on_third_sleep(seconds: float) -> None:
        original(seconds)
        if len(clock.sleeps) == 3:
            quota.release(blocker.lease)  # type: ignore[arg-type]

    clock.sleep = release_on_third_sleep  # type: ignore[method-assign]
    with quota.acquire("a", 2, timeout=10) as lease:
        assert lease.units == 2
    assert len(clock.sleeps) == 3
    quota.close()


def test_async_wait_has_the_same_bounds() -> None:
    """The async client drives the same flow: bounded tries, exact deadline, same error."""

    async def main() -> None:
        clock = CountingClock()
        quota = AsyncQuotaClient(backend=async_embedded_backend(shared=False), clock=clock)
        await quota.apply_policy(POLICY)
        await quota.try_acquire("a", 4)
        with pytest.raises(AcquireTimeout) as info:
            async with quota.acquire("a", 1, timeout=1.5):
                pass
        assert sum(clock.sleeps) == pytest.approx(1.5)
        assert 0 < len(clock.sleeps) <= 1.5 / 0.01 + 10  # next-in-line pace, as above
        assert info.value.waited == pytest.approx(1.5)
        clock.sleeps.clear()
        with pytest.raises(AcquireTimeout):
            async with quota.acquire("a", 1, timeout=0):
                pass
        assert clock.sleeps == []
        await quota.close()

    asyncio.run(main())


@pytest.mark.real_redis
def test_large_batch_is_not_starved_by_a_stream_of_small_ones(real_redis: RedisServer) -> None:
    """An 8-unit request gets in within bounded time while 1-unit requests keep arriving.

    Three clients (pods) stream 1-unit acquires of the same tenant, each held
    briefly, so without FIFO waiting the group would never have 8 units free
    at once. The big request must be admitted well within its timeout.
    """
    policy = Policy([GroupPolicy("g", capacity=8, tenants=[TenantPolicy("a", guarantee=8)])])
    clients = [
        QuotaClient(backend=url_backend(real_redis.url, socket_timeout=2.0)) for _ in range(4)
    ]
    clients[0].apply_policy(policy)
    stop = threading.Event()
    small_admitted = [0]

    def stream(quota: QuotaClient) -> None:
        deadline = time.monotonic() + 8.0
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with quota.acquire("a", 1, timeout=0.5):
                    small_admitted[0] += 1
                    time.sleep(0.02)
            except AcquireTimeout:
                pass

    streamers = [
        threading.Thread(target=stream, args=(clients[i % 3],), daemon=True) for i in range(9)
    ]
    for thread in streamers:
        thread.start()
    try:
        time.sleep(0.3)  # the stream is flowing
        started = time.monotonic()
        with clients[3].acquire("a", 8, timeout=5.0) as lease:
            waited = time.monotonic() - started
            assert lease.units == 8
    finally:
        stop.set()
        for thread in streamers:
            thread.join(5)
        for quota in clients:
            quota.close()
    assert not any(t.is_alive() for t in streamers)
    assert small_admitted[0] > 10
    print(f"8-unit request waited {waited:.3f}s; {small_admitted[0]} small leases meanwhile")
    assert waited < 5.0


@pytest.mark.real_redis
def test_a_long_queue_of_one_tenant_drains_in_order(real_redis: RedisServer) -> None:
    """40 two-unit waiters at a limit of 3 all get in, one after another, in bounded time.

    Only one fits at a time, so each admission waits for the previous release:
    the front of the tenant's queue is told to retry soon (paced by its place in
    line), so the queue drains at the pace of the holds, not of the backoff cap.
    The bound is generous; it catches a queue that stalls, not a slow machine.
    """
    quota = QuotaClient(backend=url_backend(real_redis.url, socket_timeout=5.0))
    quota.apply_policy(Policy([GroupPolicy("q", capacity=3, tenants=[TenantPolicy("a", 3)])]))
    admitted: list[int] = []
    errors: list[BaseException] = []

    def waiter(number: int) -> None:
        try:
            with quota.acquire("a", 2, timeout=30):
                admitted.append(number)
                time.sleep(0.005)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(40)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    elapsed = time.monotonic() - started
    assert errors == []
    assert sorted(admitted) == list(range(40))
    assert elapsed < 20, f"the queue took {elapsed:.1f}s to drain"
    assert quota.snapshot("q").used == 0
    quota.close()
