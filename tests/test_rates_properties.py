"""The rate-meter rule (docs/rates.md) as named properties of the pure reference ratequota/rates.py.

All in ticks (``TICKS_PER_TOKEN`` to a token) and ms, so every bound is
checked exactly. Histories come from ``tests.strategies.meter_histories``:
random groups (rates and bursts summing up to the group's, pure borrowers,
ceils from the rate to the group's rate, debts from 0) and random requests,
some settled above or below their estimate.
"""

from __future__ import annotations

import random
from collections import defaultdict

import attrs
from hypothesis import given
from hypothesis import strategies as st

from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from ratequota.rates import TICKS_PER_TOKEN, decide, group_at, tenant_at
from ratequota.settlement import MeterBook, Reservation, close_reservation, settle_reservation
from tests.strategies import MeterStep, meter_histories

T = TICKS_PER_TOKEN


@attrs.define
class Charge:
    """Ticks charged to the books at ``time`` by ``tenant``: an admission or a settlement."""

    time: int
    tenant: str
    ceil: int  # net ticks the tenant's ceiling bucket lost
    group: int  # net ticks the group bucket lost
    admission: bool


def replay(
    policy: GroupPolicy, steps: list[MeterStep], *, settle: bool
) -> tuple[MeterBook, list[Charge]]:
    """Run ``steps`` through a ``MeterBook``; with ``settle``, settle each admission at once."""
    book = MeterBook.for_policy(policy, "tokens")
    names = [t.name for t in policy.tenants]
    now = 0
    charges: list[Charge] = []
    for dt, index, amount, extra in steps:
        now += dt
        name = names[index]
        decision = book.ask(name, amount, now)
        if not decision.admitted or decision.path is None:
            continue
        charges.append(Charge(now, name, amount * T, amount * T, True))
        if settle and extra:
            delta = max(extra, -amount)
            done = book.settle(name, decision.path, delta, now)
            _own, clip_ceil, clip_group = done.clipped
            charges.append(Charge(now, name, delta * T - clip_ceil, delta * T - clip_group, False))
    return book, charges


def windows(charges: list[Charge]) -> list[tuple[int, int, int, int]]:
    """Every interval [first charge, last charge]: (length ms, Σ ceil ticks, Σ group ticks, i)."""
    out = []
    for i, first in enumerate(charges):
        ceil = group = 0
        for last in charges[i:]:
            ceil += last.ceil
            group += last.group
            out.append((last.time - first.time, ceil, group, i))
    return out


@given(meter_histories())
def test_admissions_stay_within_ceil_and_group_rate_over_any_interval(
    case: tuple[GroupPolicy, list[MeterStep]],
) -> None:
    """Over any interval of length T: a tenant <= ceil·T + cburst, the group <= rate·T + burst."""
    policy, steps = case
    book, charges = replay(policy, steps, settle=False)
    for name, share in book.shares.items():
        mine = [c for c in charges if c.tenant == name]
        for length, ceil, _group, _ in windows(mine):
            assert ceil <= share.ceil * length + share.ccap
    for length, _ceil, group, _ in windows(charges):
        assert group <= book.meter.rate * length + book.meter.cap


@given(meter_histories())
def test_settled_debt_is_bounded(case: tuple[GroupPolicy, list[MeterStep]]) -> None:
    """With settlements above the estimate, the overrun a tenant's buckets carry is bounded.

    Net of what was forgiven, a tenant is charged at most ceil·T + cburst + debt
    over any interval, and the group rate·T + burst + Σ tenant bursts + debt:
    debt is repaid before the next admission, and forgiven beyond its bound.
    """
    policy, steps = case
    book, charges = replay(policy, steps, settle=True)
    debt = -book.meter.floor
    for name, share in book.shares.items():
        mine = [c for c in charges if c.tenant == name]
        for length, ceil, _group, _ in windows(mine):
            assert ceil <= share.ceil * length + share.ccap + debt
        assert book.tenants.get(name) is None or book.tenants[name].ceil >= min(0, -debt)
    bound = book.meter.cap + book.meter.reserve + debt
    for length, _ceil, group, _ in windows(charges):
        assert group <= book.meter.rate * length + bound


def conforms(history: list[tuple[int, int]], now: int, need: int, rate: int, cap: int) -> bool:
    """Whether ``history`` plus ``need`` at ``now`` stays within (rate, cap) on every window.

    The window form of a token bucket that starts full: for every earlier
    request j, the ticks from j up to now are at most cap + rate·(now − t_j).
    Written independently of ``rates.refill``.
    """
    if need > cap:
        return False
    total = need
    for time, ticks in reversed(history):
        total += ticks
        if total > cap + rate * (now - time):
            return False
    return True


@given(meter_histories(min_tenants=2), st.data())
def test_a_tenant_within_its_own_rate_is_never_refused(
    case: tuple[GroupPolicy, list[MeterStep]], data: st.DataObject
) -> None:
    """Whatever the others do (borrow, overrun their estimates), asking within one's rate passes.

    The watched tenant's admitted requests plus the new one conform to its
    (rate, burst): then the meter admits it, whoever else has borrowed.
    """
    policy, steps = case
    book = MeterBook.for_policy(policy, "tokens")
    names = [t.name for t in policy.tenants]
    watched = data.draw(st.sampled_from(names))
    share = book.shares[watched]
    history: list[tuple[int, int]] = []
    now = 0
    checked = 0
    for dt, index, amount, extra in steps:
        now += dt
        name = names[index]
        if name == watched and conforms(history, now, amount * T, share.rate, share.cap):
            checked += 1
            decision = book.ask(name, amount, now)
            assert decision.admitted, (decision, history)
        else:
            decision = book.ask(name, amount, now)
        if decision.admitted and decision.path is not None:
            if name == watched:
                history.append((now, amount * T))
            elif extra:
                book.settle(name, decision.path, max(extra, -amount), now)


@given(meter_histories(min_tenants=2))
def test_borrowing_leaves_every_guarantee_claimable(
    case: tuple[GroupPolicy, list[MeterStep]],
) -> None:
    """A borrower takes only what others leave unused: after a borrow, the group bucket still
    holds every tenant's unspent guaranteed tokens (refilled to now, computed independently)."""
    policy, steps = case
    book = MeterBook.for_policy(policy, "tokens")
    names = [t.name for t in policy.tenants]
    now = 0
    for dt, index, amount, _extra in steps:
        now += dt
        decision = book.ask(names[index], amount, now)
        if decision.path == "borrow":
            claims = 0
            for other, share in book.shares.items():
                own = tenant_at(share, book.tenants.get(other), now).own
                claims += max(0, own)
            assert book.group is not None and book.group.level >= claims


def test_a_borrower_stops_at_the_reserve() -> None:
    """An idle lender's burst stays in the group bucket: a borrower drains only the rest, and the
    lender's whole burst still passes at once afterwards."""
    group = MeterPolicy("tokens", rate=10, burst=20)
    lender = TenantPolicy("a", meters=(TenantMeter("tokens", rate=5, burst=10),))
    borrower = TenantPolicy("b", meters=(TenantMeter("tokens", rate=0),))
    book = MeterBook.for_policy(GroupPolicy("g", 1, (lender, borrower), meters=(group,)), "tokens")
    admitted = [book.ask("b", 1, 0).admitted for _ in range(15)]
    assert admitted == [True] * 10 + [False] * 5
    refused = book.ask("b", 1, 0)
    assert refused.reason == "group" and refused.retry_ms == 100  # 1 token at 10/s
    assert all(book.ask("a", 1, 0).admitted for _ in range(10))


def test_a_borrower_gets_no_rate_the_lenders_use() -> None:
    """Lenders using their whole guaranteed rates (Σ = the group's) leave a borrower no rate:
    it gets at most a burst at the start, nothing after; once they stop, it gets their rate."""
    group = MeterPolicy("tokens", rate=100, burst=50)
    shares = [TenantMeter("tokens", rate=60, burst=10), TenantMeter("tokens", rate=40, burst=10)]
    tenants = [TenantPolicy(f"l{i}", meters=(s,)) for i, s in enumerate(shares)]
    tenants.append(TenantPolicy("b", meters=(TenantMeter("tokens", rate=0, ceil=100),)))
    book = MeterBook.for_policy(GroupPolicy("g", 1, tuple(tenants), meters=(group,)), "tokens")
    borrowed = [0, 0]
    for ms in range(1, 20_001):
        if ms % 50 == 0:  # 3 and 2 tokens every 50 ms: 60/s and 40/s
            assert book.ask("l0", 3, ms).admitted
            assert book.ask("l1", 2, ms).admitted
        borrowed[ms > 1_000] += book.ask("b", 1, ms).admitted
    # The group's burst, taken while the lenders' buckets settle into their rhythm; then none.
    assert borrowed[0] <= 50
    assert borrowed[1] == 0
    later = 0
    for ms in range(20_001, 30_001):
        later += book.ask("b", 1, ms).admitted
    assert 1_000 - 60 <= later <= 1_000 + 50


def test_weighted_borrowers_share_the_spare_rate_1_2_3() -> None:
    """Three borrowers with weights 1/2/3 asking all the time over a fixed spare rate get
    shares within 5 % of 1:2:3 over a long run (a lender holds half the rate all along)."""
    group = MeterPolicy("tokens", rate=600, burst=60)
    lender = TenantPolicy("lender", meters=(TenantMeter("tokens", rate=300, ceil=300, burst=30),))
    borrowers = [
        TenantPolicy(f"w{w}", meters=(TenantMeter("tokens", rate=0, ceil=600, weight=w),))
        for w in (1.0, 2.0, 3.0)
    ]
    policy = GroupPolicy("g", 1, (lender, *borrowers), meters=(group,))
    book = MeterBook.for_policy(policy, "tokens")
    rnd = random.Random(7)
    got: dict[str, int] = defaultdict(int)
    names = [b.name for b in borrowers]
    for ms in range(1, 40_001):
        if ms % 10 == 0:
            assert book.ask("lender", 3, ms).admitted
        rnd.shuffle(names)
        for name in names:
            if book.ask(name, 1, ms).admitted:
                got[name] += 1
    total = sum(got.values())
    assert total >= 300 * 40 * 0.99  # the spare is used, not wasted
    for weight, name in ((1, "w1.0"), (2, "w2.0"), (3, "w3.0")):
        expected = total * weight / 6
        assert abs(got[name] - expected) <= 0.05 * expected, dict(got)


@given(meter_histories(), st.data())
def test_retry_after_is_exact(
    case: tuple[GroupPolicy, list[MeterStep]], data: st.DataObject
) -> None:
    """A refusal's retry_ms comes from the buckets: with nothing else happening, the same request
    is refused one ms earlier and admitted at exactly now + retry_ms. Every refusal that can ever
    pass names a time; for a borrower ahead of its share it is an estimate, not checked here."""
    policy, steps = case
    book, _ = replay(policy, steps, settle=True)
    now = sum(step[0] for step in steps)
    name = data.draw(st.sampled_from(sorted(book.shares)))
    amount = data.draw(st.integers(1, book.meter.cap // T + 1))
    share = book.shares[name]
    state = book.tenants.get(name)
    floor = book.floor(now)
    contends = book.contends(name, now)
    first = decide(book.meter, share, book.group, state, amount, now, floor, contends)
    if first.admitted:
        return
    if first.reason == "too_large":
        assert first.retry_ms is None
        return
    assert first.retry_ms is not None and first.retry_ms > 0
    tag = 0.0 if state is None else state.tag
    start = tag if contends else (0.0 if floor is None else floor)
    if floor is not None and share.weight * (start - floor) > book.meter.quantum:
        return  # ahead of its share: the time assumes the others catch up (an estimate)
    at = now + first.retry_ms
    # Contention ends CONTEND_MS after the last attempt; it may only end sooner, never begin.
    assert decide(book.meter, share, book.group, state, amount, at, floor, contends).admitted
    before = decide(book.meter, share, book.group, state, amount, at - 1, floor, contends)
    assert not before.admitted


Event = tuple[str, int, str, int]  # (kind, lease index, lease id or a wrong one, amount)


@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=6),
    st.lists(
        st.tuples(
            st.sampled_from(["settle", "settle", "close", "wrong_token", "wrong_id"]),
            st.integers(0, 5),
            st.integers(0, 40),
            st.integers(0, 3),
        ),
        max_size=40,
    ),
)
def test_settlement_never_loses_or_doubles_tokens(
    estimates: list[int], events: list[tuple[str, int, int, int]]
) -> None:
    """Whatever the order of settle, release, expiry and retry, each lease is charged its final
    amount exactly once: the actual of its first settlement, else its estimate. The buckets
    (deep in debt room, so nothing is clipped) lose exactly Σ finals, across refills."""
    group = MeterPolicy("tokens", rate=1, burst=10_000, debt=10_000)
    tenant = TenantPolicy("a", meters=(TenantMeter("tokens", rate=1, burst=10_000),))
    book = MeterBook.for_policy(GroupPolicy("g", 1, (tenant,), meters=(group,)), "tokens")
    now = 0
    # Drain the buckets deep first, so that no refund reaches their size and no overrun their
    # debt bound: then nothing is clipped and the levels are exact balances.
    assert book.ask("a", 9_000, now).admitted
    records: list[Reservation] = []
    for index, estimate in enumerate(estimates):
        decision = book.ask("a", estimate, now)
        assert decision.admitted and decision.path == "rate"
        records.append(Reservation(f"L{index}", 100 + index, "a", estimate, "rate"))
    start_level = 1_000 * T - sum(estimates) * T
    first_final: dict[int, int] = {}
    applied: dict[int, int] = defaultdict(int)
    for kind, lease, actual, dt in events:
        now += dt
        index = lease % len(records)
        record = records[index]
        if kind == "close":
            records[index] = close_reservation(record)
            first_final.setdefault(index, record.estimate)
            continue
        lease_id = record.lease_id + ("x" if kind == "wrong_id" else "")
        token = record.token + (1 if kind == "wrong_token" else 0)
        new, delta, outcome = settle_reservation(record, lease_id, token, actual)
        records[index] = new
        if kind != "settle":
            assert (new, delta, outcome) == (record, None, "mismatch")
            continue
        if delta is not None:
            applied[index] += 1
            first_final.setdefault(index, actual)
            done = book.settle("a", "rate", delta, now)
            assert done.clipped == (0, 0, 0)
        else:
            assert outcome in ("replay", "conflict")
            assert (outcome == "replay") == (record.final == actual)
    assert all(count == 1 for count in applied.values())
    for index, record in enumerate(records):
        record = close_reservation(record)
        assert record.final == first_final.get(index, record.estimate)
    finals = sum(close_reservation(r).final or 0 for r in records)
    state = tenant_at(book.shares["a"], book.tenants["a"], now)
    # The bucket never reaches its size here, so its level is the exact balance of the books.
    assert state.own == start_level + now * book.shares["a"].rate - (finals - sum(estimates)) * T
    level = group_at(book.meter, book.group, now).level
    assert level == start_level + now * book.meter.rate - (finals - sum(estimates)) * T


def test_debt_is_repaid_before_the_next_admission_and_bounded() -> None:
    """A settlement above the estimate leaves a debt: the tenant is refused until its ceiling
    bucket has repaid it (retry_ms says exactly when); beyond the debt bound it is forgiven."""
    group = MeterPolicy("tokens", rate=60, burst=10, per="minute", debt=5)
    tenant = TenantPolicy("a", meters=(TenantMeter("tokens", rate=60, burst=10),))
    book = MeterBook.for_policy(GroupPolicy("g", 1, (tenant,), meters=(group,)), "tokens")
    decision = book.ask("a", 10, 0)
    assert decision.admitted and decision.path == "rate"
    done = book.settle("a", "rate", 8, 0)  # actual 18: 8 more than the 10 reserved
    # Each bucket may owe 5 tokens: 3 of the 8 are forgiven, and reported as such.
    assert done.clipped == (3 * T, 3 * T, 3 * T)
    assert done.tenant.own == done.tenant.ceil == -5 * T
    refused = book.ask("a", 1, 0)
    assert refused.reason == "ceil" and refused.retry_ms == 6_000  # 6 tokens at 1 per second
    assert not book.ask("a", 1, 5_999).admitted
    assert book.ask("a", 1, 6_000).admitted
    refund = book.settle("a", "rate", -100, 6_000)  # far more than fits: the rest overflows
    assert refund.tenant.own == 10 * T and refund.clipped[0] == -(100 - 10) * T


def test_an_unfair_borrower_facing_an_empty_bucket_still_gets_a_time() -> None:
    """Ahead of the slowest contender by more than a quantum while the spare is empty, a borrower
    is refused for its share (others first), with a time from the group bucket, never "never"."""
    group = MeterPolicy("tokens", rate=10, burst=4)
    tenants = tuple(TenantPolicy(n, meters=(TenantMeter("tokens", rate=0),)) for n in "ab")
    book = MeterBook.for_policy(GroupPolicy("g", 1, tenants, meters=(group,)), "tokens")
    assert book.ask("b", 1, 0).path == "borrow"  # b contends with tag 1
    for now in (0, 0, 0, 100, 200):  # a starts at b's tag and runs 5 tokens ahead
        assert book.ask("a", 1, now).path == "borrow"
    refused = book.ask("a", 1, 250)  # half a token in the bucket, a 5 > 4 ahead
    assert refused.reason == "share"
    # 1 token ahead beyond the quantum, plus its own: 2 tokens at 10/s, less the half in hand.
    assert refused.retry_ms == 150
