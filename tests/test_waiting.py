"""Waiting acquires: bounded, jittered, never past the deadline; no starvation of large batches.

Most tests pin time with ``ManualClock`` (sleeps advance it), so "never
busy-loops" and "never sleeps past the deadline" are exact statements about
the sleeps the flow asked for. The bounds, the starvation and the queue
tests run on both clients and both backends; the latter drive the tries step
by step, so they state the order exactly.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from ratequota.decision import Decision
from ratequota.errors import AcquireTimeout
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock, fake_client
from tests.conftest import MakeClient

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


def test_wait_is_bounded_jittered_and_ends_exactly_at_the_deadline(make_quota: MakeClient) -> None:
    """A refused acquire retries a bounded number of times and gives up at the deadline.

    Never busy-loops (every pause > 0, few tries), never sleeps past the
    deadline (total sleep equals the timeout), and the error says how long it
    waited and why it was last refused. Both clients drive the same flow.
    """
    clock = CountingClock()
    quota = make_quota(POLICY, clock=clock)
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
    assert "refused 1 unit for" in str(info.value)  # not "1 units"


def test_timeout_zero_never_waits(make_quota: MakeClient) -> None:
    """``timeout=0`` tries once and raises at once: no sleep at all (both clients)."""
    clock = CountingClock()
    quota = make_quota(POLICY, clock=clock)
    quota.try_acquire("a", 4)
    with pytest.raises(AcquireTimeout), quota.acquire("a", 1, timeout=0):
        pass
    assert clock.sleeps == []
    assert clock.monotonic() == 0


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


def _try_waiting(quota: Any, tenant: str, units: int, request_id: str) -> Decision:
    """One try of a waiting acquire (what ``acquire(timeout=...)`` does between its sleeps):
    admitted, or refused and registered (or kept) as waiting under ``request_id``."""
    ttl_ms = quota.core.ttl_ms(None)
    return quota._run(  # type: ignore[no-any-return]
        quota.core.attempt(tenant, units, None, request_id, ttl_ms, wait=True)
    )


def _wait_once(quota: Any, tenant: str, units: int, request_id: str) -> bool:
    """``_try_waiting``: was it admitted?"""
    return bool(_try_waiting(quota, tenant, units, request_id).admitted)


def test_large_batch_is_not_starved_by_a_stream_of_small_ones(make_quota: MakeClient) -> None:
    """While an 8-unit request of a tenant waits, its 1-unit requests leave room for it.

    Without first-in-first-out waiting the group (8 units, all of tenant a) would
    never have 8 units free at once while small leases keep coming and going.
    Driven step by step, on both clients and both backends: from the moment the
    big request is registered, small requests are only admitted into room the big
    one cannot use yet, and it gets in as soon as the units held at its
    registration are released.
    """
    policy = Policy([GroupPolicy("g", capacity=8, tenants=[TenantPolicy("a", guarantee=8)])])
    quota = make_quota(policy, clock=ManualClock())
    held = [quota.try_acquire("a", 1).lease for _ in range(5)]
    assert not _wait_once(quota, "a", 8, "big")  # 3 free: the big one waits, first in line
    for _ in range(10):  # the stream goes on: none of it may take the room the big one needs
        assert not quota.try_acquire("a", 1).admitted
    rng = random.Random(7)
    rng.shuffle(held)
    while held:
        quota.release(held.pop())
        assert quota.try_acquire("a", 1).admitted is False
        if held:
            assert not _wait_once(quota, "a", 8, "big")
    assert _wait_once(quota, "a", 8, "big")
    snap = quota.snapshot("g")
    assert snap.used == 8 and snap.tenants["a"].pending == 0


def test_a_long_queue_of_one_tenant_drains_in_order(make_quota: MakeClient) -> None:
    """16 two-unit waiters at a limit of 3 all get in, one at a time, in arrival order.

    Each round releases the holder and lets every waiter retry in a random order:
    exactly the oldest waiter is admitted, so the queue neither stalls nor lets a
    later arrival overtake. (The pacing of retries is tested with ``CountingClock``.)
    """
    quota = make_quota(
        Policy([GroupPolicy("q", capacity=3, tenants=[TenantPolicy("a", 3)])]),
        clock=ManualClock(),
    )
    first = quota.try_acquire("a", 2)
    assert first.lease is not None
    waiting = [f"w{n:02d}" for n in range(16)]
    for request_id in waiting:
        assert not _wait_once(quota, "a", 2, request_id)
    holder = first.lease
    rng = random.Random(11)
    admitted: list[str] = []
    while waiting:
        quota.release(holder)
        order = waiting[:]
        rng.shuffle(order)
        decisions = {rid: _try_waiting(quota, "a", 2, rid) for rid in order}
        won = [rid for rid in order if decisions[rid].admitted]
        assert won == [waiting[0]], (won, waiting[0])
        lease = decisions[won[0]].lease
        assert lease is not None
        holder = lease
        admitted.append(waiting.pop(0))
    quota.release(holder)
    assert admitted == sorted(admitted) and len(admitted) == 16
    assert quota.snapshot("q").used == 0
