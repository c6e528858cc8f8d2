"""A caller cancelled while its acquire is queued or in flight leaves no lease behind.

The async client cannot take back a call it has sent, and the script may admit
it: before, that lease held its units, unused, until its expiry (a minute by
default), so a storm of timed-out handlers could keep a group full of leases
nobody held. Now the reply still comes to the client, which releases a lease
granted to a caller that is gone. Run on fakeredis and on a real redis-server.

Likewise a caller cancelled while it waits for units: its refusals registered
them as waiting demand, which lowered the other tenants' limits until
``pending_ttl``; the registration is now withdrawn when the caller goes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.async_backends import async_embedded_backend, async_url_backend
from ratequota.engine.keys import KeySpace
from ratequota.engine.protocol import acquire_call, release_call
from ratequota.engine.replies import granted_lease, refused_waiting
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.servers import RedisServer

POLICY = Policy([GroupPolicy("g", 10, [TenantPolicy("a", guarantee=6), TenantPolicy("b")])])


async def _settled(quota: AsyncQuotaClient) -> int:
    """Units held once every round trip in flight has come back and the client's background
    work (an orphan's release, a withdrawal, spawned by a reply) is done.

    A snapshot is the barrier: on the client's pipe replies come in the order the calls
    went, so when its reply is in, every earlier one is (and handed to its callback); the
    batcher's tasks and the background tasks are awaited."""
    for _ in range(20):
        tasks = [*quota._background, *(t for b in quota._batchers.values() for t in b._tasks)]
        await asyncio.gather(*tasks, return_exceptions=True)
        used = int((await quota.snapshot("g")).used)
        if not quota._background:  # nothing spawned by a reply that came before the snapshot's
            return used
    raise AssertionError("the client's round trips and background work never ended")


async def _cancelled_callers(quota: AsyncQuotaClient) -> None:
    await quota.apply_policy(POLICY)
    kept = await quota.try_acquire("b", 2)
    assert kept.lease is not None
    # Cancelled with its call queued (before its round trip began) and with it in flight.
    for pause in (0, 1):
        caller = asyncio.ensure_future(quota.try_acquire("a", 3))
        for _ in range(pause + 1):
            await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await _settled(quota) == 2  # only b's lease: a's went back
    # A caller that is not cancelled keeps its lease, replies of every kind alike.
    held = await quota.try_acquire("a", 3)
    assert held.lease is not None and await _settled(quota) == 5
    await quota.release(held.lease)
    await quota.release(kept.lease)
    assert await _settled(quota) == 0


def test_a_cancelled_callers_lease_goes_back_on_fakeredis() -> None:
    """fakeredis: the lease granted to a caller cancelled mid-call is released at once."""

    async def main() -> None:
        quota = AsyncQuotaClient(backend=async_embedded_backend(shared=False), auto_renew=False)
        try:
            await _cancelled_callers(quota)
        finally:
            await quota.close()

    asyncio.run(main())


@pytest.mark.real_redis
def test_a_cancelled_callers_lease_goes_back_on_real_redis(real_redis: RedisServer) -> None:
    """The same on a real server, through the client's packed calls."""

    async def main() -> None:
        backend = async_url_backend(real_redis.url, socket_timeout=5.0)
        quota = AsyncQuotaClient(backend=backend, auto_renew=False)
        try:
            await _cancelled_callers(quota)
        finally:
            await quota.close()

    asyncio.run(main())


def test_granted_lease_reads_only_admissions_of_acquire() -> None:
    """The lease in an acquire reply: admitted or replayed only; other replies and scripts
    give none."""
    keyspace = KeySpace()
    call = acquire_call(keyspace, "g", "a", 3, "r1", 30_000, wait=False, pending_ms=1, purge=1)
    admitted: list[Any] = [1, b"admitted", 1_800_000_030_000, 77, 3, b"6", 3, 10, 0, 1, 0]
    lease = granted_lease(call, admitted)
    assert lease is not None
    assert (lease.id, lease.tenant, lease.group, lease.units, lease.token) == (
        "r1",
        "a",
        "g",
        3,
        77,
    )
    assert lease.expires_at == 1_800_000_030.0
    refused = [0, b"tenant_limit", 0, 0, 0, b"6", 10, 10, 20, 1, 0]
    assert granted_lease(call, refused) is None
    assert granted_lease(call, ValueError("boom")) is None
    release = release_call(keyspace, "g", "r1", tenant="a", token=77, purge=1)
    assert granted_lease(release, admitted) is None


class _ParkedClock(ManualClock):
    """A manual clock whose sleeps never end: a waiting caller parks between its attempts,
    and ``parked`` says when it has (time is driven by the test, never by the wall clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.parked: asyncio.Event | None = None

    async def asleep(self, seconds: float) -> None:
        assert self.parked is not None
        self.parked.set()
        await asyncio.Event().wait()  # until the caller is cancelled


async def _pending(quota: AsyncQuotaClient, tenant: str) -> int:
    """Units of ``tenant`` waiting (a snapshot lists only tenants holding or waiting)."""
    listed = (await quota.snapshot("g")).tenants.get(tenant)
    return 0 if listed is None else listed.pending


async def _abandoned_waiter(quota: AsyncQuotaClient, clock: _ParkedClock, when: str) -> None:
    await quota.apply_policy(POLICY)
    full = await quota.try_acquire("a", 10)
    assert full.lease is not None

    async def wait_for_b() -> None:
        async with quota.acquire("b", 3, timeout=30.0):
            raise AssertionError("b cannot be admitted while a holds everything")

    clock.parked = asyncio.Event()
    caller = asyncio.ensure_future(wait_for_b())
    if when == "sleeping":  # refused, registered, and between two attempts
        await clock.parked.wait()
        assert await _pending(quota, "b") == 3
    else:  # its first attempt sent, its reply not read yet
        await asyncio.sleep(0)
        assert not clock.parked.is_set()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await _settled(quota)
    assert await _pending(quota, "b") == 0  # withdrawn, not left to lapse (pending_ttl 60 s)
    await quota.release(full.lease)


@pytest.mark.parametrize("when", ["sleeping", "in flight"])
@pytest.mark.parametrize("store", ["fake", pytest.param("real", marks=pytest.mark.real_redis)])
def test_a_cancelled_waiters_registration_is_withdrawn(
    store: str, when: str, request: pytest.FixtureRequest
) -> None:
    """A caller waiting for units, cancelled between two attempts or with an attempt in
    flight: its waiting registration is withdrawn at once instead of counting as demand
    (lowering the other tenants' limits) until ``pending_ttl``. On fakeredis and on a real
    server through the client's pipe."""

    async def main() -> None:
        if store == "fake":
            backend: Any = async_embedded_backend(shared=False)
        else:
            server: RedisServer = request.getfixturevalue("real_redis")
            backend = async_url_backend(server.url, socket_timeout=5.0)
        clock = _ParkedClock()
        quota = AsyncQuotaClient(backend=backend, clock=clock, auto_renew=False, pending_ttl=60.0)
        try:
            await _abandoned_waiter(quota, clock, when)
        finally:
            await quota.close()

    asyncio.run(main())


def test_refused_waiting_reads_only_refusals_of_waiting_acquires() -> None:
    """The registration an acquire reply may have made: a refusal of a call that asked to
    wait only; an admission, a call that did not wait, another script, an error: none."""
    keyspace = KeySpace()
    waiting = acquire_call(keyspace, "g", "a", 3, "r1", 30_000, wait=True, pending_ms=1, purge=1)
    alone = acquire_call(keyspace, "g", "a", 3, "r1", 30_000, wait=False, pending_ms=1, purge=1)
    refused: list[Any] = [0, b"group_full", 0, 0, 0, b"6", 10, 10, 20, 1, 0]
    admitted: list[Any] = [1, b"admitted", 1_800_000_030_000, 77, 3, b"6", 3, 10, 0, 1, 0]
    assert refused_waiting(waiting, refused) == ("r1", "a")
    assert refused_waiting(waiting, admitted) is None
    assert refused_waiting(alone, refused) is None
    assert refused_waiting(waiting, ValueError("boom")) is None
    release = release_call(keyspace, "g", "r1", tenant="a", token=0, purge=1)
    assert refused_waiting(release, refused) is None
