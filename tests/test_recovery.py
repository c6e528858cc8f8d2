"""Recovery after Redis loses a group's state (issue 9 items 5 and 7, "What to build").

When the state keys are evicted, or Redis restarts empty while pods still hold leases, the
group must not admit a full capacity on top of the leases still running (2x was observed),
and fencing tokens must not start again at 1. The group recovers for one max_lease_ttl:
holders' renewals re-assert their leases (same id, tenant, units and token), new work is
refused as ``recovering`` with ``retry_after`` = the time left, and afterwards the group
serves normally. Sync and async clients, fakeredis and a real redis-server (its own server
killed and restarted), time driven by a ``ManualClock``.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest

from ratequota.clients.backends import url_backend
from ratequota.clients.renewal import renew_many
from ratequota.clients.sync import QuotaClient
from ratequota.decision import LeaseInfo
from ratequota.engine.keys import KeySpace
from ratequota.errors import BackendUnavailable, PolicyMissing
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.bridge import Quotas, hold
from tests.conftest import MakeClient
from tests.servers import RedisServer

WINDOW = 30.0
POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=10,
            tenants=[TenantPolicy("a", guarantee=5), TenantPolicy("b", guarantee=5)],
            max_lease_ttl=WINDOW,
        )
    ]
)


def _lose_state(pods: Quotas, *which: str) -> None:
    """Delete the group's state keys, as an eviction under allkeys-* would (policy kept)."""
    group = KeySpace().group("g")
    names = {"demand": group.demand, "exp": group.exp, "info": group.info, "queue": group.queue}
    conn = pods.conn()
    conn.delete(*[names[w] for w in (which or tuple(names))])
    conn.close()


def _used(pod: Any) -> int:
    return int(pod.snapshot("g").used)


def _hold_capacity(pod: Any) -> tuple[Any, Any]:
    a = hold(pod, "a", 6, ttl=20.0)
    b = hold(pod, "b", 4, ttl=20.0)
    assert _used(pod) == 10
    return a, b


@pytest.mark.parametrize("lost", [(), ("demand",), ("exp", "info")])
def test_evicted_state_recovers_without_over_admission(
    make_quota: MakeClient, lost: tuple[str]
) -> None:
    """The state keys (all, or only some: a partial eviction) vanish while 10 of 10 units are
    held. Before this fix the group admitted a full capacity on top (demand gone) or leaked.
    Now new work is refused until the last lease granted before the loss has certainly ended,
    the holders re-assert theirs by renewing, and the group serves afterwards."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, b = _hold_capacity(pod)
    busy_until = max(a.expires_at, b.expires_at)
    _lose_state(make_quota, *lost)
    clock.advance(1)
    refused = pod.try_acquire("b", 1, ttl=5.0)
    assert (refused.admitted, refused.reason) == (False, "recovering")
    assert refused.retry_after == pytest.approx(busy_until - clock.redis_ms() / 1000)
    snap = pod.snapshot("g")
    assert snap.recovering and snap.recovering_until == pytest.approx(busy_until)
    for lease in (a, b):
        result = lease.renew(10.0)
        assert (result.renewed, result.reason) == (True, "reasserted")
    assert _used(pod) == 10
    listed = {x.id: x for x in pod.snapshot("g").leases}
    assert listed[a.id].token == a.token and listed[b.id].token == b.token
    assert a.renew(25.0).reason == "renewed"
    # Until the window ends nothing new gets in, even with units free.
    assert b.release().state == "released"
    assert pod.try_acquire("b", 1, ttl=5.0).reason == "recovering"
    clock.advance(busy_until - clock.redis_ms() / 1000 - 1)
    assert a.renew(10.0).reason == "renewed"  # a keeps its 6 units past the window
    clock.advance(1)
    assert not pod.snapshot("g").recovering
    later = pod.try_acquire("b", 4, ttl=5.0)
    assert later.admitted and later.lease is not None
    assert later.lease.token > a.token
    assert not pod.try_acquire("b", 1, ttl=5.0).admitted  # a's 6 + b's 4
    assert _used(pod) == 10


def test_a_policy_lost_during_the_recovery_window_keeps_the_window(
    make_quota: MakeClient,
) -> None:
    """The state is lost (the window opens), then the policy hash too, which held the window's
    end, and the pod restores the policy. Before this fix the restore forgot the window: the
    keys check_state had re-created with their sentinels passed for a whole state, and the
    group admitted a full capacity on top of the leases still running (found by the fault
    harness's long run, an eviction on a loaded shard). check_state now keeps the window's
    end in the demand hash too, and the restore takes it back."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, b = _hold_capacity(pod)
    busy_until = max(a.expires_at, b.expires_at)
    _lose_state(make_quota, "demand")
    clock.advance(1)
    assert pod.try_acquire("b", 1, ttl=5.0).reason == "recovering"
    conn = make_quota.conn()
    conn.delete(KeySpace().group("g").policy)
    conn.close()
    clock.advance(1)
    refused = pod.try_acquire("b", 4, ttl=5.0)  # restores the policy, then decides
    assert (refused.admitted, refused.reason) == (False, "recovering")
    assert refused.retry_after == pytest.approx(busy_until - clock.redis_ms() / 1000)
    assert pod.snapshot("g").recovering_until == pytest.approx(busy_until)
    for lease in (a, b):
        assert lease.renew(10.0).reason == "reasserted"
    assert _used(pod) == 10
    clock.advance(busy_until - clock.redis_ms() / 1000 - 1)
    assert pod.try_acquire("a", 1, ttl=5.0).reason == "recovering"
    clock.advance(1)
    later = pod.try_acquire("b", 4, ttl=5.0)  # a's and b's renewals have ended
    assert later.admitted


def test_a_renewal_never_shortens_a_lease_so_a_stale_expiry_cannot_revive_it(
    make_quota: MakeClient,
) -> None:
    """A holder renews with less time than its lease has left, keeping the LeaseInfo of the
    acquire (so the expiry it names is the acquire's), then Redis loses the state and the
    holder renews again with that LeaseInfo. Before this fix the first renewal moved the
    expiry earlier: the lease ended, its units went to others, and the second renewal
    re-asserted it from the later, stale expiry it named (found by the fault harness's long
    run: one unit over the capacity). A renewal now never moves an expiry earlier, so no
    expiry a holder learned is past the true one; a re-assert keeps the named expiry, capped
    at one max_lease_ttl from now."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, _ = _hold_capacity(pod)
    info = a.info  # the acquire's facts, kept as the fault harness's pods keep them
    short = pod.renew(info, 2.0)
    assert short.renewed and short.ttl == 2.0
    assert short.expires_at == pytest.approx(info.expires_at)  # not 2 s from now
    clock.advance(5)  # past what the shorter renewal would have left
    assert not pod.try_acquire("b", 1, ttl=5.0).admitted  # a still holds its 6
    assert _used(pod) == 10
    _lose_state(make_quota)
    clock.advance(1)
    again = pod.renew(info, 2.0)
    assert again.reason == "reasserted"
    assert again.expires_at == pytest.approx(info.expires_at)  # the named expiry, kept
    _lose_state(make_quota)
    clock.advance(1)
    forged = attrs.evolve(info, expires_at=info.expires_at + 3600)
    capped = pod.renew(forged, 2.0)
    assert capped.reason == "reasserted"
    assert capped.expires_at == pytest.approx(clock.redis_ms() / 1000 + WINDOW)


def test_a_policy_lost_alone_keeps_the_group_serving(make_quota: MakeClient) -> None:
    """Only the policy hash is lost (an eviction that spared the state keys), no window open:
    the state still holds every lease, so the restored policy opens no window; the leases
    stay counted and renew as usual."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, b = _hold_capacity(pod)
    conn = make_quota.conn()
    conn.delete(KeySpace().group("g").policy)
    conn.close()
    clock.advance(1)
    assert pod.try_acquire("a", 1, ttl=5.0).reason == "tenant_limit"  # a holds 6, not recovering
    assert not pod.snapshot("g").recovering
    assert a.renew(10.0).reason == "renewed"
    assert b.release().state == "released"
    assert pod.try_acquire("b", 4, ttl=5.0).admitted


def test_release_after_its_expiry_was_evicted_gives_the_units_back(make_quota: MakeClient) -> None:
    """Only exp is evicted, and a holder releases before any acquire notices: the release
    used to fail with a Lua error (no expiry to compare); it frees the units, and the next
    acquire still finds the loss and recovers."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, _ = _hold_capacity(pod)
    _lose_state(make_quota, "exp")
    result = a.release()
    assert (result.state, result.units) == ("released", 6)
    assert _used(pod) == 4
    assert pod.try_acquire("a", 1, ttl=5.0).reason == "recovering"


def test_only_live_leases_within_capacity_are_reasserted(make_quota: MakeClient) -> None:
    """A re-assertion is no blank cheque: a lease already expired by its own last known expiry
    is lost, and so is one that would push the group above its capacity."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, b = _hold_capacity(pod)
    _lose_state(make_quota)
    clock.advance(2)
    expired = attrs.evolve(a.info, expires_at=clock.redis_ms() / 1000 - 0.001)
    assert pod.renew(expired, 5.0).reason == "lost"
    assert b.renew(5.0).reason == "reasserted"
    # A made-up lease of 7 units would not fit next to b's 4.
    forged = LeaseInfo("made-up", "a", "g", 7, 1, clock.redis_ms() / 1000 + 5)
    assert pod.renew(forged, 5.0).reason == "lost"
    assert a.renew(5.0).reason == "reasserted"
    assert _used(pod) == 10


@pytest.mark.parametrize("forge", ["token", "tenant"])
def test_a_forged_renewal_during_recovery_is_bounded_as_documented(
    make_quota: MakeClient, forge: str
) -> None:
    """docs/failure-modes.md, "What the window cannot check": Redis forgot the leases, so the
    first renewal naming a lost lease's id re-asserts it, with the token and tenant it names,
    even a forged one. What keeps that bounded: the units are counted once (no capacity is
    added), and the real holder is told ``fenced`` (its lease is no longer its own), never
    ``renewed``. A fix (re-assertion checking the holder) would turn this test around; the
    fault harness's ``fenced-reassert`` flag fails a run that shows a forgery taking a lease."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a, _ = _hold_capacity(pod)
    _lose_state(make_quota)
    clock.advance(1)
    if forge == "token":
        forged = attrs.evolve(a.info, token=a.token + 1)
    else:
        forged = attrs.evolve(a.info, tenant="b")
    assert pod.renew(forged, 5.0).reason == "reasserted"
    holder = a.renew(5.0)
    assert not holder.renewed and holder.reason == "fenced"
    listed = {x.id: x for x in pod.snapshot("g").leases}
    assert (listed[a.id].tenant, listed[a.id].token) == (forged.tenant, forged.token)
    assert _used(pod) <= 10  # the forged lease holds the lost lease's units, once
    assert pod.try_acquire("b", 1, ttl=5.0).reason == "recovering"


def test_flushall_pod_restores_policy_and_tokens_never_go_back(make_quota: MakeClient) -> None:
    """Redis restarted empty (FLUSHALL): the pod that knew the policy restores it and the
    restore opens the recovery window (one max_lease_ttl: Redis forgot when the last lease
    ends). The holder's renewal itself restores the policy and re-asserts its lease; every
    token handed out afterwards is above every token handed out before."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a = hold(pod, "a", 6, ttl=20.0)
    conn = make_quota.conn()
    conn.flushall()
    conn.close()
    clock.advance(1)
    assert a.renew(20.0).reason == "reasserted"
    refused = pod.try_acquire("b", 4, ttl=5.0)
    assert refused.reason == "recovering"
    assert refused.retry_after == pytest.approx(WINDOW)
    assert _used(pod) == 6
    for _ in range(3):  # the holder keeps renewing through the window
        clock.advance(9.5)
        assert a.renew(20.0).reason == "renewed"
    assert pod.try_acquire("b", 4, ttl=5.0).reason == "recovering"
    clock.advance(WINDOW + 1 - 28.5)
    fresh = pod.try_acquire("b", 4, ttl=5.0)
    assert fresh.admitted and fresh.lease is not None
    assert fresh.lease.token > a.token
    assert not pod.try_acquire("b", 1, ttl=5.0).admitted
    assert _used(pod) == 10


def test_tokens_stay_above_the_old_ones_after_a_total_loss(make_quota: MakeClient) -> None:
    """Item 7's second half: after FLUSHALL the fencing counter restarted at 1, the very tokens
    old holders carried. Tokens now have a floor of Redis time in ms x 1000."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    tokens = []
    for _ in range(3):
        decision = pod.try_acquire("a", 1, ttl=1.0)
        assert decision.lease is not None
        tokens.append(decision.lease.token)
    conn = make_quota.conn()
    conn.flushall()
    conn.close()
    clock.advance(0.001)
    pod.try_acquire("a", 1, ttl=1.0)  # restores the policy: recovering
    clock.advance(WINDOW)
    after = pod.try_acquire("a", 1, ttl=1.0)
    assert after.lease is not None
    assert after.lease.token > max(tokens)
    assert tokens == sorted(set(tokens))


def test_the_background_renewer_restores_a_lost_policy(make_quota: MakeClient) -> None:
    """The renewer's batched renewal meets ``no_policy`` after an empty restart: it goes
    through the renew flow, which restores the policy and re-asserts the lease."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    a = hold(pod, "a", 6, ttl=20.0)
    conn = make_quota.conn()
    conn.flushall()
    conn.close()
    (outcome,) = pod._run(renew_many(pod.core, [a], pod._node_of))
    assert outcome.reason == "reasserted"
    assert _used(pod) == 6
    assert pod.try_acquire("b", 1, ttl=5.0).reason == "recovering"


def test_explain_says_the_group_is_recovering(make_quota: MakeClient) -> None:
    """``explain`` reports the recovery window: its verdict must not promise an admission the
    engine refuses."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    hold(pod, "a", 2, ttl=20.0)
    _lose_state(make_quota)
    explanation = pod.explain("b", 1)
    assert explanation.admitted is False
    assert explanation.recovering_until > 0
    assert "would be refused (recovering)" in explanation.describe()


# -- a real redis-server killed and restarted empty --------------------------------------


@pytest.fixture
def own_server(private_redis: RedisServer) -> RedisServer:
    """A redis-server of this test alone (it is killed and restarted), stopped by PID."""
    return private_redis


@pytest.mark.real_redis
def test_restart_without_persistence_recovers_on_both_clients(own_server: RedisServer) -> None:
    """SIGKILL and restart of redis-server without persistence under held leases, with a sync
    and an async pod: no over-admission, the holders re-assert, tokens keep growing, and new
    work is admitted once the window has passed. The clock is pinned at the real time, so the
    token floor is Redis-time-like."""
    clock = ManualClock(start_ms=int(time.time() * 1000))
    pods = Quotas("sync", own_server)
    apods = Quotas("async", own_server)
    try:
        sync_pod = pods(POLICY, clock=clock, breaker_reset=0.2, auto_renew=False)
        async_pod = apods(clock=clock, breaker_reset=0.2, auto_renew=False)
        a = hold(sync_pod, "a", 6, ttl=20.0)
        b = hold(async_pod, "b", 4, ttl=20.0)
        own_server.kill()
        own_server.start()  # same port, empty
        for pod in (sync_pod, async_pod):
            # The first call on a pooled connection meets the closed socket (as a renewer's
            # would, and retries): reconnect once.
            with pytest.raises((BackendUnavailable, PolicyMissing)):
                pod.snapshot("g")
        clock.advance(0.3)  # past breaker_reset, should a breaker have opened
        assert b.renew(20.0).reason == "reasserted"
        assert a.renew(20.0).reason == "reasserted"
        for pod in (sync_pod, async_pod):
            assert pod.try_acquire("b", 1, ttl=5.0).reason == "recovering"
            assert _used(pod) == 10
        clock.advance(WINDOW)
        for lease in (a, b):  # a held through the sync pod, b through the async one
            assert lease.release().state in ("expired", "unknown")
        fresh = async_pod.try_acquire("a", 10, ttl=5.0)
        assert fresh.admitted and fresh.lease is not None
        assert fresh.lease.token > max(a.token, b.token)
        assert _used(sync_pod) == 10
    finally:
        pods.close()
        apods.close()


@pytest.mark.real_redis
def test_tokens_follow_redis_time_when_the_clock_is_not_pinned(own_server: RedisServer) -> None:
    """Without a pinned clock the scripts read Redis TIME: the first token of a fresh server is
    at least its time in ms x 1000 (a restart cannot hand out an old holder's token)."""
    quota = QuotaClient(backend=url_backend(own_server.url, socket_timeout=5.0), auto_renew=False)
    try:
        quota.apply_policy(POLICY)
        plain = own_server.client()
        before = plain.time()
        plain.close()
        decision = quota.try_acquire("a", 1, ttl=1.0)
        assert decision.lease is not None
        assert decision.lease.token >= (before[0] * 1000 + before[1] // 1000) * 1000
    finally:
        quota.close()
