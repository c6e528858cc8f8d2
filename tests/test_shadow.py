"""Shadow mode (a group or a tenant decided in full, never refused for limits; docs/metrics.md).

The central property: on the same recorded workload, shadow mode admits
exactly the requests enforcement refuses for ``tenant_limit`` or
``group_full``, with the same reason, and changes nothing else. To compare
the two runs step by step, the shadow run gives a shadow admission back at
once (as if, like in the enforcing run, it had never been held), so both
runs decide every request from the same state. Separate tests show that a
shadow admission really holds its units in Redis while it is held.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ratequota.errors import ConfigError
from ratequota.metrics import PrometheusMetrics
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import MakeClient

TENANTS = ("a", "b", "c")
_names = itertools.count()


def group_policy(name: str, *, shadow: str) -> GroupPolicy:
    """Capacity 10: a and b guaranteed 3 each (b may borrow 2), c only borrows (at most 3)."""
    return GroupPolicy(
        name,
        capacity=10,
        tenants=(
            TenantPolicy("a", guarantee=3, shadow=shadow == "tenant"),
            TenantPolicy("b", guarantee=3, borrow_limit=2),
            TenantPolicy("c", borrow_limit=3, lendable=0.5),
        ),
        shadow=shadow == "group",
    )


Op = tuple[str, Any, Any]

ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("req"), st.sampled_from(TENANTS), st.integers(1, 6)),
        st.tuples(st.just("end"), st.integers(0, 20), st.none()),
    ),
    min_size=1,
    max_size=40,
)


def replay(quota: Any, group: str, ops: list[Op]) -> list[tuple[str, bool, str, float, bool]]:
    """Run ``ops``; per request: (tenant, admitted, reason, limit, shadow_refused).

    A shadow admission is released at once, so the next request sees the
    state the enforcing run (which refused it) sees.
    """
    held: list[Any] = []
    out = []
    for kind, first, second in ops:
        if kind == "end":
            if held:
                quota.release(held.pop(first % len(held)))
            continue
        decision = quota.try_acquire(first, second, group=group)
        out.append(
            (first, decision.admitted, decision.reason, decision.limit, decision.shadow_refused)
        )
        if decision.shadow_refused:
            assert decision.lease is not None
            quota.release(decision.lease)
        elif decision.admitted:
            held.append(decision.lease)
    return out


@pytest.mark.parametrize("shadow", ["group", "tenant"])
@settings(max_examples=25)
@given(ops=ops_strategy)
def test_shadow_admits_exactly_what_enforcement_refuses(
    make_quota: MakeClient, shadow: str, ops: list[Op]
) -> None:
    """Same workload, enforcing then shadow: the refusals for limits become shadow admissions."""
    enforcing = make_quota(clock=ManualClock(), prefix="enforce")
    shadowing = make_quota(clock=ManualClock(), prefix="shadow")
    name = f"g{next(_names)}"
    enforcing.apply_policy(Policy([group_policy(name, shadow="off")]))
    shadowing.apply_policy(Policy([group_policy(name, shadow=shadow)]))

    enforced = replay(enforcing, name, ops)
    shadowed = replay(shadowing, name, ops)

    assert len(enforced) == len(shadowed)
    for (tenant, admitted, reason, limit, flagged), (
        _,
        s_admitted,
        s_reason,
        s_limit,
        s_flag,
    ) in zip(enforced, shadowed, strict=True):
        assert not flagged
        assert s_limit == limit and s_reason == reason  # the decision itself is unchanged
        in_shadow = shadow == "group" or tenant == "a"
        limited = reason in ("tenant_limit", "group_full")
        assert s_flag == (in_shadow and limited and not admitted)
        assert s_admitted == (admitted or s_flag)


def test_a_shadow_admission_holds_real_units(make_quota: MakeClient, caplog: Any) -> None:
    """The lease is recorded in Redis: the group's used units go above the capacity."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    policy = Policy([group_policy("g", shadow="group")])
    quota = make_quota(policy, clock=ManualClock(), observer=metrics)
    assert quota.try_acquire("c", 3).admitted  # c's borrow limit is 3
    with caplog.at_level(logging.INFO, logger="ratequota.shadow"):
        over = quota.try_acquire("c", 2)
    assert over.admitted and over.shadow_refused and over.reason == "tenant_limit"
    assert over.lease is not None and over.lease.token > 0 and not over.lease.synthetic
    assert "shadow mode" in caplog.text and "enforcing would refuse" in caplog.text
    for _ in range(2):
        assert quota.try_acquire("a", 2).admitted and quota.snapshot("g").used <= 10
    full = quota.try_acquire("b", 2)  # 5 + 4 held; 11 > 10
    assert full.shadow_refused and full.reason == "group_full"
    snapshot = quota.snapshot("g", TENANTS)
    assert snapshot.used == 11 > snapshot.capacity
    assert snapshot.tenants["c"].used == 5
    # too_large still refuses in shadow mode: it can never fit.
    assert quota.try_acquire("c", 11).reason == "too_large"
    assert not quota.try_acquire("c", 11).admitted

    # Counted as shadow admissions, by the reason enforcement would have given.
    def count(reason: str) -> float:
        labels = {"group": "g", "result": "shadow_admitted", "reason": reason}
        return registry.get_sample_value("ratequota_decisions_total", labels) or 0.0

    assert count("tenant_limit") == 1 and count("group_full") == 1
    # Releasing gives the units back as for any lease.
    assert quota.release(over.lease).was_live
    assert quota.snapshot("g").used == 9


def test_a_shadow_tenant_still_cannot_make_others_overadmit(make_quota: MakeClient) -> None:
    """Only the shadow tenant passes its limits; the others are enforced, also against its units."""
    quota = make_quota(Policy([group_policy("g", shadow="tenant")]), clock=ManualClock())
    for _ in range(5):
        decision = quota.try_acquire("a", 2)  # guarantee 3: beyond it, shadow admissions
        assert decision.admitted
    assert quota.snapshot("g").used == 10
    refused = quota.try_acquire("b", 1)
    assert not refused.admitted and refused.reason == "group_full" and not refused.shadow_refused
    assert quota.try_acquire("a", 4).shadow_refused  # a alone goes above the capacity


def test_waiting_acquire_in_shadow_mode_does_not_wait(make_quota: MakeClient) -> None:
    """acquire in shadow mode is admitted on its first try: nothing to wait for."""
    clock = ManualClock()
    quota = make_quota(Policy([group_policy("g", shadow="group")]), clock=clock)
    with quota.acquire("c", 3), quota.acquire("c", 3, timeout=5) as second:
        assert second.units == 3
        assert clock.monotonic() == 0.0
        assert quota.snapshot("g").tenants["c"].used == 6


# -- the policy field --------------------------------------------------------------


@pytest.mark.parametrize("where", ["group", "tenant"])
def test_shadow_must_be_a_boolean(where: str) -> None:
    """Like every field: validated at construction, the message names it."""
    with pytest.raises(ConfigError, match="shadow") as info:
        if where == "group":
            GroupPolicy("g", capacity=1, shadow="yes")  # type: ignore[arg-type]
        else:
            TenantPolicy("a", shadow=1)  # type: ignore[arg-type]
    assert "tenant 'a'" in str(info.value) or "group 'g'" in str(info.value)


def test_shadow_round_trips_through_toml_and_the_catalog(tmp_path: Path) -> None:
    """``shadow = true`` in TOML for a group or a tenant; defaults stay out of the dict."""
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[[groups]]
name = "g"
capacity = 10
shadow = true

[[groups.tenants]]
name = "a"
guarantee = 2

[[groups]]
name = "h"
capacity = 5

[[groups.tenants]]
name = "b"
shadow = true
""",
        encoding="utf-8",
    )
    policy = Policy.from_toml(path)
    g, h = policy.groups
    assert g.shadow and not g.tenants[0].shadow
    assert not h.shadow and h.tenants[0].shadow
    data = policy.to_dict()
    assert data["groups"][0]["shadow"] is True and "shadow" not in data["groups"][1]
    assert data["groups"][1]["tenants"][0]["shadow"] is True
    assert Policy.from_dict(data) == policy
    plain = Policy([GroupPolicy("x", capacity=1)]).to_dict()
    assert "shadow" not in plain["groups"][0]  # old pods still read policies without shadow

    bad = tmp_path / "bad.toml"
    bad.write_text('[[groups]]\nname = "g"\ncapacity = 1\nshadow = "on"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="shadow"):
        Policy.from_toml(bad)


# -- the simulation's safety checks ------------------------------------------------


@pytest.mark.parametrize("shadow", ["off", "group", "tenant"])
def test_simulation_safety_checks_leave_shadow_groups_out(shadow: str) -> None:
    """Over-admission in a group with shadow mode is by design: not a safety violation.

    The same records (10 units held in a group of capacity 8, and a tenant
    above its G + B) violate the invariants when the group enforces.
    """
    from ratequota.sim.scenario import Scenario, TenantLoad, Traffic
    from ratequota.sim.stats import Interval, Sample, build_report

    group = GroupPolicy(
        "g",
        capacity=8,
        tenants=(
            TenantPolicy("a", guarantee=4, borrow_limit=2, shadow=shadow == "tenant"),
            TenantPolicy("b", guarantee=4),
        ),
        shadow=shadow == "group",
    )
    scenario = Scenario(
        name="shadow",
        policy=Policy((group,)),
        loads=(
            TenantLoad("a", "g", Traffic("steady", 4, 2, 0.2)),
            TenantLoad("b", "g", Traffic("steady", 2, 1, 0.2)),
        ),
        duration=1.0,
        pods=1,
        acquire_timeout=0.5,
        sample_interval=0.1,
    )
    intervals = [Interval("a", "g", 8, 0.0, 1.0), Interval("b", "g", 2, 0.0, 1.0)]
    sample = Sample("g", 0.5, 8, 10, {"a": 8, "b": 2}, {}, 10)
    report = build_report(scenario, intervals, [], [sample], elapsed=1.0)
    assert report.safe == (shadow != "off")
    assert report.groups[0].over_admission == 2  # still reported, as what enforcing prevents


@pytest.mark.parametrize("explicit", [True, False])
def test_turning_shadow_off_takes_effect_within_catalog_ttl(
    make_quota: MakeClient, explicit: bool
) -> None:
    """A pod that saw shadow mode re-reads the policy by catalog_ttl, also when naming groups."""
    clock = ManualClock()
    operator = make_quota(Policy([group_policy("g", shadow="group")]), clock=clock)
    pod = make_quota(clock=clock, catalog_ttl=5.0)
    pod.load_policy()
    group = {"group": "g"} if explicit else {}
    assert pod.try_acquire("c", 3, **group).admitted
    assert pod.try_acquire("c", 1, **group).shadow_refused
    operator.apply_policy(Policy([group_policy("g", shadow="off")]))
    clock.advance(1.0)
    assert pod.try_acquire("c", 1, **group).shadow_refused  # within catalog_ttl: as last read
    clock.advance(5.0)
    refused = pod.try_acquire("c", 1, **group)
    assert not refused.admitted and refused.reason == "tenant_limit"


def test_default_tenant_in_shadow_mode(make_quota: MakeClient) -> None:
    """Strangers (the default tenant) in shadow mode; listed tenants of the group still enforced."""
    group = GroupPolicy(
        "g",
        capacity=10,
        tenants=(TenantPolicy("a", guarantee=3, borrow_limit=0),),
        unknown_tenants="default",
        default_tenant=TenantPolicy("*", borrow_limit=2, shadow=True),
    )
    other = GroupPolicy("h", capacity=4, tenants=(TenantPolicy("z"),))
    quota = make_quota(Policy([group, other], default_group="g"), clock=ManualClock())
    assert quota.try_acquire("stranger", 2).admitted
    over = quota.try_acquire("stranger", 1)
    assert over.shadow_refused and over.reason == "tenant_limit"
    # "z" is listed in h, not in g: charged to g it is g's default tenant, in shadow mode.
    assert quota.try_acquire("z", 2, group="g").admitted
    assert quota.try_acquire("z", 1, group="g").shadow_refused
    assert quota.try_acquire("a", 3).admitted
    refused = quota.try_acquire("a", 1)
    assert not refused.admitted and refused.reason == "tenant_limit"
