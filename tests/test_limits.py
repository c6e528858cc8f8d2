"""What ``limit`` means in what people read, and the messages around refusals (issue 13, item 5).

Every output meant for people — ``ratequota inspect``, the example service's
quota endpoint, ``explain().describe()``, ``Decision.describe()`` — calls
``limit`` the most a tenant may hold now if it asks (its *entitlement*). The
properties below prove the two claims docs/concepts.md makes about it: it is
never below the tenant's guarantee, and a request passes the tenant check
exactly when it fits under it. The rest pins the wording of refusals: no
NaN, no retry hint for a request that can never fit, public names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ratequota import (
    Decision,
    GroupPolicy,
    GroupSnapshot,
    InvalidType,
    Policy,
    RequestTooLarge,
    TenantPolicy,
    TenantSnapshot,
    UnknownTenant,
)
from ratequota.clients.explain import entitlement, entitlements
from ratequota.fairness import EPSILON, decide, group_allocation
from ratequota.testing import ManualClock, fake_client
from tests.conftest import MakeClient
from tests.strategies import allocation_cases

#: The worked vector of the design: C=24, two tenants with G=12, ℓ=⅓, B=4.
PAIR = GroupPolicy(
    "g",
    capacity=24,
    tenants=(
        TenantPolicy("lender", guarantee=12, lendable=1 / 3, borrow_limit=4),
        TenantPolicy("borrower", guarantee=12, lendable=1 / 3, borrow_limit=4),
    ),
)


def _snapshot(policy: GroupPolicy, used: dict[str, int], pending: dict[str, int]) -> GroupSnapshot:
    """A snapshot holding ``used`` and ``pending`` (engine numbers are not needed here)."""
    tenants = {
        t.name: TenantSnapshot(
            name=t.name,
            used=used.get(t.name, 0),
            pending=pending.get(t.name, 0),
            limit=0.0,
            lo=0.0,
            up=0.0,
            guarantee=t.guarantee,
            borrowed=max(0, used.get(t.name, 0) - t.guarantee),
        )
        for t in policy.tenants
    }
    return GroupSnapshot(
        group=policy.name,
        now=0.0,
        capacity=policy.capacity,
        used=sum(used.values()),
        policy_version=1,
        level=0.0,
        tenants=tenants,
        leases=(),
        leases_truncated=False,
    )


def _split(demand: dict[str, float], data: st.DataObject) -> tuple[dict[str, int], dict[str, int]]:
    used: dict[str, int] = {}
    pending: dict[str, int] = {}
    for name, d in demand.items():
        held = data.draw(st.integers(0, int(d)))
        used[name], pending[name] = held, int(d) - held
    return used, pending


@given(allocation_cases(max_tenants=8), st.data())
def test_entitlement_is_never_below_the_guarantee(
    case: tuple[GroupPolicy, dict[str, float]], data: st.DataObject
) -> None:
    """Whatever everyone holds and waits for, a tenant's limit is at least its guarantee."""
    policy, demand = case
    used, pending = _split(demand, data)
    snap = _snapshot(policy, used, pending)
    every = entitlements(snap, policy)
    for tenant in policy.tenants:
        assert every[tenant.name] >= tenant.guarantee - EPSILON
        # The fast path computes exactly the reference rule at the raised demand.
        raised = {n: float(used[n] + pending[n]) for n in used}
        raised[tenant.name] = float(policy.capacity)
        reference = group_allocation(policy, raised).limit(tenant.name)
        assert math.isclose(every[tenant.name], reference, rel_tol=1e-9, abs_tol=1e-9)
        assert entitlement(snap, policy, tenant.name) == every[tenant.name]


@given(allocation_cases(max_tenants=8), st.data())
def test_a_request_passes_the_tenant_check_exactly_when_it_fits_under_the_limit(
    case: tuple[GroupPolicy, dict[str, float]], data: st.DataObject
) -> None:
    """For a tenant with nothing waiting: not refused for its limit ⟺ used + units ≤ limit.

    So the number people read is the threshold the engine applies, not an
    approximation of it.
    """
    policy, demand = case
    tenant = data.draw(st.sampled_from([t.name for t in policy.tenants]))
    used, pending = _split(demand, data)
    pending[tenant] = 0
    spec = policy.tenant(tenant)
    assert spec is not None
    largest = int(min(policy.capacity, spec.ceiling))
    assume(largest >= 1)
    units = data.draw(st.integers(1, largest))
    limit = entitlement(_snapshot(policy, used, pending), policy, tenant)
    verdict = decide(policy, used, pending, tenant, units)
    wanted = used.get(tenant, 0) + units
    if wanted <= limit - 1e-6:
        assert verdict.reason in ("admitted", "group_full")
    elif wanted > limit + 1e-6:
        assert verdict.reason == "tenant_limit"


@given(allocation_cases(max_tenants=8), st.data())
def test_a_tenant_limit_refusal_never_shows_a_limit_below_the_guarantee(
    case: tuple[GroupPolicy, dict[str, float]], data: st.DataObject
) -> None:
    """The only refusal whose describe() shows a limit shows one at least the guarantee."""
    policy, demand = case
    tenant = data.draw(st.sampled_from([t.name for t in policy.tenants]))
    used, pending = _split(demand, data)
    units = data.draw(st.integers(1, policy.capacity))
    verdict = decide(policy, used, pending, tenant, units)
    spec = policy.tenant(tenant)
    assert spec is not None
    if verdict.reason == "tenant_limit":
        assert verdict.limit >= spec.guarantee - EPSILON


def _decision(**fields: object) -> Decision:
    base: dict[str, object] = {
        "admitted": False,
        "reason": "group_full",
        "tenant": "lender",
        "group": "g",
        "units": 2,
        "used": 0,
        "limit": 8.04,
        "group_used": 24,
        "capacity": 24,
        "retry_after": 0.5,
    }
    base.update(fields)
    return Decision(**base)  # type: ignore[arg-type]


def test_describe_shows_no_limit_below_the_guarantee_when_the_group_is_full() -> None:
    """A lender asking 2 of its 12 while borrowers fill the group: the engine's 8.04 stays out."""
    text = _decision().describe()
    assert "8.04" not in text
    assert "group holds 24 of 24" in text
    assert "retry in 0.500s" in text


def test_describe_of_an_admission_and_of_a_replay_prints_no_nan() -> None:
    """A replayed acquire has no limit (NaN in the data); its description says what happened."""
    client = fake_client(Policy((PAIR,)))
    try:
        first = client.try_acquire("lender", 3, request_id="r-1")
        again = client.try_acquire("lender", 3, request_id="r-1")
    finally:
        client.close()
    assert first.admitted
    assert again.lease is not None
    assert again.lease.replay
    for decision in (first, again):
        assert re.search(r"\bnan\b", decision.describe(), re.IGNORECASE) is None
    assert "1 unit " in _decision(units=1, reason="tenant_limit", limit=12.0).describe()
    assert "charged once" in again.describe()


def test_request_too_large_carries_no_retry_hint(make_quota: MakeClient) -> None:
    """A request that can never fit: retry_after 0, and no "retry in" in any message."""
    client = make_quota(Policy((PAIR,)))
    refused = client.try_acquire("lender", 17)
    assert refused.reason == "too_large"
    assert refused.retry_after == 0
    assert "retry" not in refused.describe()
    with pytest.raises(RequestTooLarge) as caught, client.acquire("lender", 17, timeout=1):
        pass
    assert caught.value.decision.retry_after == 0
    assert "retry" not in str(caught.value)


def test_a_misspelt_option_names_the_option_not_an_internal_method(
    make_quota: MakeClient,
) -> None:
    """``acquire(..., timout=1)`` is a TypeError naming ``timout`` and the real options
    (raised by ``acquire`` itself, before any ``with``, on both clients)."""
    client = make_quota(Policy((PAIR,)))
    for call in (
        lambda: client.acquire("lender", 1, timout=1),
        lambda: client.try_acquire("lender", 1, grup="g"),
    ):
        with pytest.raises(InvalidType) as caught:
            call()
        text = str(caught.value)
        assert "QuotaCore" not in text
        assert "request()" not in text
        assert "timeout" in text
        assert isinstance(caught.value, TypeError)


def test_async_with_on_the_blocking_client_points_to_the_async_one() -> None:
    """``async with QuotaClient()`` or its acquire: a ratequota error naming AsyncQuotaClient."""
    client = fake_client(Policy((PAIR,)))

    async def enter_client() -> None:
        async with client:  # type: ignore[attr-defined]
            pass

    async def enter_acquire() -> None:
        async with client.acquire("lender", 1):  # type: ignore[attr-defined]
            pass

    try:
        for scenario in (enter_client, enter_acquire):
            with pytest.raises(InvalidType) as caught:
                asyncio.run(scenario())
            assert "AsyncQuotaClient" in str(caught.value)
        assert client.snapshot("g").used == 0  # nothing was acquired on the way
    finally:
        client.close()


def test_acquire_before_any_policy_says_none_is_published(make_quota: MakeClient) -> None:
    """Not "tenant is not in the policy" when there is no policy at all."""
    client = make_quota()
    with pytest.raises(UnknownTenant) as caught:
        client.try_acquire("lender", 1)
    text = str(caught.value)
    assert "no policy is published" in text
    assert "`ratequota policy apply FILE`" in text
    assert "not in the policy" not in text


def test_unknown_tenant_hints_at_catalog_ttl_until_the_new_policy_is_read(
    make_quota: MakeClient,
) -> None:
    """A tenant published by another pod is refused from the cached policy, with a hint.

    After catalog_ttl (driven by a ManualClock) the new policy is read and the
    tenant is admitted.
    """
    clock = ManualClock()
    admin = make_quota(Policy((PAIR,)), clock=clock)
    pod = make_quota(clock=clock, catalog_ttl=5.0)
    assert pod.try_acquire("lender", 1).admitted  # reads the catalog
    grown = GroupPolicy("g", capacity=24, tenants=(*PAIR.tenants, TenantPolicy("newcomer")))
    admin.apply_policy(Policy((grown,)))
    with pytest.raises(UnknownTenant) as caught:
        pod.try_acquire("newcomer", 1)
    assert "catalog_ttl=5s" in str(caught.value)
    clock.advance(5.1)
    # The first call past catalog_ttl starts the refresh in the background and routes by the
    # catalog it holds (it may or may not see the newcomer yet); once the refresh is in, it does.
    with contextlib.suppress(UnknownTenant):
        pod.try_acquire("newcomer", 1)
    assert pod.core.wait_refreshed(10)
    assert pod.try_acquire("newcomer", 1).admitted
    other = make_quota(clock=clock)
    with pytest.raises(UnknownTenant) as fresh:  # read just now: nothing to hint at
        other.try_acquire("stranger", 1)
    assert "catalog_ttl" not in str(fresh.value)
    assert "tenant 'stranger' is not in the policy" in str(fresh.value)
