"""The simulation's measure: entitlement from real demand, and a gap split that adds up.

Hand-made workloads whose split is worked out in the docstrings (one with a
request a rate meter held back), random workloads (hypothesis) where the
four causes must add up to the whole gap and meter-held plus unit demand to
all demand asked, and a workload recorded from a real run of the simulation.
"""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.sim.measure import Gap, Request, measure_group, meter_spans, registration_spans
from ratequota.sim.report import report_to_dict
from ratequota.sim.scenario import Scenario, TenantLoad, Traffic
from ratequota.sim.stats import build_report

GROUP = GroupPolicy(
    "g", capacity=4, tenants=(TenantPolicy("a", guarantee=0), TenantPolicy("b", guarantee=4))
)
UNITS = {"a": 4, "b": 2}
HOLDS = {"a": 2.0, "b": 1.0}


def _measure(requests: list[Request], until: float = 3.0) -> dict[str, Gap]:
    return measure_group(GROUP, requests, UNITS, HOLDS, until=until, pending_ttl=2.0)


def _assert_adds_up(gap: Gap) -> None:
    total = math.fsum(gap.parts().values())
    assert total == pytest.approx(gap.gap, abs=1e-9 * max(1.0, gap.entitled))


def test_registration_spans_follow_tries_and_expire_between_sparse_ones() -> None:
    """Registered from the first refused try until admission; a gap longer than the
    pending TTL between two tries lets the registration lapse until the next one."""
    r = Request("a", "g", 1, asked=0.0, end=9.0, got=5.0, refusals=(0.1, 0.3, 3.0, 3.2))
    assert registration_spans(r, 2.0) == [(0.1, 2.3), (3.0, 5.0)]
    gave_up = Request("a", "g", 1, asked=0.0, end=1.0, refusals=(0.1, 0.5))
    assert registration_spans(gave_up, 2.0) == [(0.1, 1.0)]
    assert registration_spans(Request("a", "g", 1, 0.0, 1.0, got=0.0), 2.0) == []


def test_lender_waiting_for_a_borrowed_lease_is_reclaim_lag() -> None:
    """C=4: ``a`` (G 0) holds all 4 units from 0 to 2; ``b`` (G 4) asks for 2 at 1.0 and
    is registered at once, admitted at 2.0 when the lease ends.

    During [1, 2) the rule gives b 2 and a 2: a holds 2 above its limit (reclaim −2 unit-
    seconds), b waits 2 units with no free room (reclaim +2). Both are the same lease tail.
    """
    gaps = _measure(
        [
            Request("a", "g", 4, asked=0.0, end=2.0, got=0.0),
            Request("b", "g", 2, asked=1.0, end=3.0, got=2.0, refusals=(1.0,)),
        ]
    )
    a, b = gaps["a"], gaps["b"]
    assert (a.got, a.entitled, a.reclaim) == pytest.approx((8.0, 6.0, -2.0))
    assert (b.got, b.entitled, b.reclaim) == pytest.approx((2.0, 4.0, 2.0))
    assert a.unseen == b.unseen == a.granularity == b.unexplained == 0
    assert a.longest_reclaim == pytest.approx(1.0)
    assert b.longest_reclaim == pytest.approx(1.0)
    assert b.reclaim_bound == 2.0
    for gap in gaps.values():
        _assert_adds_up(gap)


def test_demand_registered_late_is_unseen() -> None:
    """As above, but b's first refusal (its registration) comes back only at 1.5.

    For [1, 1.5) Redis's view gives a the whole group: a's entitlement is 2 but the seen
    one 4 (unseen −1 unit-second), b's 2 but seen 0 (unseen +1); the lag covers the rest.
    """
    gaps = _measure(
        [
            Request("a", "g", 4, asked=0.0, end=2.0, got=0.0),
            Request("b", "g", 2, asked=1.0, end=3.0, got=2.0, refusals=(1.5,)),
        ]
    )
    assert gaps["a"].unseen == pytest.approx(-1.0)
    assert gaps["a"].reclaim == pytest.approx(-1.0)
    assert gaps["b"].unseen == pytest.approx(1.0)
    assert gaps["b"].reclaim == pytest.approx(1.0)
    for gap in gaps.values():
        _assert_adds_up(gap)


def test_meter_spans_run_from_a_meter_refusal_to_the_next_answer() -> None:
    """A request is meter-held from a try a meter refused until the next try answers
    (consecutive meter refusals make one span), or until admission or giving up; a
    pause after a meter refusal neither registers nor refreshes it as waiting demand."""
    r = Request(
        "b",
        "g",
        2,
        asked=0.0,
        end=9.0,
        got=4.0,
        refusals=(0.5, 1.0, 2.0, 3.0),
        tries=((0.5, "meter"), (1.0, "meter"), (2.0, "group_full"), (3.0, "meter")),
    )
    assert meter_spans(r) == [(0.5, 2.0), (3.0, 4.0)]
    assert registration_spans(r, 2.0) == [(2.0, 4.0)]
    gave_up = Request("b", "g", 2, asked=0.0, end=1.5, refusals=(0.5,), tries=((0.5, "meter"),))
    assert meter_spans(gave_up) == [(0.5, 1.5)]
    assert registration_spans(gave_up, 2.0) == []
    # Without recorded reasons every pause registers and nothing is meter-held (as before).
    plain = attrs.evolve(r, tries=())
    assert meter_spans(plain) == []
    assert registration_spans(plain, 2.0) == [(0.5, 4.0)]


def test_demand_a_meter_held_back_is_owed_nothing() -> None:
    """C=4: ``a`` (G 0) holds all 4 units from 0 to 2. ``b`` (G 4) asks for 2 at 0.0; a rate
    meter refuses it at once (no registration), the lease refuses its retry at 1.0
    (registered), and it is admitted at 2.0 when a's lease ends.

    During [0, 1) b's demand is the meter's: the concurrency rule owes b nothing and a
    its 4 (no unseen demand: the meter-refused try registered nothing). From 1.0 on it
    is the lease tail of the test above: a reclaim −2, b reclaim +2. b asked 6 unit-
    seconds: 2 meter-held + 4 of unit demand; owed 4, got 2.
    """
    gaps = _measure(
        [
            Request("a", "g", 4, asked=0.0, end=2.0, got=0.0),
            Request(
                "b",
                "g",
                2,
                asked=0.0,
                end=3.0,
                got=2.0,
                refusals=(0.0, 1.0),
                tries=((0.0, "meter"), (1.0, "group_full")),
            ),
        ]
    )
    a, b = gaps["a"], gaps["b"]
    assert (a.got, a.entitled, a.reclaim, a.unseen) == pytest.approx((8.0, 6.0, -2.0, 0.0))
    assert (b.got, b.entitled, b.reclaim, b.unseen) == pytest.approx((2.0, 4.0, 2.0, 0.0))
    assert (b.meter, b.asked, b.meter_share) == pytest.approx((2.0, 6.0, 1 / 3))
    assert (a.meter, a.asked) == pytest.approx((0.0, 8.0))
    for gap in gaps.values():
        _assert_adds_up(gap)
    # The flaw this fixes: counted as unit demand, the meter's second would be owed to b
    # (and a's holding of the whole group would look like a surplus).
    flawed = _measure(
        [
            Request("a", "g", 4, asked=0.0, end=2.0, got=0.0),
            Request("b", "g", 2, asked=0.0, end=3.0, got=2.0, refusals=(0.0, 1.0)),
        ]
    )
    assert flawed["b"].entitled == pytest.approx(6.0)
    assert flawed["b"].meter == 0


def test_free_room_not_used_is_unexplained_and_a_partial_batch_is_granularity() -> None:
    """b asks at 2.0 when the group is empty, is registered at once but admitted only at
    2.25: 0.5 unit-seconds unexplained (without the registration they are unseen).

    With C=5 and b's limit 5 but batches of 2, b can hold 4: 1 unit of granularity for as
    long as it waits for a third batch."""
    gaps = _measure([Request("b", "g", 2, asked=2.0, end=3.0, got=2.25, refusals=(2.0,))])
    assert gaps["b"].unexplained == pytest.approx(0.5)
    gaps = _measure([Request("b", "g", 2, asked=2.0, end=3.0, got=2.25)])
    assert (gaps["b"].unseen, gaps["b"].unexplained) == pytest.approx((0.5, 0.0))
    group = GroupPolicy("g", capacity=5, tenants=(TenantPolicy("b", guarantee=4),))
    gaps = measure_group(
        group,
        [
            Request("b", "g", 2, asked=0.0, end=1.0, got=0.0),
            Request("b", "g", 2, asked=0.0, end=1.0, got=0.0),
            Request("b", "g", 2, asked=0.0, end=1.0, refusals=(0.0,)),
        ],
        {"b": 2},
        {"b": 1.0},
        until=1.0,
        pending_ttl=2.0,
    )
    assert (gaps["b"].entitled, gaps["b"].got) == pytest.approx((5.0, 4.0))
    assert gaps["b"].granularity == pytest.approx(1.0)
    _assert_adds_up(gaps["b"])


_POLICY = GroupPolicy(
    "g",
    capacity=10,
    tenants=(
        TenantPolicy("x", guarantee=4, weight=2),
        TenantPolicy("y", guarantee=2, lendable=0.5, borrow_limit=4),
        TenantPolicy("z", guarantee=0, weight=0.5),
    ),
)
_SIZES = {"x": 2, "y": 1, "z": 3}


@st.composite
def _requests(draw: st.DrawFn) -> list[Request]:
    out = []
    for _ in range(draw(st.integers(0, 25))):
        tenant = draw(st.sampled_from(sorted(_SIZES)))
        asked = draw(st.floats(0, 9, allow_nan=False))
        wait = draw(st.floats(0, 2, allow_nan=False))
        hold = draw(st.floats(0, 3, allow_nan=False))
        admitted = draw(st.booleans())
        tries = sorted(draw(st.lists(st.floats(0, 1, allow_nan=False), max_size=4)))
        refusals = tuple(asked + t * wait for t in tries)
        reasons = draw(st.lists(st.sampled_from(["meter", "group_full"]), min_size=len(tries)))
        got = asked + wait if admitted else None
        end = (asked + wait + hold) if admitted else asked + wait
        refused = tuple(zip(refusals, reasons, strict=False))
        out.append(Request(tenant, "g", _SIZES[tenant], asked, end, got, refusals, refused))
    return out


@given(_requests(), st.floats(0.5, 2.5))
def test_the_four_causes_always_add_up_to_the_gap(requests: list[Request], ttl: float) -> None:
    """On any workload, unseen + reclaim + granularity + unexplained = entitlement − got,
    got is the integral of the units held (within the run), and what was asked is the
    integral of outstanding demand, meter-held included (0 ≤ meter ≤ asked)."""
    gaps = measure_group(
        _POLICY, requests, _SIZES, dict.fromkeys(_SIZES, 1.0), until=10.0, pending_ttl=ttl
    )
    for name, gap in gaps.items():
        _assert_adds_up(gap)
        held = math.fsum(
            r.units * max(0.0, min(r.end, 10.0) - min(r.got, 10.0))
            for r in requests
            if r.tenant == name and r.got is not None
        )
        assert gap.got == pytest.approx(held, abs=1e-9)
        asked = math.fsum(
            r.units * max(0.0, min(r.end, 10.0) - min(r.asked, 10.0))
            for r in requests
            if r.tenant == name
        )
        assert gap.asked == pytest.approx(asked, abs=1e-9)
        assert -1e-9 <= gap.meter <= gap.asked + 1e-9
        assert gap.granularity >= -1e-9
        assert gap.unexplained >= -1e-9


def test_split_adds_up_on_a_recorded_workload() -> None:
    """A workload recorded from a real (short) run of the simulation on the embedded
    default, in driven time so the recording is the same on any machine: every tenant's
    four causes add up to its whole gap, the report carries the same numbers in JSON, and
    no reclaim episode outlasts the longest batch."""
    from ratequota.sim.fleet import run_scenario
    from ratequota.testing import fake_client

    group = GroupPolicy(
        "g",
        capacity=8,
        tenants=(TenantPolicy("lender", guarantee=4), TenantPolicy("borrower", guarantee=4)),
    )
    scenario = Scenario(
        name="recorded",
        policy=Policy((group,)),
        loads=(
            TenantLoad("lender", "g", Traffic("lender", 2, 2, 0.2, idle_from=0.2, idle_until=0.5)),
            TenantLoad("borrower", "g", Traffic("steady", 6, 1, 0.2)),
        ),
        duration=1.5,
        pods=3,
        acquire_timeout=0.5,
        sample_interval=0.1,
    )
    shared = fake_client()
    try:
        from ratequota.clients.sync import QuotaClient

        result = run_scenario(
            scenario, lambda: QuotaClient(backend=_Shared(shared.backend)), driven=True
        )
    finally:
        shared.close()
    assert result.requests, "the run recorded no request"
    assert any(r.refusals for r in result.requests), "nobody ever waited"
    report = build_report(
        scenario,
        result.intervals,
        [],
        [],
        elapsed=result.report.duration,
        requests=result.requests,
        pending_ttl=2.0,
    )
    data = report_to_dict(report)
    rows = {row["tenant"]: row for row in data["tenants"]}  # type: ignore[union-attr,index]
    for tenant in report.tenants:
        gap = tenant.gap
        assert gap is not None
        _assert_adds_up(gap)
        assert gap.entitled > 0
        assert 0 < gap.longest_reclaim <= gap.reclaim_bound
        row = rows[tenant.tenant]
        assert row["gap_unit_seconds"] == pytest.approx(gap.gap)
        assert math.fsum(row["gap_parts"].values()) == pytest.approx(gap.gap, abs=1e-9)


class _Shared:
    """A backend wrapper whose close() leaves the shared fake server usable."""

    def __init__(self, backend: object) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)

    def close(self) -> None:
        pass


def test_slot_windows_follow_the_schedule() -> None:
    """A burst's extra slots stop waiting at the burst's end and wake at the next one."""
    bursty = Traffic("bursty", 8, low=2, period=0.5, duty=0.4)
    assert bursty.active_until(5, 0.1) == pytest.approx(0.2)
    assert bursty.active_until(1, 0.1) == 1.0  # within `low`: active to the end
    assert bursty.next_active(5, 0.3) == pytest.approx(0.5)
    lender = Traffic("lender", 3, idle_from=0.25, idle_until=0.5)
    assert lender.active_until(0, 0.1) == pytest.approx(0.25)
    assert lender.next_active(0, 0.3) == pytest.approx(0.5)
    assert Traffic("steady", 2, stop=0.5).next_active(0, 0.6) == 1.0
