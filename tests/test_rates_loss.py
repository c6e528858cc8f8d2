"""Rate meters when their state vanishes: expired with an idle group, or lost by Redis.

A missing bucket reads as full (``ratequota.rates``), which is right only once
it would have refilled anyway. So the group's keys must outlive the time every
bucket charged is full again (the policy's ``mfull``), and a state Redis loses
before then restarts at the debt floor from the moment the loss is noticed
(``rates.lost_group`` / ``lost_tenant``): never more admitted than if nothing had
been lost (docs/rates.md, "When Redis loses the meters").

The histories run acquire.lua with the clock pinned; key expiry, which Redis runs
on its own clock, is replayed on the pinned one: after every call the test notes
when the group's keys would expire (pinned now + PTTL) and deletes them once the
pinned clock passes that.
"""

from __future__ import annotations

from typing import Any

import attrs
import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratequota import GroupPolicy, MeterPolicy, Policy, TenantMeter, TenantPolicy
from ratequota.engine import protocol
from ratequota.engine.keys import KeySpace
from ratequota.rates import horizon, meter_limits, share_limits
from ratequota.testing import ManualClock
from tests.conftest import MakeClient
from tests.strategies import MeterStep, meter_histories
from tests.test_rates_enforced import START, Scripts, T, assert_within_rates

KS = KeySpace()
KEYS = KS.group("g")
STATE = (KEYS.demand, KEYS.exp, KEYS.info, KEYS.queue, KEYS.fair)
#: Short leases, so that a recovery window after a loss ends within a few steps.
TTL_MS = 1_000


def _fake() -> Any:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


class ExpiringScripts(Scripts):
    """``Scripts`` whose group keys expire on the pinned clock as Redis would on its own."""

    def __init__(self, conn: Any, policy: GroupPolicy) -> None:
        super().__init__(conn, policy)
        self.deadline: int | None = None

    def expire_until(self, now: int) -> None:
        """Deletes the group's state keys if their expiry has passed by ``now``."""
        if self.deadline is not None and now >= self.deadline:
            self.conn.delete(*STATE)
            self.deadline = None

    def note_expiry(self, now: int) -> None:
        """Records when the keys expire after a call made at ``now``."""
        pttl = self.conn.pttl(KEYS.demand)
        assert pttl != -1, "the demand hash has no expiry"
        self.deadline = None if pttl < 0 else now + pttl


@st.composite
def lossy_histories(draw: st.DrawFn) -> tuple[GroupPolicy, list[MeterStep], list[str | None]]:
    """A meter history and, before each step, what Redis loses then (None: nothing)."""
    policy, steps = draw(meter_histories(max_steps=30))
    kinds = st.sampled_from([None, None, None, "demand", "state", "flushall"])
    losses = draw(st.lists(kinds, min_size=len(steps), max_size=len(steps)))
    return policy, steps, losses


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lossy_histories())
def test_no_tenant_or_group_is_admitted_above_its_rate_across_expiry_and_loss(
    redis_conn: Any, case: tuple[GroupPolicy, list[MeterStep], list[str | None]]
) -> None:
    """Over any interval of length T a tenant is admitted at most ceil·T + cburst tokens and the
    group at most rate·T + burst, while keys expire as Redis would expire them and Redis loses
    the demand hash, the whole state, or everything (the policy restored as a pod restores it);
    on fakeredis and on a real redis-server."""
    policy, steps, losses = case
    policy = attrs.evolve(policy, capacity=10**6)  # only the meters refuse
    scripts = ExpiringScripts(redis_conn, policy)  # flushes it: one history per example
    names = [t.name for t in policy.tenants]
    now = START
    admitted: list[tuple[int, str, int]] = []
    for (dt, who, amount, _extra), what in zip(steps, losses, strict=True):
        now += dt
        scripts.expire_until(now)
        if what == "demand":
            scripts.conn.delete(KEYS.demand)
        elif what == "state":
            scripts.conn.delete(*STATE)
        elif what == "flushall":
            scripts.conn.flushall()
            scripts.run(
                protocol.apply_policy_call(
                    KS, policy, recover_ms=int(policy.max_lease_ttl * 1000), now_ms=now
                )
            )
        decision = scripts.acquire(names[who], {"tokens": amount}, now, ttl=TTL_MS)
        scripts.note_expiry(now)
        result = decision.meter("tokens")
        if result is not None and result.admitted:
            admitted.append((now, names[who], amount * T))
    assert_within_rates(policy, admitted)


SLOW = GroupPolicy(
    "g",
    capacity=100,
    tenants=[TenantPolicy("a", meters=(TenantMeter("tokens", rate=60, burst=60),))],
    meters=(MeterPolicy("tokens", rate=60, burst=60, per="minute", debt=0),),
    max_lease_ttl=5,
)


def test_keys_outlive_the_refill_of_every_bucket_charged() -> None:
    """A drained bucket that takes a minute to refill keeps the group's keys for that minute
    plus the grace, even after its lease ends, and a policy change does not cut it short."""
    scripts = ExpiringScripts(_fake(), SLOW)
    drained = scripts.acquire("a", {"tokens": 60}, START, ttl=TTL_MS)
    assert drained.admitted
    need = horizon(meter_limits(SLOW, "tokens"), share_limits(SLOW, SLOW.tenants[0], "tokens"))
    assert need == 60_000
    for key in (KEYS.demand, KEYS.exp, KEYS.info, KEYS.fair):
        assert scripts.conn.pttl(key) >= need + 120_000, key
    changed = attrs.evolve(SLOW, capacity=99)
    scripts.run(protocol.apply_policy_call(KS, changed, now_ms=START + 2_000))
    assert scripts.conn.pttl(KEYS.demand) >= need - 2_000 + 120_000
    # Nor does a call without meters (which does not read mfull): it only ever lengthens.
    assert scripts.acquire("a", {}, START + 3_000, ttl=TTL_MS).admitted
    assert scripts.conn.pttl(KEYS.demand) >= need - 3_000 + 120_000
    # 10 s later the bucket holds 10 tokens: 11 are refused, 10 admitted.
    later = START + 10_000
    assert not scripts.acquire("a", {"tokens": 11}, later, ttl=TTL_MS).admitted
    assert scripts.acquire("a", {"tokens": 10}, later, ttl=TTL_MS).admitted


@pytest.mark.parametrize("lost", ["demand", "state"])
def test_lost_meters_restart_empty_from_when_the_loss_is_noticed(lost: str) -> None:
    """The demand hash (or the whole state) lost right after a tenant drained its bucket: the
    next request finds the bucket empty, not full, and is told when it refills."""
    scripts = ExpiringScripts(_fake(), SLOW)
    assert scripts.acquire("a", {"tokens": 60}, START, ttl=TTL_MS).admitted
    scripts.conn.delete(*((KEYS.demand,) if lost == "demand" else STATE))
    noticed = START + 2_000  # the lease has expired: no recovery window
    refused = scripts.acquire("a", {"tokens": 10}, noticed, ttl=TTL_MS)
    assert not refused.admitted and refused.reason == "meter"
    assert refused.retry_after == pytest.approx(10.0)
    assert not scripts.acquire("a", {"tokens": 10}, noticed + 9_999, ttl=TTL_MS).admitted
    assert scripts.acquire("a", {"tokens": 10}, noticed + 10_000, ttl=TTL_MS).admitted


def test_a_debt_is_not_forgiven_by_a_loss() -> None:
    """With a debt bound the lost bucket restarts at the floor: a tenant that overran its
    estimate by the whole debt waits for the debt and its request to refill."""
    policy = attrs.evolve(
        SLOW, meters=(MeterPolicy("tokens", rate=60, burst=60, per="minute", debt=30),)
    )
    scripts = ExpiringScripts(_fake(), policy)
    drained = scripts.acquire("a", {"tokens": 60}, START, ttl=TTL_MS)
    assert drained.lease is not None
    scripts.run(protocol.settle_call(KS, drained.lease, {"tokens": 90}, now_ms=START))
    scripts.conn.delete(*STATE)
    noticed = START + 2_000
    refused = scripts.acquire("a", {"tokens": 1}, noticed, ttl=TTL_MS)
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(31.0)


def test_a_group_idle_past_the_refill_starts_full() -> None:
    """Once every bucket would be full again, a loss (or the keys' expiry) costs nothing."""
    scripts = ExpiringScripts(_fake(), SLOW)
    assert scripts.acquire("a", {"tokens": 60}, START, ttl=TTL_MS).admitted
    later = START + 60_000 + 60_001  # past the refill and mfull's slack
    scripts.conn.delete(*STATE)
    assert scripts.acquire("a", {"tokens": 60}, later, ttl=TTL_MS).admitted


def test_a_pod_restoring_a_flushed_policy_restarts_the_meters_empty(
    make_quota: MakeClient,
) -> None:
    """FLUSHALL: the pod restores the policy and the group recovers for one max_lease_ttl; the
    tenant that drained its bucket before then gets what refilled since the loss was noticed,
    not a fresh burst (on both clients, fakeredis and real Redis)."""
    clock = ManualClock()
    pod = make_quota(Policy([SLOW]), clock=clock, auto_renew=False)
    first = pod.try_acquire("a", 1, ttl=1.0, tokens=60)
    assert first.admitted
    conn = make_quota.conn()
    conn.flushall()
    conn.close()
    clock.advance(2)
    assert pod.try_acquire("a", 1, ttl=1.0, tokens=1).reason == "recovering"
    clock.advance(5)  # the window (max_lease_ttl) has ended: 5 s refilled 5 tokens
    refused = pod.try_acquire("a", 1, ttl=1.0, tokens=10)
    assert not refused.admitted and refused.reason == "meter"
    assert pod.try_acquire("a", 1, ttl=1.0, tokens=5).admitted
