"""Background renewal: the pure schedule, the batched round trip, and renewal in action.

The schedule (``RenewalBook``) is tested with a hand-moved clock. The
renewers are tested with short real TTLs (a few hundred ms): a lease held for
several TTLs must stay live, one taken away must be reported lost, and a
borrower must hear that a lender wants its capacity back.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ratequota.clients.aio import AsyncQuotaClient, async_embedded_backend
from ratequota.clients.backends import embedded_backend
from ratequota.clients.core import QuotaCore
from ratequota.clients.renewal import RenewalBook, renew_many
from ratequota.clients.shell import Batch, LeaseBase
from ratequota.clients.sync import QuotaClient
from ratequota.decision import LeaseInfo, RenewResult
from ratequota.errors import AcquireTimeout, BackendUnavailable
from ratequota.policy import GroupPolicy, Policy, TenantPolicy

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=4,
            tenants=[TenantPolicy("a", guarantee=2), TenantPolicy("b", guarantee=2)],
        )
    ]
)


class FakeTime:
    """A hand-moved clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lease(name: str, ttl: float | None = 3.0, group: str = "g") -> LeaseBase:
    """A lease record, as a client would hold it."""
    return LeaseBase(LeaseInfo(name, "a", group, 1, 1, 0.0), ttl)


def renewed(ok: bool = True, over: bool = False) -> RenewResult:
    """A renewal outcome."""
    return RenewResult(ok, 99.0, over, 1, 2.0, 1, 4)


def test_book_schedules_at_a_fraction_of_the_ttl() -> None:
    """A held lease is due after fraction × TTL, not before; the wait says how long."""
    clock = FakeTime()
    book = RenewalBook(fraction=1 / 3, default_ttl=60.0, clock=clock)
    held = lease("x", ttl=3.0)
    book.hold(held)
    due, wait = book.next()
    assert due == [] and wait == pytest.approx(1.0)
    clock.now = 1.0
    due, _ = book.next()
    assert due == [held]
    assert book.next()[0] == []  # in flight: not handed out twice


def test_book_settles_renewed_lost_and_failed_outcomes() -> None:
    """Renewed: rescheduled with the hint recorded. Lost: dropped. Error: retried sooner."""
    clock = FakeTime()
    book = RenewalBook(fraction=0.5, default_ttl=2.0, clock=clock)
    a, b, c = lease("a", None), lease("b", None), lease("c", None)
    for held in (a, b, c):
        book.hold(held)
    clock.now = 1.0
    assert set(book.next()[0]) == {a, b, c}
    book.settle(a, renewed(over=True))
    book.settle(b, renewed(ok=False))
    book.settle(c, BackendUnavailable("down"))
    assert a.over_limit and a.expires_at == 99.0 and not a.lost
    assert b.lost and len(book) == 2
    clock.now = 1.25
    assert book.next()[0] == [c]  # retried after a quarter period
    clock.now = 2.0
    assert book.next()[0] == [a]


def test_book_ignores_outcomes_for_dropped_leases() -> None:
    """A renewal answering after the holder released must not mark the lease lost."""
    clock = FakeTime()
    book = RenewalBook(fraction=0.5, default_ttl=2.0, clock=clock)
    held = lease("x")
    book.hold(held)
    clock.now = 5.0
    assert book.next()[0] == [held]
    book.drop(held)
    book.settle(held, renewed(ok=False))
    assert not held.lost and len(book) == 0


def test_renew_many_sends_one_batch_per_shard() -> None:
    """Due leases are grouped by shard: one pipelined round trip each, outcomes in order."""
    core = QuotaCore()
    leases = [lease("x1", group="g1"), lease("y1", group="g2"), lease("x2", group="g1")]
    shard = {"g1": "s1", "g2": "s2"}
    flow = renew_many(core, leases, shard.__getitem__)
    first = flow.send(None)
    assert isinstance(first, Batch)
    assert [c.args[2] for c in first.calls] == ["x1", "x2"]
    reply = [1, b"renewed", 5000, 0, 1, b"2", 1, 4, 1000]
    second = flow.send([reply, [0, b"lost", 0, 0, 0, b"0", 0, 4, 0]])
    assert isinstance(second, Batch) and len(second.calls) == 1
    with pytest.raises(StopIteration) as done:
        flow.throw(BackendUnavailable("s2 down"))
    outcomes = done.value.value
    assert isinstance(outcomes[0], RenewResult) and outcomes[0].renewed
    assert isinstance(outcomes[1], BackendUnavailable)
    assert isinstance(outcomes[2], RenewResult) and not outcomes[2].renewed


def test_sync_lease_outlives_its_ttl_while_held_and_renewal_stops_after() -> None:
    """Held 4× its TTL, the lease stays live; after exit the renewer holds nothing."""
    quota = QuotaClient(backend=embedded_backend(shared=False), lease_ttl=0.3)
    quota.apply_policy(POLICY)
    with quota.acquire("a", 2) as held:
        first_expiry = held.expires_at
        time.sleep(1.2)
        assert not held.lost
        assert held.expires_at > first_expiry
        assert quota.snapshot("g").used == 2
    assert len(quota.renewer.book) == 0
    assert quota.snapshot("g").used == 0
    quota.close()


def test_decorated_handler_lease_is_renewed() -> None:
    """The ``limit`` decorator holds a renewed lease for as long as the handler runs."""
    quota = QuotaClient(backend=embedded_backend(shared=False), lease_ttl=0.3)
    quota.apply_policy(POLICY)

    @quota.limit(tenant=lambda: "a", units=1)
    def slow() -> int:
        time.sleep(1.0)
        return quota.snapshot("g").used

    assert slow() == 1
    assert quota.snapshot("g").used == 0
    quota.close()


def test_lost_lease_is_reported() -> None:
    """A lease taken away behind the holder's back (here: released by id) is marked lost."""
    quota = QuotaClient(backend=embedded_backend(shared=False), lease_ttl=0.3)
    quota.apply_policy(POLICY)
    with quota.acquire("a", 1) as held:
        quota.release(held.info)
        deadline = time.monotonic() + 3
        while not held.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held.lost
    quota.close()


def test_borrower_hears_that_the_lender_wants_capacity_back() -> None:
    """While a lender waits for its guarantee, the borrower's renewals say over_limit."""
    quota = QuotaClient(backend=embedded_backend(shared=False), lease_ttl=0.3)
    quota.apply_policy(POLICY)
    with quota.acquire("a", 4) as borrower:
        lender = threading.Thread(target=_wait_for_guarantee, args=(quota,), daemon=True)
        lender.start()
        deadline = time.monotonic() + 3
        while not borrower.over_limit and time.monotonic() < deadline:
            time.sleep(0.02)
        assert borrower.over_limit
    lender.join(5)
    quota.close()


def _wait_for_guarantee(quota: QuotaClient) -> None:
    try:
        with quota.acquire("b", 2, timeout=1.0):
            pass
    except AcquireTimeout:
        pass


def test_async_lease_is_renewed_by_one_task_and_released() -> None:
    """The async client's renewer task keeps many held leases live with batched renewals."""

    async def main() -> None:
        quota = AsyncQuotaClient(backend=async_embedded_backend(shared=False), lease_ttl=0.3)
        await quota.apply_policy(POLICY)

        async def hold() -> bool:
            async with quota.acquire("a", 1) as held:
                await asyncio.sleep(1.0)
                return held.lost

        lost = await asyncio.gather(*(hold() for _ in range(4)))
        assert lost == [False] * 4
        assert (await quota.snapshot("g")).used == 0
        assert len(quota.renewer.book) == 0
        await quota.close()

    asyncio.run(main())
