"""Explanations: a tenant's limit, its deciding bound, what it borrows from whom, and verdicts."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota.clients.explain import POOL, explain
from ratequota.decision import GroupSnapshot, TenantSnapshot
from ratequota.errors import UnknownTenant
from ratequota.fairness import decide
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.conftest import MakeClient
from tests.strategies import group_policies


def worked() -> GroupPolicy:
    """§4's worked vector: C=24, tenants a and b with G=12, ℓ=⅓, B=4."""
    a = TenantPolicy("a", guarantee=12, lendable=1 / 3, borrow_limit=4)
    return GroupPolicy("g", capacity=24, tenants=(a, attrs.evolve(a, name="b")))


def snapshot_of(
    policy: GroupPolicy, used: dict[str, int], pending: dict[str, int] | None = None
) -> GroupSnapshot:
    """A snapshot holding exactly this state (limits left at 0: explain recomputes them)."""
    pending = pending or {}
    names = sorted(set(used) | set(pending))
    rows = {
        n: TenantSnapshot(n, used.get(n, 0), pending.get(n, 0), 0.0, 0.0, 0.0, 0, 0) for n in names
    }
    return GroupSnapshot(
        group=policy.name,
        now=0.0,
        capacity=policy.capacity,
        used=sum(used.values()),
        policy_version=1,
        level=0.0,
        tenants=rows,
        leases=(),
        leases_truncated=False,
    )


def test_worked_vector_explained() -> None:
    """The borrower is capped at G+B and borrows the lender's lendable 4; the lender keeps 8."""
    policy = worked()
    snap = snapshot_of(policy, {"a": 16}, {"a": 8, "b": 6})  # demands 24 and 6
    borrower = explain(snap, policy, "a")
    assert math.isclose(borrower.limit, 16.0)
    assert borrower.bound == "up"
    assert borrower.borrowed == 4
    assert [(loan.lender, loan.units) for loan in borrower.loans] == [("b", 4.0)]
    assert "guarantee + borrow limit" in borrower.describe()
    lender = explain(snap, policy, "b", 6, already_pending=True)
    assert math.isclose(lender.limit, 8.0)
    assert lender.bound == "lo"
    assert lender.admitted is True
    assert lender.borrowed == 0
    assert "would be admitted" in lender.describe()


def test_refusals_say_why() -> None:
    """Each refusal reason gets its own sentence with the numbers behind it."""
    policy = worked()
    snap = snapshot_of(policy, {"a": 16, "b": 8})
    over = explain(snap, policy, "a", 1)
    assert over.verdict is not None
    assert over.verdict.reason == "tenant_limit"
    assert "above its fair share 16" in over.describe()
    full = explain(snapshot_of(policy, {"a": 14, "b": 10}), policy, "b", 2)
    assert full.verdict is not None
    assert full.verdict.reason == "group_full"
    assert "once 2 units are released" in full.describe()
    huge = explain(snap, policy, "a", 17)
    assert huge.verdict is not None
    assert huge.verdict.reason == "too_large"
    assert "never fit" in huge.describe()


def test_share_bound_and_pool() -> None:
    """Borrowers split the spare by weight; borrowed units come from the pool and the lenders."""
    policy = GroupPolicy(
        "g",
        capacity=10,
        tenants=(
            TenantPolicy("x", weight=1.0),
            TenantPolicy("y", weight=3.0),
            TenantPolicy("idle", guarantee=4, lendable=0.5),
        ),
    )
    snap = snapshot_of(policy, {"x": 2, "y": 6}, {"x": 10, "y": 10})
    y = explain(snap, policy, "y")
    assert y.bound == "share"
    assert math.isclose(y.limit, 6.0)  # (10 - 2 kept by idle) * 3/4
    assert "weighted fair share" in y.describe()
    loans = {loan.lender: loan for loan in y.loans}
    assert set(loans) == {POOL, "idle"}
    assert math.isclose(loans[POOL].available, 6.0)
    assert math.isclose(loans["idle"].available, 2.0)
    assert math.isclose(sum(loan.units for loan in y.loans), 6.0)


def test_unknown_tenant_refused() -> None:
    """Explaining a tenant the group refuses raises the same error an acquire would."""
    policy = worked()
    with pytest.raises(UnknownTenant):
        explain(snapshot_of(policy, {}), policy, "nobody")


@given(group_policies(max_tenants=8), st.data())
def test_explanation_agrees_with_decide(policy: GroupPolicy, data: st.DataObject) -> None:
    """On any state, the explained limit and verdict are the reference's, and loans add up."""
    free = policy.capacity
    used: dict[str, int] = {}
    for tenant in policy.tenants:
        held = data.draw(st.integers(0, min(free, int(min(tenant.ceiling, policy.capacity)))))
        used[tenant.name] = held
        free -= held
    pending = {t.name: data.draw(st.sampled_from([0, 0, 2])) for t in policy.tenants}
    who = data.draw(st.sampled_from(policy.tenants)).name
    units = data.draw(st.integers(1, policy.capacity + 1))
    got = explain(snapshot_of(policy, used, pending), policy, who, units)
    expected = decide(policy, used, pending, who, units)
    assert got.verdict is not None
    assert (got.verdict.admitted, got.verdict.reason) == (expected.admitted, expected.reason)
    # Same rule, tenants summed in another order: equal up to rounding.
    assert math.isclose(got.limit, expected.limit, rel_tol=1e-9, abs_tol=1e-9)
    assert got.lo - 1e-9 <= got.limit <= got.up + 1e-9
    if got.loans:
        assert math.isclose(sum(loan.units for loan in got.loans), got.borrowed, rel_tol=1e-9)
        assert all(loan.lender != who and loan.available > 0 for loan in got.loans)


def test_client_explain_uses_one_snapshot_and_the_catalog(make_quota: MakeClient) -> None:
    """``explain`` (both clients) reads group and policy from Redis; its limit is the engine's."""
    client = make_quota(Policy([worked()]))
    lease = client.try_acquire("a", 16).lease
    assert lease is not None
    why = client.explain("a")
    assert why.group == "g"
    assert why.used == 16
    assert why.engine_limit is not None
    assert math.isclose(why.limit, why.engine_limit, rel_tol=1e-9)
    assert why.borrowed == 4
    assert client.explain("a", 1).admitted is False
    # A client that has not read the catalog yet loads the published policy.
    assert make_quota().explain("b", 8).admitted is True
    client.release(lease)


def test_async_client_explains_the_same() -> None:
    """``AsyncQuotaClient.explain`` drives the same flow: same limit, same verdict."""
    import asyncio

    from ratequota.clients.aio import AsyncQuotaClient
    from ratequota.clients.async_backends import async_embedded_backend

    async def main() -> None:
        quota = AsyncQuotaClient(backend=async_embedded_backend(shared=False))
        await quota.apply_policy(Policy([worked()]))
        decision = await quota.try_acquire("a", 16)
        assert decision.lease is not None
        why = await quota.explain("a", 1)
        assert why.borrowed == 4 and why.admitted is False
        assert why.engine_limit is not None and math.isclose(why.limit, why.engine_limit)
        await quota.release(decision.lease)
        await quota.close()

    asyncio.run(main())
