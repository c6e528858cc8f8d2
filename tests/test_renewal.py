"""Background renewal: the pure schedule, the batched round trip, and renewal in action.

The schedule (``RenewalBook``) is tested with a hand-moved clock. The
renewers run on the client's clock: on a ``ManualClock`` with background renewal
off, the test decides when leases fall due and when they are renewed, on both
clients and both backends. A lease held for several TTLs must stay live, one
taken away must be reported lost, and a borrower must hear that a lender wants
its capacity back.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from ratequota.clients.core import QuotaCore
from ratequota.clients.renewal import RenewalBook, renew_many
from ratequota.clients.shell import LeaseBase
from ratequota.decision import LeaseInfo, RenewResult
from ratequota.engine.ops import Batch
from ratequota.errors import BackendUnavailable
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import MakeClient

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


def _renewing(make: MakeClient, policy: Policy = POLICY) -> tuple[Any, ManualClock]:
    """A client whose held leases are renewed when the test says (``renew_due``), on a
    ManualClock: renewal is exact, and nothing sleeps."""
    clock = ManualClock()
    return make(policy, clock=clock, lease_ttl=3.0, renew_in_background=False), clock


def test_held_lease_outlives_its_ttl_while_renewed_and_renewal_stops_after(
    make_quota: MakeClient,
) -> None:
    """Held 4× its TTL, the lease stays live; after exit the renewer holds nothing."""
    quota, clock = _renewing(make_quota)
    with quota.acquire("a", 2) as held:
        first_expiry = held.expires_at
        assert quota.renewer.renew_due() == 0  # not due before a third of the TTL
        for _ in range(12):
            clock.advance(1.0)
            assert quota.renewer.renew_due() == 1
        assert clock.monotonic() == 12.0  # four TTLs
        assert not held.lost
        assert held.expires_at == first_expiry + 12.0
        assert quota.snapshot("g").used == 2
    assert len(quota.renewer.book) == 0
    clock.advance(1.0)
    assert quota.renewer.renew_due() == 0
    assert quota.snapshot("g").used == 0


def test_many_held_leases_are_renewed_in_one_round(make_quota: MakeClient) -> None:
    """Every lease due at once is renewed in the same round (one batch per shard)."""
    quota, clock = _renewing(make_quota)
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(quota.acquire("a", 1)) for _ in range(2)]
        held += [stack.enter_context(quota.acquire("b", 1)) for _ in range(2)]
        clock.advance(1.0)
        assert quota.renewer.renew_due() == 4
        clock.advance(2.5)  # past the first TTL: alive only because they were renewed
        assert quota.snapshot("g").used == 4
        assert not any(lease.lost for lease in held)
    assert quota.snapshot("g").used == 0


def test_decorated_handler_lease_is_renewed(make_quota: MakeClient) -> None:
    """The ``limit`` decorator holds a renewed lease for as long as the handler runs."""
    quota, clock = _renewing(make_quota)

    @quota.limit(tenant=lambda: "a", units=1)
    def slow() -> int:
        for _ in range(6):
            clock.advance(1.0)
            quota.renewer.renew_due()
        return int(quota.snapshot("g").used)

    assert slow() == 1
    assert quota.snapshot("g").used == 0


def test_lost_lease_is_reported(make_quota: MakeClient) -> None:
    """A lease taken away behind the holder's back (here: released) is marked lost."""
    quota, clock = _renewing(make_quota)
    with quota.acquire("a", 1) as held:
        quota.release(held.info)
        assert not held.lost
        clock.advance(1.0)
        assert quota.renewer.renew_due() == 1
        assert held.lost
        assert len(quota.renewer.book) == 0


def test_borrower_hears_that_the_lender_wants_capacity_back(make_quota: MakeClient) -> None:
    """While a lender waits for its guarantee, the borrower's renewals say over_limit."""
    quota, clock = _renewing(make_quota)
    with quota.acquire("a", 4) as borrower:
        clock.advance(1.0)
        assert quota.renewer.renew_due() == 1
        assert not borrower.over_limit
        ttl_ms = quota.core.ttl_ms(None)
        waiting = quota._run(quota.core.attempt("b", 2, None, "lender", ttl_ms, wait=True))
        assert not waiting.admitted  # registered as waiting for its guarantee
        clock.advance(1.0)
        assert quota.renewer.renew_due() == 1
        assert borrower.over_limit
