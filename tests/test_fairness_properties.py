"""DESIGN §4: every invariant of the admission rule as its own hypothesis property.

The tests run on the pure reference ``ratequota.fairness``; the Lua engine is
compared against it in ``tests/test_differential.py``. Limits are floats, so
each comparison allows a tolerance relative to the capacity.
"""

from __future__ import annotations

import math
import random

import attrs
from hypothesis import assume, example, given
from hypothesis import strategies as st

from ratequota.fairness import Allocation, Claim, decide, group_allocation, solve
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.strategies import (
    allocation_cases,
    claim_cases,
    group_policies,
    guarantee_splits,
    lendables,
    weights,
)

Case = tuple[GroupPolicy, dict[str, float]]


def tol(capacity: float) -> float:
    """Float slack for comparisons of limits in a group of ``capacity`` units."""
    return 1e-7 * max(1.0, capacity)


def allocate(policy: GroupPolicy, demand: dict[str, float]) -> Allocation:
    """Limits of *every* tenant (idle ones too), so sums cover the whole group."""
    return group_allocation(policy, demand, extra=[t.name for t in policy.tenants])


def limits(policy: GroupPolicy, demand: dict[str, float]) -> dict[str, float]:
    """Each tenant's fair limit."""
    return {name: s.limit for name, s in allocate(policy, demand).shares.items()}


def worked_policy() -> GroupPolicy:
    """The worked vector of §4: C=24, two tenants with G=12, ℓ=⅓, B=4, w=1."""
    tenant = TenantPolicy("a", guarantee=12, lendable=1 / 3, borrow_limit=4)
    return GroupPolicy("g", capacity=24, tenants=(tenant, attrs.evolve(tenant, name="b")))


WORKED: Case = (worked_policy(), {"a": 24.0, "b": 6.0})


def test_worked_vector() -> None:
    """§4's worked vector: demands 24 and 6 give 16 (capped at G+B) and 8 (the kept reserve)."""
    got = limits(*WORKED)
    assert math.isclose(got["a"], 16.0, abs_tol=1e-9)
    assert math.isclose(got["b"], 8.0, abs_tol=1e-9)
    # The same through decide: the borrower may hold 16 and not 17.
    policy = WORKED[0]
    assert decide(policy, {"a": 15}, {"b": 6}, "a", 1).admitted
    refused = decide(policy, {"a": 16}, {"b": 6}, "a", 1)
    assert refused.reason == "tenant_limit"
    assert math.isclose(refused.limit, 16.0, abs_tol=1e-9)


@given(allocation_cases())
@example(WORKED)
def test_invariant_01_safety(case: Case) -> None:
    """1. Safety: the limits (idle tenants' reserve included) never sum above C."""
    policy, demand = case
    alloc = allocate(policy, demand)
    assert alloc.total <= policy.capacity + tol(policy.capacity)


@given(allocation_cases())
@example(WORKED)
def test_invariant_02_bounds(case: Case) -> None:
    """2. Bounds: every limit lies within its tenant's [lo, up]."""
    policy, demand = case
    eps = tol(policy.capacity)
    for share in allocate(policy, demand).shares.values():
        assert share.lo - eps <= share.limit <= share.up + eps


@given(allocation_cases())
@example(WORKED)
def test_invariant_03_guarantee(case: Case) -> None:
    """3. Guarantee: a tenant's limit covers its demand up to its guarantee."""
    policy, demand = case
    got = limits(policy, demand)
    for tenant in policy.tenants:
        wanted = min(demand[tenant.name], tenant.guarantee)
        assert got[tenant.name] >= wanted - tol(policy.capacity)


@given(allocation_cases())
@example(WORKED)
def test_invariant_04_no_over_grant(case: Case) -> None:
    """4. No over-grant: a limit never exceeds max(demand, lo)."""
    policy, demand = case
    for name, share in allocate(policy, demand).shares.items():
        assert share.limit <= max(demand[name], share.lo) + tol(policy.capacity)


@given(allocation_cases())
@example(WORKED)
def test_invariant_05_work_conservation(case: Case) -> None:
    """5. Work conservation: the limits sum to min(C, Σ up) — nothing wanted is left idle."""
    policy, demand = case
    alloc = allocate(policy, demand)
    sum_up = math.fsum(s.up for s in alloc.shares.values())
    assert math.isclose(
        alloc.total, min(policy.capacity, sum_up), rel_tol=1e-9, abs_tol=tol(policy.capacity)
    )


@given(allocation_cases())
@example(WORKED)
def test_invariant_06_form(case: Case) -> None:
    """6. Form: one water level λ >= 0 gives every limit as clamp(λw, lo, up)."""
    policy, demand = case
    alloc = allocate(policy, demand)
    assert alloc.level >= 0
    for share in alloc.shares.values():
        expected = min(max(alloc.level * share.weight, share.lo), share.up)
        assert math.isclose(share.limit, expected, rel_tol=1e-12, abs_tol=1e-12)


@given(allocation_cases())
@example(WORKED)
def test_invariant_07_no_envy(case: Case) -> None:
    """7. No envy: a tenant below its up never has a smaller weighted share than one above lo."""
    policy, demand = case
    eps = tol(policy.capacity)
    shares = list(allocate(policy, demand).shares.values())
    for j in shares:
        if j.limit >= j.up - eps:
            continue
        for i in shares:
            if i.limit <= i.lo + eps:
                continue
            ratio_i, ratio_j = i.limit / i.weight, j.limit / j.weight
            assert ratio_i <= ratio_j + 1e-7 * max(1.0, ratio_i, ratio_j)


@given(allocation_cases(), st.data())
@example(WORKED, None)
def test_invariant_08_raising_demand_never_lowers_own_limit(
    case: Case, data: st.DataObject
) -> None:
    """8. Monotonicity: raising one's own demand never lowers one's limit."""
    policy, demand = case
    if data is None:  # the worked vector: the lender raises 6 -> 12
        name, more = "b", 12.0
    else:
        name = data.draw(st.sampled_from(sorted(demand)))
        more = demand[name] + data.draw(st.integers(1, 2 * policy.capacity))
    before = limits(policy, demand)[name]
    after = limits(policy, {**demand, name: more})[name]
    assert after >= before - tol(policy.capacity)


@given(allocation_cases(), st.data())
@example(WORKED, None)
def test_invariant_09_others_demand_never_raises_limit(case: Case, data: st.DataObject) -> None:
    """9. Raising another tenant's demand, or adding a tenant, never raises one's limit."""
    policy, demand = case
    eps = tol(policy.capacity)
    before = limits(policy, demand)
    if data is None:
        other, more = "a", 30.0
    else:
        other = data.draw(st.sampled_from(sorted(demand)))
        more = demand[other] + data.draw(st.integers(1, 2 * policy.capacity))
    raised = limits(policy, {**demand, other: more})
    for name in demand:
        if name != other:
            assert raised[name] <= before[name] + eps
    # Adding a tenant (within the capacity left for guarantees) with some demand.
    room = policy.capacity - sum(t.guarantee for t in policy.tenants)
    if data is None:
        newcomer = TenantPolicy("new", guarantee=0, weight=1.0)
        new_demand = 5.0
    else:
        newcomer = TenantPolicy(
            "new",
            guarantee=data.draw(st.integers(0, room)),
            lendable=data.draw(lendables),
            weight=data.draw(weights),
        )
        new_demand = float(data.draw(st.integers(0, 2 * policy.capacity)))
    grown = attrs.evolve(policy, tenants=(*policy.tenants, newcomer))
    added = limits(grown, {**demand, "new": new_demand})
    for name in demand:
        assert added[name] <= before[name] + eps


@given(allocation_cases(), st.data())
@example(WORKED, None)
def test_invariant_10_strategy_proof(case: Case, data: st.DataObject) -> None:
    """10. Strategy-proofness: misreporting demand never gets a tenant more of what it needs."""
    policy, demand = case
    if data is None:
        name, lie = "b", 24.0
    else:
        name = data.draw(st.sampled_from(sorted(demand)))
        lie = float(data.draw(st.integers(0, 3 * policy.capacity)))
    true = demand[name]
    honest = min(limits(policy, demand)[name], true)
    lying = min(limits(policy, {**demand, name: lie})[name], true)
    assert lying <= honest + tol(policy.capacity)


@given(allocation_cases(min_tenants=2), st.randoms(use_true_random=False))
@example(WORKED, random.Random(0))
def test_invariant_11_symmetry(case: Case, rnd: random.Random) -> None:
    """11. Symmetry: identical tenants get identical limits, and tenant order never matters."""
    policy, demand = case
    eps = tol(policy.capacity)
    base = limits(policy, demand)
    # Order: shuffle both the policy's tenant list and the demand mapping.
    tenants = list(policy.tenants)
    rnd.shuffle(tenants)
    names = list(demand)
    rnd.shuffle(names)
    shuffled = limits(attrs.evolve(policy, tenants=tuple(tenants)), {n: demand[n] for n in names})
    for name in base:
        assert math.isclose(shuffled[name], base[name], rel_tol=1e-9, abs_tol=eps)
    # Equal parameters: make the second tenant a copy of the first (guarantees kept within C).
    first, second = policy.tenants[0], policy.tenants[1]
    guarantee = min(first.guarantee, second.guarantee)
    twin_a = attrs.evolve(first, guarantee=guarantee)
    twin_b = attrs.evolve(first, name=second.name, guarantee=guarantee)
    twins = attrs.evolve(policy, tenants=(twin_a, twin_b, *policy.tenants[2:]))
    got = limits(twins, {**demand, second.name: demand[first.name]})
    assert math.isclose(got[first.name], got[second.name], rel_tol=1e-9, abs_tol=eps)


@given(claim_cases(), st.sampled_from([2.0, 3.0, 10.0, 0.5, 0.001, 1000.0]))
def test_invariant_12_homogeneity(case: tuple[float, list[Claim]], k: float) -> None:
    """12. Homogeneity: scaling C, G, B and d by k scales every limit by k."""
    capacity, claims = case
    scaled = [
        attrs.evolve(c, guarantee=c.guarantee * k, demand=c.demand * k, ceiling=c.ceiling * k)
        for c in claims
    ]
    base, big = solve(capacity, claims), solve(capacity * k, scaled)
    for c in claims:
        assert math.isclose(
            big.limit(c.name), k * base.limit(c.name), rel_tol=1e-9, abs_tol=1e-9 * k * capacity
        )


@st.composite
def reclaim_cases(draw: st.DrawFn) -> tuple[GroupPolicy, dict[str, int], dict[str, int], int]:
    """A group where tenant ``t00`` (the lender) waits within its guarantee while others hold units.

    Others may hold more than their current limits (borrowed before the lender
    asked), which is exactly the situation reclaim is about.
    """
    policy = draw(group_policies(min_tenants=2, max_tenants=8))
    lender = policy.tenants[0]
    assume(lender.guarantee >= 1)
    lender_used = draw(st.integers(0, lender.guarantee - 1))
    units = draw(st.integers(1, lender.guarantee - lender_used))
    free = policy.capacity - lender_used
    used = {lender.name: lender_used}
    for tenant in policy.tenants[1:]:
        held = draw(st.integers(0, min(free, int(min(tenant.ceiling, policy.capacity)))))
        used[tenant.name] = held
        free -= held
    waits = st.sampled_from([0, 0, 1, 3, policy.capacity])
    pending = {t.name: draw(waits) for t in policy.tenants[1:]}
    return policy, used, pending, units


@given(reclaim_cases(), st.data())
def test_invariant_13_reclaim(
    case: tuple[GroupPolicy, dict[str, int], dict[str, int], int], data: st.DataObject
) -> None:
    """13. Reclaim: a lender asking within its guarantee waits only for free units, and while it
    waits no other tenant is admitted into the room its request needs.
    """
    policy, used, pending, units = case
    lender = policy.tenants[0].name
    group_used = sum(used.values())
    # The lender's waiting request is registered: admitted exactly when the units are free.
    waiting = {**pending, lender: units}
    verdict = decide(policy, used, waiting, lender, units, already_pending=True)
    assert verdict.admitted == (group_used + units <= policy.capacity)
    if not verdict.admitted:
        assert verdict.reason == "group_full"
    # Another tenant asking now is admitted only within its limit, and never into the lender's room.
    other = data.draw(st.sampled_from([t.name for t in policy.tenants[1:]]))
    ask = data.draw(st.integers(1, policy.capacity))
    result = decide(policy, used, waiting, other, ask)
    if result.admitted:
        assert used[other] + ask <= result.limit + 1e-9
        demand = {n: float(used.get(n, 0) + waiting.get(n, 0)) for n in used}
        demand[other] += ask
        alloc = allocate(policy, demand)
        floor_of_rest = math.fsum(s.lo for n, s in alloc.shares.items() if n not in (lender, other))
        lender_demand = used[lender] + units
        assert used[other] + ask + lender_demand + floor_of_rest <= policy.capacity + 1e-6


Op = tuple[str, int, int]


@given(
    group_policies(max_tenants=6),
    st.lists(
        st.tuples(
            st.sampled_from(["acquire", "wait", "release"]), st.integers(0, 5), st.integers(1, 40)
        ),
        max_size=60,
    ),
)
def test_invariant_14_lease_safety(policy: GroupPolicy, ops: list[Op]) -> None:
    """14. Lease safety: under any sequence of acquires, waits and releases decided by the rule,
    held units never exceed C per group nor G + B per tenant.
    """
    names = [t.name for t in policy.tenants]
    used = dict.fromkeys(names, 0)
    pending = dict.fromkeys(names, 0)
    leases: list[tuple[str, int]] = []
    for kind, who, units in ops:
        tenant = names[who % len(names)]
        if kind == "release":
            if leases:
                name, held = leases.pop(who % len(leases))
                used[name] -= held
            continue
        verdict = decide(policy, used, pending, tenant, units)
        if verdict.admitted:
            used[tenant] += units
            leases.append((tenant, units))
        elif kind == "wait" and verdict.reason != "too_large":
            pending[tenant] += units
        assert sum(used.values()) <= policy.capacity
        for t in policy.tenants:
            assert used[t.name] <= t.ceiling


@given(group_policies(), st.data())
@example(worked_policy(), None)
def test_invariant_15_lone_tenant(policy: GroupPolicy, data: st.DataObject) -> None:
    """15. A lone active tenant may use min(G+B, C − Σ_others G(1−ℓ)), the others being idle."""
    tenant = policy.tenants[0] if data is None else data.draw(st.sampled_from(policy.tenants))
    others = math.fsum(t.reserve for t in policy.tenants if t.name != tenant.name)
    expected = min(tenant.ceiling, policy.capacity - others)
    demand = {t.name: 0.0 for t in policy.tenants}
    demand[tenant.name] = float(100 * policy.capacity)
    got = limits(policy, demand)[tenant.name]
    assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=tol(policy.capacity))
    # Through decide: the largest request that fits is admitted, one more unit is not.
    most = math.floor(expected + 1e-9)
    if most >= 1:
        assert decide(policy, {}, {}, tenant.name, most).admitted
    if most + 1 <= policy.capacity:
        assert not decide(policy, {}, {}, tenant.name, most + 1).admitted


@given(capacity=st.integers(1, 100), count=st.integers(1, 50), data=st.data())
def test_strategies_cover_exact_guarantees(capacity: int, count: int, data: st.DataObject) -> None:
    """The guarantee strategy never exceeds the capacity (policy validation would refuse it)."""
    split = data.draw(guarantee_splits(capacity, count))
    assert len(split) == count
    assert sum(split) <= capacity
    assert min(split) >= 0
