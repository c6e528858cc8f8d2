"""How the rule behaves over time: a lender reclaims its guarantee.

Reclaim (invariant 13), stepped deterministically with a ``ManualClock`` on
every backend and both clients: while a lender waits within its guarantee, the borrower gets
nothing new and the lender is admitted exactly when enough borrowed units
have been released. (Shares over time under real contention are checked by
the simulation, ``tests/test_simulate.py``, from its measured entitlements;
this file keeps no wall-clock test.)
"""

from __future__ import annotations

from typing import Any

import pytest

from ratequota.decision import Decision, LeaseInfo
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import MakeClient


def attempt(client: Any, tenant: str, units: int, rid: str, *, wait: bool) -> Decision:
    """One acquire round trip in group ``g`` (``wait`` registers/refreshes pending demand)."""
    flow = client.core.attempt(tenant, units, "g", rid, 60_000, wait=wait)
    return client._run(flow)


def test_reclaim_lender_waits_only_for_released_borrowed_units(make_quota: MakeClient) -> None:
    """Invariant 13: the borrower saturates the group; the lender asks within its guarantee.

    From then on the borrower is refused (it is above its new limit), and the
    lender's waiting request is admitted at the release that frees enough units.
    """
    policy = GroupPolicy(
        "g",
        capacity=10,
        tenants=(
            TenantPolicy("lender", guarantee=6),
            TenantPolicy("borrower", guarantee=2, weight=5.0),
        ),
    )
    clock = ManualClock()
    client = make_quota(Policy([policy]), clock=clock, pending_ttl=5.0)
    borrowed: list[LeaseInfo] = []
    for i in range(10):
        decision = attempt(client, "borrower", 1, f"b{i}", wait=False)
        assert decision.lease is not None, decision.describe()
        borrowed.append(decision.lease)
    assert client.snapshot("g").used == 10

    asked = 4  # within the lender's guarantee of 6
    first = attempt(client, "lender", asked, "lend", wait=True)
    assert first.reason == "group_full"
    snap = client.snapshot("g", ["lender", "borrower"])
    assert snap.tenants["lender"].pending == asked
    assert snap.tenants["borrower"].limit == pytest.approx(10 - asked)

    for released in range(1, asked + 1):
        client.release(borrowed.pop())
        clock.advance(0.1)  # well within the pending TTL: the registration stays
        greedy = attempt(client, "borrower", 1, f"greedy{released}", wait=False)
        assert not greedy.admitted, f"borrower admitted after {released} releases"
        lender = attempt(client, "lender", asked, "lend", wait=True)
        assert lender.admitted == (released == asked), (released, lender.describe())
    assert client.snapshot("g").tenants["lender"].used == asked
    for lease in borrowed:
        client.release(lease)
