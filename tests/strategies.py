"""Hypothesis strategies for ratequota: policies, demands and claims (all of them live here).

The strategies lean towards the corners where a fairness rule breaks: guarantees
summing exactly to the capacity, lendable 0 and 1, unbounded and zero borrow
limits, tiny (1e-3) and huge (1e3+) weights, zero demand and demand far above
the capacity, from 1 up to 50 tenants.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import strategies as st

from ratequota.fairness import Claim
from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy

__all__ = [
    "LEDGER_TTLS",
    "MAX_TENANTS",
    "allocation_cases",
    "borrow_limits",
    "capacities",
    "claim_cases",
    "demand_for",
    "group_policies",
    "guarantee_splits",
    "ledger_histories",
    "ledger_steps",
    "lendables",
    "meter_groups",
    "meter_histories",
    "meter_steps",
    "weights",
    "wire_texts",
    "wire_values",
]

#: Most tenants a generated group has (the issue asks for 1 to 50).
MAX_TENANTS = 50

#: Weights policy validation accepts (> 0): the corners first, then anything between.
weights = st.one_of(
    st.sampled_from([1.0, 1e-3, 1e3, 2.0, 3.0, 5e3]),
    st.floats(min_value=1e-3, max_value=5e3, allow_nan=False, allow_infinity=False),
)

#: Fractions of unused guarantee others may borrow: the corners 0 and 1 are common.
lendables = st.one_of(
    st.sampled_from([0.0, 1.0, 1.0 / 3.0, 0.5]),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)

#: Group capacities: small ones make ties and integer edges likely, large ones test scale.
capacities = st.one_of(st.integers(1, 64), st.integers(65, 5_000))


def borrow_limits(capacity: int) -> st.SearchStrategy[int | None]:
    """Borrow limits: unbounded (None), zero, or anything up to above the capacity."""
    return st.one_of(st.none(), st.just(0), st.integers(0, capacity + 10))


@st.composite
def guarantee_splits(draw: st.DrawFn, capacity: int, count: int) -> list[int]:
    """``count`` guarantees with sum <= capacity; about half the time the sum is exactly it."""
    kind = draw(st.sampled_from(["exact", "exact", "below", "zero"]))
    if kind == "zero":
        return [0] * count
    total = capacity if kind == "exact" else draw(st.integers(0, capacity))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=count - 1, max_size=count - 1)))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(count)]


@st.composite
def group_policies(
    draw: st.DrawFn, min_tenants: int = 1, max_tenants: int = MAX_TENANTS
) -> GroupPolicy:
    """A valid group policy with tenants ``t0``, ``t1``, ... (names sort like their index)."""
    capacity = draw(capacities)
    count = draw(st.integers(min_tenants, max_tenants))
    guarantees = draw(guarantee_splits(capacity, count))
    tenants = [
        TenantPolicy(
            f"t{i:02d}",
            guarantee=g,
            lendable=draw(lendables),
            borrow_limit=draw(borrow_limits(capacity)),
            weight=draw(weights),
        )
        for i, g in enumerate(guarantees)
    ]
    return GroupPolicy("g", capacity=capacity, tenants=tuple(tenants))


def demand_for(policy: GroupPolicy) -> st.SearchStrategy[dict[str, float]]:
    """Integer demand per tenant: often zero, often far above the capacity."""
    capacity = policy.capacity
    one = st.one_of(
        st.just(0),
        st.integers(1, max(1, capacity // 4)),
        st.integers(0, capacity),
        st.integers(capacity, 100 * capacity),
    )
    return st.fixed_dictionaries({t.name: one.map(float) for t in policy.tenants})


@st.composite
def allocation_cases(
    draw: st.DrawFn, min_tenants: int = 1, max_tenants: int = MAX_TENANTS
) -> tuple[GroupPolicy, dict[str, float]]:
    """A group policy and every tenant's demand."""
    policy = draw(group_policies(min_tenants, max_tenants))
    return policy, draw(demand_for(policy))


@st.composite
def claim_cases(draw: st.DrawFn, max_tenants: int = 12) -> tuple[float, list[Claim]]:
    """A capacity and claims with float parameters (for scaling), guarantees within capacity."""
    policy, demand = draw(allocation_cases(max_tenants=max_tenants))
    claims = [
        Claim(
            t.name,
            guarantee=float(t.guarantee),
            demand=demand[t.name],
            lendable=t.lendable,
            ceiling=t.ceiling,
            weight=t.weight,
        )
        for t in policy.tenants
    ]
    return float(policy.capacity), claims


def active(demand: Mapping[str, float]) -> list[str]:
    """Tenants with demand > 0, the ones the rule computes a share for."""
    return [name for name, d in demand.items() if d > 0]


#: Weights of a meter share: the policy's bounds and plain ratios.
meter_weights = st.one_of(
    st.sampled_from([1.0, 2.0, 3.0, 1e-3, 1e3]),
    st.floats(min_value=1e-2, max_value=1e2, allow_nan=False, allow_infinity=False),
)


@st.composite
def meter_groups(draw: st.DrawFn, min_tenants: int = 1, max_tenants: int = 5) -> GroupPolicy:
    """A group with a ``tokens`` meter; tenant rates and bursts sum up to at most the group's.

    Tenants ``t0``, ``t1``, ...; some have no guaranteed rate (pure borrowers),
    ceils run from the rate itself to the group's rate, bursts are explicit or
    defaulted, and the debt bound is 0, small or the default.
    """
    rate = draw(st.sampled_from([1, 3, 10, 60, 1_000]) | st.integers(1, 5_000))
    burst = draw(st.sampled_from([1, 5, 20]) | st.integers(1, 2_000))
    per = draw(st.sampled_from(["second", "minute"]))
    debt = draw(st.none() | st.just(0) | st.integers(0, 2 * burst))
    count = draw(st.integers(min_tenants, max_tenants))
    rates = draw(guarantee_splits(rate, count))
    # Tenant bursts below the group's often, so that some of its burst is borrowable.
    bursts = draw(guarantee_splits(draw(st.integers(0, burst)), count))
    tenants = []
    for index in range(count):
        own = rates[index]
        ceil = draw(st.one_of(st.none(), st.just(own), st.integers(own, rate)))
        top = rate if ceil is None else ceil
        if own == 0:
            bursts[index] = 0  # a burst needs a rate to refill it
        cburst = 0 if top == 0 else draw(st.integers(bursts[index], burst))
        share = TenantMeter(
            "tokens",
            rate=own,
            ceil=top,
            weight=draw(meter_weights),
            burst=bursts[index],
            cburst=cburst,
        )
        tenants.append(TenantPolicy(f"t{index}", meters=(share,)))
    meter = MeterPolicy("tokens", rate=rate, burst=burst, per=per, debt=debt)
    return GroupPolicy("g", capacity=1, tenants=tuple(tenants), meters=(meter,))


#: One request: ms since the previous one, tenant index, tokens asked, and the amount its
#: settlement adds to the estimate if it is admitted (negative: a refund, 0: settles exact).
MeterStep = tuple[int, int, int, int]


def meter_steps(policy: GroupPolicy, max_steps: int = 60) -> st.SearchStrategy[list[MeterStep]]:
    """Requests in bursts and after long gaps; settlements above, at and below the estimate."""
    meter = policy.meter("tokens")
    assert meter is not None
    step = st.tuples(
        st.sampled_from([0, 0, 1, 10, 100, 1_000, 60_000]) | st.integers(0, 120_000),
        st.integers(0, len(policy.tenants) - 1),
        st.sampled_from([1, 1, 2]) | st.integers(0, meter.burst + 1),
        st.sampled_from([0, 0, 0, 1, -1]) | st.integers(-meter.burst, 3 * meter.burst),
    )
    return st.lists(step, min_size=1, max_size=max_steps)


@st.composite
def meter_histories(
    draw: st.DrawFn, min_tenants: int = 1, max_tenants: int = 5, max_steps: int = 60
) -> tuple[GroupPolicy, list[MeterStep]]:
    """A group with a ``tokens`` meter and a history of requests against it."""
    policy = draw(meter_groups(min_tenants, max_tenants))
    return policy, draw(meter_steps(policy, max_steps))


# -- the usage ledger (tests/test_ledger.py) ---------------------------------------------------

#: Lease lifetimes of the ledger histories, ms: short ones expire between steps, long ones
#: outlive several hours' steps only when renewed.
LEDGER_TTLS = (1, 1_000, 60_000, 600_000, 1_800_000)

#: One step of a ledger history (see ``ledger_histories``).
ledger_steps = st.one_of(
    st.tuples(
        st.just("acquire"),
        st.integers(0, 2),  # tenant
        st.integers(1, 4),  # units
        st.sampled_from(LEDGER_TTLS),
        st.booleans(),  # shadow
    ),
    st.tuples(st.just("release"), st.integers(0, 50), st.booleans()),  # lease, right token
    st.tuples(st.just("renew"), st.integers(0, 50), st.sampled_from(LEDGER_TTLS)),
    st.tuples(st.just("release_many"), st.lists(st.integers(0, 50), min_size=1, max_size=4)),
    st.tuples(st.just("replay"), st.integers(0, 50)),
    st.tuples(
        st.just("advance"),
        st.one_of(st.integers(0, 2_000), st.integers(0, 2 * 3_600_000), st.just(-1)),
    ),  # -1: to the next hour boundary exactly
)


def ledger_histories(max_size: int = 40) -> st.SearchStrategy[list[tuple[object, ...]]]:
    """Histories of acquire (some in shadow mode), release (some fenced, many repeated or
    late), renew, release_many (with duplicates), replayed acquires and time steps that
    cross hour boundaries (some landing exactly on one)."""
    return st.lists(ledger_steps, min_size=1, max_size=max_size)


#: Text a script call may carry: ASCII, any other UTF-8 encodable text (no lone surrogates),
#: the empty string, and long values past the packer's memory of short ones.
wire_texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    st.sampled_from(["", "0", "1", "ключ", "{g}:x", "a" * 65, "é" * 40]),
)

#: One argument of a script call as the encoders build them: an int (any size) or text.
wire_values = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**63, 10**30]),
    wire_texts,
)
