"""Lease behaviour on every backend (embedded fakeredis and a real redis-server).

The clock is pinned with ``ManualClock`` so expiry is exact and tests never sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from ratequota import (
    AcquireTimeout,
    GroupPolicy,
    InvalidRequest,
    Policy,
    PolicyMissing,
    QuotaExceeded,
    RequestTooLarge,
    TenantPolicy,
    UnknownTenant,
)
from ratequota.engine.fairstate import WIDE_MEMBER
from ratequota.engine.ledger import HOUR_MS
from ratequota.policy import DEFAULT_USAGE_RETENTION
from ratequota.testing import ManualClock
from tests.bridge import raw_connection
from tests.conftest import MakeClient

POLICY = Policy(
    [
        GroupPolicy(
            "batch",
            capacity=10,
            tenants=[
                TenantPolicy("a", guarantee=5, borrow_limit=3),
                TenantPolicy("b", guarantee=5, max_units=4),
            ],
            max_lease_ttl=300,
        ),
        GroupPolicy("open", capacity=6, unknown_tenants="default"),
    ],
    default_group="open",
)


def expiring_keys_ok(client: object) -> list[str]:
    """Keys of the client's prefix with no expiry, other than policies and the catalog."""
    conn = raw_connection(client)
    bad = []
    for key in conn.scan_iter(match="rq:*"):
        name = key.decode()
        if name.endswith(":policy") or name.endswith(":catalog"):
            continue
        if conn.pttl(key) < 0:
            bad.append(name)
    return bad


def test_try_acquire_admits_then_refuses_with_numbers(make_quota: MakeClient) -> None:
    """A refusal says why and gives used / limit / capacity; an admission carries a lease."""
    quota = make_quota(POLICY, clock=ManualClock())
    first = quota.try_acquire("a", 8)
    assert first.admitted and first.lease is not None
    assert (first.used, first.group_used, first.capacity) == (8, 8, 10)
    refused = quota.try_acquire("a", 1)
    assert not refused.admitted
    assert refused.reason == "tenant_limit"
    assert (refused.used, refused.limit) == (8, 8.0)
    assert refused.retry_after > 0
    assert "fair limit" in refused.describe()
    b = quota.try_acquire("b", 2)
    assert b.admitted
    quota.release(first.lease)
    assert quota.snapshot("batch").used == 2


def test_group_full_and_too_large(make_quota: MakeClient) -> None:
    """Requests above min(C, G+B, max_units) are too large; a full group says group_full."""
    quota = make_quota(POLICY, clock=ManualClock())
    assert quota.try_acquire("a", 9).reason == "too_large"  # G+B = 8
    assert quota.try_acquire("b", 5).reason == "too_large"  # max_units = 4
    with pytest.raises(RequestTooLarge), quota.acquire("a", 9, timeout=1):
        pass
    assert quota.try_acquire("s1", 6).admitted  # strangers share "open"
    full = quota.try_acquire("s2", 1)
    assert full.reason in ("group_full", "tenant_limit")
    assert full.group == "open"


def test_context_manager_releases_on_exception(make_quota: MakeClient) -> None:
    """The lease is released when the block raises, and the exception propagates."""
    quota = make_quota(POLICY, clock=ManualClock())
    with pytest.raises(RuntimeError, match="boom"), quota.acquire("a", 4) as lease:
        assert lease.units == 4 and lease.token >= 1
        raise RuntimeError("boom")
    assert quota.snapshot("batch").used == 0
    assert expiring_keys_ok(quota) == []


def test_expiry_returns_a_dead_holders_units(make_quota: MakeClient) -> None:
    """A holder that stops renewing loses its units at expiry (Redis time), and they come back."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    dead = quota.try_acquire("a", 8, ttl=30)
    assert dead.admitted and dead.lease is not None
    assert not quota.try_acquire("a", 1).admitted
    clock.advance(29.9)
    assert not quota.try_acquire("a", 1).admitted
    clock.advance(0.2)
    assert quota.try_acquire("a", 8).admitted
    result = quota.release(dead.lease)
    assert result.state == "unknown" and not result.was_live


def test_release_of_an_overrun_lease_reports_expired(make_quota: MakeClient) -> None:
    """Releasing after the TTL (before any purge) says the holder overran its lease."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    decision = quota.try_acquire("a", 2, ttl=5)
    assert decision.lease is not None
    clock.advance(6)
    result = quota.release(decision.lease)
    assert result.state == "expired" and result.units == 2 and not result.was_live
    assert quota.snapshot("batch").used == 0


def test_retried_acquire_is_charged_once(make_quota: MakeClient) -> None:
    """A retry with the same request id returns the same lease instead of charging twice."""
    quota = make_quota(POLICY, clock=ManualClock())
    first = quota.try_acquire("a", 3, request_id="req-1")
    again = quota.try_acquire("a", 3, request_id="req-1")
    assert first.lease is not None and again.lease is not None
    assert again.lease.replay and not first.lease.replay
    assert again.lease.token == first.lease.token
    assert again.lease.expires_at == first.lease.expires_at
    assert quota.snapshot("batch").used == 3


def test_release_twice_is_harmless(make_quota: MakeClient) -> None:
    """The second release reports the lease unknown and frees nothing more."""
    quota = make_quota(POLICY, clock=ManualClock())
    d1 = quota.try_acquire("a", 3)
    d2 = quota.try_acquire("a", 2)
    assert d1.lease and d2.lease
    assert quota.release(d1.lease).was_live
    second = quota.release(d1.lease)
    assert second.state == "unknown" and second.units == 0
    assert quota.snapshot("batch").used == 2


def test_fencing_tokens_strictly_increase(make_quota: MakeClient) -> None:
    """Tokens grow with every grant of a group, across clients and policy updates."""
    quota = make_quota(POLICY, clock=ManualClock())
    other = make_quota()
    tokens = []
    for i in range(20):
        client = quota if i % 2 else other
        decision = client.try_acquire("a", 1, group="batch")
        assert decision.lease is not None
        tokens.append(decision.lease.token)
        client.release(decision.lease)
        if i == 10:
            quota.apply_policy(
                Policy([GroupPolicy("batch", capacity=11, tenants=POLICY.groups[0].tenants)])
            )
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_renew_extends_and_hints_over_limit(make_quota: MakeClient) -> None:
    """Renew moves the expiry; when a lender comes back the borrower's renewal says over_limit."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    with quota.acquire("a", 8, ttl=10) as lease:  # a borrows 3 of b's guarantee
        clock.advance(8)
        result = lease.renew(ttl=10)
        assert result.renewed and not result.over_limit
        assert lease.expires_at == pytest.approx(result.expires_at)
        clock.advance(8)  # would have expired without the renewal
        assert quota.snapshot("batch").used == 8
        assert quota.try_acquire("b", 2).admitted
    assert quota.snapshot("batch").used == 2


def test_renew_reports_lender_wants_capacity_back(make_quota: MakeClient) -> None:
    """A borrower above its fair limit is told so on renewal (a lender is waiting)."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    borrowed = quota.try_acquire("a", 8)
    assert borrowed.lease is not None
    # b asks for 4 within its guarantee and waits: group has only 2 free.
    with pytest.raises(AcquireTimeout) as info, quota.acquire("b", 4, timeout=0.05):
        pass
    assert info.value.decision.reason in ("group_full", "tenant_limit")
    assert info.value.waited >= 0.05
    # While b is registered as waiting, a is above its limit.
    req = quota.core.request("b", 4, timeout=5)
    quota._run(quota.core.attempt("b", 4, None, req.lease_id, req.ttl_ms, wait=True))
    result = quota.renew(borrowed.lease)
    assert result.renewed and result.over_limit
    assert result.limit < 8
    assert not quota.try_acquire("a", 1).admitted  # a borrows nothing more


def test_renew_of_a_lost_lease(make_quota: MakeClient) -> None:
    """Renewing an expired lease fails and marks the lease lost."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    with quota.acquire("a", 2, ttl=5) as lease:
        clock.advance(6)
        result = lease.renew()
        assert not result.renewed and lease.lost


def test_ttl_above_the_policys_maximum(make_quota: MakeClient) -> None:
    """A lease longer than the group's max_lease_ttl is refused, naming ttl."""
    quota = make_quota(POLICY, clock=ManualClock())
    with pytest.raises(InvalidRequest, match="ttl"):
        quota.try_acquire("a", 1, ttl=301)


def test_unknown_tenants(make_quota: MakeClient) -> None:
    """Unknown tenants are refused unless routed to a group that admits strangers."""
    quota = make_quota(Policy([GroupPolicy("g", 5, [TenantPolicy("a")])]), clock=ManualClock())
    with pytest.raises(UnknownTenant, match="stranger"):
        quota.try_acquire("stranger", 1)
    with pytest.raises(UnknownTenant):
        quota.try_acquire("stranger", 1, group="g")
    assert isinstance(UnknownTenant("x"), KeyError)


def test_no_policy_published(make_quota: MakeClient) -> None:
    """A group without a published policy raises PolicyMissing."""
    quota = make_quota(clock=ManualClock())
    with pytest.raises(PolicyMissing, match="nowhere"):
        quota.try_acquire("a", 1, group="nowhere")


def test_policy_versions_and_atomic_switch(make_quota: MakeClient) -> None:
    """Publishing bumps the version only when the content changes; other pods see it at once."""
    pod1 = make_quota(clock=ManualClock())
    pod2 = make_quota(clock=ManualClock())
    assert pod1.apply_policy(POLICY) == {"batch": 1, "open": 1}
    assert pod1.apply_policy(POLICY) == {"batch": 1, "open": 1}
    assert pod2.load_policy() == POLICY
    held = pod2.try_acquire("a", 8)
    assert held.admitted and held.policy_version == 1
    smaller = Policy(
        [GroupPolicy("batch", 9, [TenantPolicy("a", 4, borrow_limit=3), TenantPolicy("b", 5)])]
    )
    assert pod1.apply_policy(smaller) == {"batch": 2}
    decision = pod2.try_acquire("b", 2)
    assert decision.policy_version == 2 and decision.capacity == 9
    assert not decision.admitted  # 8 + 2 > 9 under the new capacity
    # "open" was dropped from the policy: its strangers are refused now.
    with pytest.raises((UnknownTenant, PolicyMissing)):
        pod2.try_acquire("s1", 1, group="open")


def test_policy_from_toml_path(make_quota: MakeClient, tmp_path: object) -> None:
    """apply_policy accepts a path to a TOML file."""
    from pathlib import Path

    path = Path(str(tmp_path)) / "p.toml"
    path.write_text('[[groups]]\nname = "g"\ncapacity = 3\n[[groups.tenants]]\nname = "t"\n')
    quota = make_quota(clock=ManualClock())
    assert quota.apply_policy(path) == {"g": 1}
    assert quota.try_acquire("t", 3).admitted


class ReleaseOnFirstSleep(ManualClock):
    """A ManualClock that runs ``action`` (once) when the client first sleeps between tries."""

    def __init__(self) -> None:
        super().__init__()
        self.action: Callable[[], object] | None = None

    def _take(self) -> Callable[[], object] | None:
        action, self.action = self.action, None
        return action

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        action = self._take()
        if action is not None:
            action()

    async def asleep(self, seconds: float) -> None:
        await super().asleep(seconds)
        action = self._take()
        if action is not None:
            # Off the loop: a bridged client's blocking call needs the loop to be free.
            await asyncio.to_thread(action)


def test_waiting_acquire_gets_in_when_units_free(make_quota: MakeClient) -> None:
    """acquire(timeout=...) waits, and is admitted as soon as another holder releases."""
    clock = ReleaseOnFirstSleep()
    quota = make_quota(POLICY, clock=clock)
    holder = quota.try_acquire("a", 8)
    assert holder.lease is not None
    clock.action = lambda: quota.release(holder.lease)
    with quota.acquire("a", 8, timeout=5) as lease:
        assert lease.units == 8
        assert clock.action is None  # admitted only after the release
        assert clock.monotonic() < 5
    assert quota.snapshot("batch").used == 0
    assert quota.snapshot("batch").tenants == {}


def test_timeout_zero_never_waits(make_quota: MakeClient) -> None:
    """timeout=0 tries once and raises AcquireTimeout, registering no pending demand."""
    quota = make_quota(POLICY, clock=ManualClock())
    assert quota.try_acquire("a", 8).admitted
    with pytest.raises(AcquireTimeout) as info, quota.acquire("a", 1, timeout=0):
        pass
    assert info.value.waited == 0
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, QuotaExceeded)
    assert quota.snapshot("batch").tenants["a"].pending == 0


def test_giving_up_withdraws_pending_demand(make_quota: MakeClient) -> None:
    """A waiting acquire that times out removes its pending registration at once."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    assert quota.try_acquire("a", 8).admitted
    with pytest.raises(AcquireTimeout), quota.acquire("b", 4, timeout=1):
        pass
    snap = quota.snapshot("batch", ["b"])
    assert snap.tenants["b"].pending == 0


def test_decorator_sync_and_async(make_quota: MakeClient) -> None:
    """@limit takes tenant and units from the handler's arguments, for def and async def
    handlers (on the async client through the bridge, which runs each on a thread)."""
    quota = make_quota(POLICY, clock=ManualClock())
    seen: list[int] = []

    class Request:
        def __init__(self, tenant: str, items: list[int]) -> None:
            self.tenant = tenant
            self.items = items

    @quota.limit(tenant=lambda req: req.tenant, units=lambda req: len(req.items))
    def handle(req: Request) -> int:
        seen.append(quota.snapshot("batch").used)
        return len(req.items)

    @quota.limit(tenant="tenant", units="units")
    async def ahandle(tenant: str, units: int = 2) -> str:
        seen.append(quota.snapshot("batch").used)
        return tenant

    assert handle(Request("a", [1, 2, 3])) == 3
    assert asyncio.run(ahandle("b", units=4)) == "b"
    assert asyncio.run(ahandle("b")) == "b"
    assert seen == [3, 4, 2]
    assert quota.snapshot("batch").used == 0
    with pytest.raises(RequestTooLarge):
        handle(Request("b", list(range(5))))


def test_no_key_is_left_without_expiry(make_quota: MakeClient) -> None:
    """After mixed traffic, every key but the policy and catalog has an expiry; an idle group
    keeps only its state sentinels (docs/design.md, "Recovery"), which expire by themselves
    within max_lease_ttl plus the grace."""
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock)
    leases = [quota.try_acquire(t, 1).lease for t in ("a", "b", "a", "x")]
    with pytest.raises(AcquireTimeout), quota.acquire("a", 8, timeout=0.5):
        pass
    assert expiring_keys_ok(quota) == []
    for lease in leases:
        if lease is not None:
            quota.release(lease)
    conn = raw_connection(quota)
    assert expiring_keys_ok(quota) == []
    longest = (max(g.max_lease_ttl for g in POLICY.groups) + 120) * 1000
    for key in conn.scan_iter(match="rq:*"):
        name = key.decode()
        if name.endswith((":policy", ":catalog")):
            continue
        if ":led:" in name:  # the usage ledger: kept its retention after its hour ends
            assert 0 < conn.pttl(key) <= 2 * HOUR_MS + DEFAULT_USAGE_RETENTION * 1000, name
            continue
        assert 0 < conn.pttl(key) <= longest, name
        assert not name.endswith(":queue"), name  # no waiting request is left
        wide = WIDE_MEMBER.encode()
        if name.endswith(":fair"):  # the breakpoints' zset: only its own sentinels are left
            assert conn.zrange(key, 0, -1) == [wide, b"~"], name
            continue
        if name.endswith(":exp"):
            assert conn.zrange(key, 0, -1) == [b"s:", wide], name
            continue
        assert conn.hkeys(key) == [b"s:"], name


def test_a_lost_policy_is_restored_from_the_catalog(make_quota: MakeClient) -> None:
    """A group's policy hash gone (its shard restarted empty) while the catalog still lists
    the group: the next call republishes it from the catalog. Redis lost the record of the
    group's leases with it, so the group recovers for one max_lease_ttl (new work refused),
    then serves."""
    clock = ManualClock()
    publisher = make_quota(POLICY, clock=clock)
    pod = make_quota(clock=clock)  # never read the policy itself
    conn = raw_connection(pod)
    conn.delete(pod.core.keyspace.group("batch").policy)
    decision = pod.try_acquire("a", 2, group="batch")
    assert decision.reason == "recovering"
    window = POLICY.group("batch").max_lease_ttl  # type: ignore[union-attr]
    assert decision.retry_after == pytest.approx(window)
    assert conn.exists(pod.core.keyspace.group("batch").policy)
    clock.advance(window)
    assert pod.try_acquire("a", 2, group="batch").admitted
    assert publisher.try_acquire("b", 1).admitted


def test_after_total_data_loss_a_pod_restores_what_it_knew(make_quota: MakeClient) -> None:
    """Redis lost everything (restart without persistence): a pod that knows the policy
    republishes the catalog (never over a newer one) and the group, then serves once the
    recovery window has passed."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock)
    conn = raw_connection(pod)
    conn.flushall()
    assert pod.try_acquire("a", 2).reason == "recovering"
    clock.advance(POLICY.group("batch").max_lease_ttl)  # type: ignore[union-attr]
    assert pod.try_acquire("a", 2).admitted
    assert pod.load_policy() == POLICY
    stranger = make_quota(clock=ManualClock())  # knows no policy: cannot restore anything
    conn.flushall()
    with pytest.raises(PolicyMissing):
        stranger.try_acquire("a", 1, group="batch")


def test_a_dropped_group_is_not_resurrected(make_quota: MakeClient) -> None:
    """A group removed from the published policy stays removed, even for a pod whose cached
    policy still has it."""
    old_pod = make_quota(POLICY, clock=ManualClock())
    admin = make_quota(clock=ManualClock())
    admin.apply_policy(Policy([POLICY.groups[0]]))  # "open" dropped
    with pytest.raises(PolicyMissing):
        old_pod.try_acquire("s1", 1, group="open")
    conn = raw_connection(admin)
    assert not conn.exists(admin.core.keyspace.group("open").policy)
