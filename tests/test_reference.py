"""The Lua engine agrees with the Python reference on hand-picked states, including §4's vector.

The exhaustive random comparison lives in test_differential.py; these cases
are the readable ones a reviewer can check by hand.
"""

from __future__ import annotations

import pytest

from ratequota import GroupPolicy, Policy, TenantPolicy
from ratequota.fairness import Claim, decide, solve
from ratequota.testing import ManualClock
from tests.conftest import MakeClient

VECTOR_GROUP = GroupPolicy(
    "vector",
    capacity=24,
    tenants=[
        TenantPolicy("borrower", guarantee=12, lendable=1 / 3, borrow_limit=4),
        TenantPolicy("lender", guarantee=12, lendable=1 / 3, borrow_limit=4),
    ],
)


def test_worked_vector_in_the_reference() -> None:
    """§4: C=24, G=12, ℓ=⅓, B=4; demands 24 and 6 give limits 16 and 8."""
    allocation = solve(
        24,
        [
            Claim("borrower", 12, demand=24, lendable=1 / 3, ceiling=16),
            Claim("lender", 12, demand=6, lendable=1 / 3, ceiling=16),
        ],
    )
    assert allocation.limit("borrower") == pytest.approx(16)
    assert allocation.limit("lender") == pytest.approx(8)
    assert allocation.shares["lender"].bound == "lo"  # keeps its non-lendable 8
    assert allocation.shares["borrower"].bound == "up"  # capped at G + B


def test_worked_vector_in_lua(make_quota: MakeClient) -> None:
    """The script reaches the same limits: the borrower is admitted to 16, the lender keeps 8."""
    quota = make_quota(Policy([VECTOR_GROUP]), clock=ManualClock())
    for _ in range(6):
        assert quota.try_acquire("lender", 1).admitted
    admitted = 0
    while quota.try_acquire("borrower", 1).admitted:
        admitted += 1
        assert admitted <= 24
    assert admitted == 16
    snap = quota.snapshot("vector")
    assert snap.tenants["borrower"].limit == pytest.approx(16)
    assert snap.tenants["lender"].limit == pytest.approx(8)
    assert snap.used == 22  # 2 units stay idle: the lender's non-lendable reserve


CASES = [
    # (capacity, tenants (name, G, lendable, B, weight), used, waiting, request)
    (20, [("a", 10, 1.0, None, 1.0), ("b", 10, 1.0, None, 1.0)], {"a": 15}, {}, ("b", 5)),
    (20, [("a", 10, 1.0, None, 1.0), ("b", 10, 1.0, None, 1.0)], {"a": 15}, {}, ("a", 3)),
    (
        10,
        [("a", 5, 0.5, 2, 1.0), ("b", 5, 0.5, None, 2.0), ("c", 0, 1.0, None, 3.0)],
        {"b": 4, "c": 3},
        {"a": 4},
        ("c", 1),
    ),
    (
        10,
        [("a", 5, 0.5, 2, 1.0), ("b", 5, 0.5, None, 2.0), ("c", 0, 1.0, None, 3.0)],
        {"b": 4, "c": 3},
        {"a": 4},
        ("a", 1),
    ),
    (20, [("a", 0, 1.0, 0, 1.0), ("b", 20, 0.25, 0, 1.0)], {}, {}, ("a", 1)),
    (
        9,
        [("a", 3, 1.0, 1, 0.5), ("b", 3, 1.0, 1, 4.0), ("c", 3, 1.0, 1, 1.0)],
        {"a": 4, "b": 3},
        {"c": 3},
        ("b", 1),
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_lua_matches_reference_on_fixed_states(make_quota: MakeClient, case: int) -> None:
    """Build a state with real leases and waiting requests, then compare one decision."""
    capacity, specs, used, pending, (tenant, units) = CASES[case]
    group = GroupPolicy(
        "g",
        capacity=capacity,
        tenants=[
            TenantPolicy(n, g, lendable=lend, borrow_limit=b, weight=w)
            for n, g, lend, b, w in specs
        ],
    )
    quota = make_quota(Policy([group]), clock=ManualClock())
    for name, units_held in used.items():
        for _ in range(units_held):
            # Build the state unit by unit through the group's only path in: acquire.
            decision = quota._run(
                quota.core._acquire_once(name, 1, "g", quota.core.new_request_id(), 60_000, False)
            )
            assert decision.admitted, f"case {case}: the state must be reachable"
    for name, units_waiting in pending.items():
        decision = quota._run(
            quota.core._acquire_once(name, units_waiting, "g", f"wait-{name}", 60_000, True)
        )
        assert not decision.admitted, "the waiting request must have been refused to register"
    # The waiting request is another request of the tenant: this one must leave room for it.
    expected = decide(group, used, pending, tenant, units, reserve=pending.get(tenant, 0))
    got = quota.try_acquire(tenant, units)
    assert (got.admitted, got.reason) == (expected.admitted, expected.reason)
    assert got.limit == pytest.approx(expected.limit, abs=1e-9)
