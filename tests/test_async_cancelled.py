"""A caller cancelled while its acquire is queued or in flight leaves no lease behind.

The async client cannot take back a call it has sent, and the script may admit
it: before, that lease held its units, unused, until its expiry (a minute by
default), so a storm of timed-out handlers could keep a group full of leases
nobody held. Now the reply still comes to the client, which releases a lease
granted to a caller that is gone. Run on fakeredis and on a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.async_backends import async_embedded_backend, async_url_backend
from ratequota.engine.keys import KeySpace
from ratequota.engine.protocol import acquire_call, release_call
from ratequota.engine.replies import granted_lease
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

POLICY = Policy([GroupPolicy("g", 10, [TenantPolicy("a", guarantee=6), TenantPolicy("b")])])


async def _settled(quota: AsyncQuotaClient) -> int:
    """Units held once every round trip in flight has come back and the client's background
    work (an orphan's release, spawned by a reply) is done."""
    for _ in range(500):
        pending = [*quota._background, *(t for b in quota._batchers.values() for t in b._tasks)]
        on_pipe = any(b._trips for b in quota._batchers.values())  # answered by callbacks
        if not pending and not on_pipe:
            return int((await quota.snapshot("g")).used)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            await asyncio.sleep(0.01)  # a reply on its way to the pipe (no task to await)
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
