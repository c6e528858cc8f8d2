"""Owned, fenced leases (issue 9 items 2, 3 and 4): request ids are the tenant's, release and
renew name the lease's tenant and fencing token, and renewals survive a lowered max_lease_ttl.

Every test runs on the sync and the async client, on fakeredis and on a real redis-server
(``tests.bridge``), with time driven by a ``ManualClock`` pinning the Redis time the scripts see.
"""

from __future__ import annotations

import attrs
import pytest

from ratequota.clients.renewal import RenewalBook
from ratequota.clients.shell import LeaseBase
from ratequota.decision import LeaseInfo, RenewResult
from ratequota.errors import BackendUnavailable, InvalidRequest, RequestIdConflict
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.bridge import hold
from tests.conftest import MakeClient

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=10,
            tenants=[TenantPolicy("a", guarantee=5), TenantPolicy("b", guarantee=5)],
            max_lease_ttl=60.0,
        )
    ]
)


def test_another_tenant_reusing_a_request_id_is_refused(make_quota: MakeClient) -> None:
    """The issue's repro: B reusing A's request id was admitted as a replay of A's lease and then
    got 5 more units (15 running on a capacity of 10). Now B's reuse is refused as
    ``id_mismatch`` (never admitted, never charged), B cannot end A's lease, and the group
    never holds more than its capacity."""
    pod = make_quota(POLICY, clock=ManualClock(), auto_renew=False)
    first = pod.try_acquire("a", 5, request_id="job-1")
    assert first.admitted and first.lease is not None
    stolen = pod.try_acquire("b", 5, request_id="job-1")
    assert (stolen.admitted, stolen.reason, stolen.lease) == (False, "id_mismatch", None)
    assert "another tenant" in stolen.describe()
    snap = pod.snapshot("g", ["b"])
    assert (snap.used, snap.tenants["b"].used) == (5, 0)
    # B naming A's id (with any token it can guess) frees nothing.
    for token in (0, first.lease.token):
        guess = LeaseInfo("job-1", "b", "g", 5, token, first.lease.expires_at)
        assert pod.release(guess).state == "fenced"
    assert pod.snapshot("g").used == 5
    other = pod.try_acquire("b", 5)
    assert other.admitted
    assert pod.snapshot("g").used == 10
    assert not pod.try_acquire("b", 1).admitted


def test_a_retry_with_other_units_is_refused_and_not_charged(make_quota: MakeClient) -> None:
    """A retry of one id with more units (1, then 5) was granted 5 and charged 1; now it is
    refused and the original lease stays as it was. The exact retry is still a replay."""
    pod = make_quota(POLICY, clock=ManualClock(), auto_renew=False)
    first = pod.try_acquire("a", 1, request_id="job-2")
    assert first.lease is not None
    bigger = pod.try_acquire("a", 5, request_id="job-2")
    assert (bigger.admitted, bigger.reason) == (False, "id_mismatch")
    assert pod.snapshot("g").used == 1
    again = pod.try_acquire("a", 1, request_id="job-2")
    assert again.admitted and again.lease is not None and again.lease.replay
    assert again.lease.token == first.lease.token
    assert pod.snapshot("g").used == 1


def test_waiting_acquire_with_a_conflicting_id_raises_at_once(make_quota: MakeClient) -> None:
    """``acquire`` does not wait on a request id that can never be answered: it raises
    ``RequestIdConflict`` (a ``ValueError``) without charging anything."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    assert pod.try_acquire("a", 2, request_id="job-3").admitted
    with pytest.raises(RequestIdConflict) as caught:
        hold(pod, "b", 2, request_id="job-3", timeout=5.0)
    assert isinstance(caught.value, ValueError)
    assert caught.value.decision.reason == "id_mismatch"
    assert clock.monotonic() == 0.0  # refused at once, no waiting
    assert pod.snapshot("g").used == 2


def test_release_and_renew_name_tenant_and_token(make_quota: MakeClient) -> None:
    """Release and renew of a lease id with another tenant or another token are refused as
    ``fenced``, change nothing, and are counted in ``stats()``; the holder's own lease object
    still renews and releases (the public API is unchanged)."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    lease = hold(pod, "a", 3)
    forged = [
        attrs.evolve(lease.info, tenant="b"),
        attrs.evolve(lease.info, token=lease.token + 1),
        attrs.evolve(lease.info, token=lease.token - 1),
    ]
    for info in forged:
        renewal = pod.renew(info, 30.0)
        assert (renewal.renewed, renewal.reason) == (False, "fenced")
        assert pod.release(info).state == "fenced"
    # A renewal carries the units too (a recovering group re-inserts the lease from them).
    other_units = attrs.evolve(lease.info, units=lease.units + 1)
    assert pod.renew(other_units, 30.0).reason == "fenced"
    refused = 2 * len(forged) + 1
    assert pod.stats().fenced_refusals == refused
    snap = pod.snapshot("g")
    assert snap.used == 3
    (listed,) = snap.leases
    assert listed.expires_at == lease.expires_at  # the forged renewals extended nothing
    clock.advance(10)
    renewed = lease.renew(30.0)
    assert renewed.reason == "renewed" and not lease.lost
    assert lease.expires_at == pytest.approx(clock.redis_ms() / 1000 + 30)
    assert lease.release().state == "released"
    assert pod.snapshot("g").used == 0
    assert pod.stats().fenced_refusals == refused


def test_an_overrun_holder_cannot_end_the_next_lease_of_its_id(make_quota: MakeClient) -> None:
    """A holder overran its TTL and a retry of the same request id was granted a new lease
    (a new token). The old holder's release is fenced: it frees nothing and its lease object
    is marked ``lost``; the new lease is untouched."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    old = hold(pod, "a", 2, request_id="job-4", ttl=1.0)
    clock.advance(2)
    new = pod.try_acquire("a", 2, request_id="job-4")
    assert new.admitted and new.lease is not None and not new.lease.replay
    assert new.lease.token > old.token
    result = old.release()
    assert result.state == "fenced" and old.lost
    renewal = pod.renew(old.info, 10.0)
    assert renewal.reason == "fenced"
    assert pod.snapshot("g").used == 2
    assert pod.release(new.lease).state == "released"


def test_withdrawing_a_waiting_request_is_the_tenants(make_quota: MakeClient) -> None:
    """A waiting request registered by ``a`` cannot be withdrawn by ``b`` naming its id."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    core = pod.core
    assert pod.try_acquire("b", 5).admitted
    assert pod.try_acquire("a", 5).admitted
    waiting = pod._run(core.attempt("a", 2, "g", "w-1", 10_000, wait=True))
    assert waiting.reason in ("tenant_limit", "group_full")
    assert pod.snapshot("g").tenants["a"].pending == 2
    by_b = LeaseInfo("w-1", "b", "g", 2, 0, 0.0)
    assert pod.release(by_b).state == "fenced"
    assert pod.snapshot("g").tenants["a"].pending == 2
    by_a = LeaseInfo("w-1", "a", "g", 2, 0, 0.0)
    assert pod.release(by_a).state == "unknown"  # withdrawn
    assert pod.snapshot("g").tenants["a"].pending == 0


def test_renewal_is_clamped_to_a_lowered_max_lease_ttl(make_quota: MakeClient) -> None:
    """``max_lease_ttl`` lowered under a held lease: renewals asking for more used to fail with
    ``bad_ttl`` (retried as transient until the lease silently expired and another tenant was
    admitted). Now they are granted the new maximum, the holder learns the real expiry, and
    renewing at a third of what was granted keeps the lease and the units."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, auto_renew=False)
    lease = hold(pod, "a", 5, ttl=60.0)
    lower = Policy([attrs.evolve(POLICY.groups[0], max_lease_ttl=3.0)])
    pod.apply_policy(lower)
    for _ in range(30):  # 30 s: ten times the new maximum
        result = lease.renew()
        assert (result.renewed, result.ttl) == (True, 3.0)
        assert lease.expires_at == pytest.approx(clock.redis_ms() / 1000 + 3.0)
        clock.advance(1.0)
        assert not pod.try_acquire("b", 10, ttl=1.0).admitted  # a holds 5
        assert not lease.lost
    assert pod.snapshot("g").used == 5


def test_the_renewer_schedules_by_the_granted_ttl() -> None:
    """The background renewer's book: after a clamped renewal the next one is due within the
    granted lifetime (a third of it), not a third of the asked one, so the lease never lapses
    between renewals."""
    now = [0.0]
    book = RenewalBook(1 / 3, 60.0, lambda: now[0])
    lease = LeaseBase(LeaseInfo("x", "a", "g", 1, 1, 0.0), 60.0)
    book.hold(lease)
    now[0] = 20.0
    due, _ = book.next()
    assert due == [lease]
    result = _renewal(ttl=3.0)
    book.settle(lease, result)
    now[0] = 20.0 + 0.999
    assert book.next()[0] == []
    now[0] = 21.0
    assert book.next()[0] == [lease]


def test_a_fenced_renewal_marks_the_lease_lost() -> None:
    """The renewer stops renewing a lease whose id now names another lease (fenced)."""
    book = RenewalBook(1 / 3, 60.0, lambda: 100.0)
    lease = LeaseBase(LeaseInfo("x", "a", "g", 1, 1, 0.0), 60.0)
    book.hold(lease)
    book.settle(lease, _renewal(renewed=False, reason="fenced"))
    assert lease.lost and len(book) == 0


def _renewal(*, ttl: float = 60.0, renewed: bool = True, reason: str = "renewed") -> RenewResult:
    """A renewal outcome as the renewer receives it."""
    return RenewResult(
        renewed=renewed,
        expires_at=1.0,
        over_limit=False,
        used=1,
        limit=1.0,
        group_used=1,
        capacity=1,
        reason=reason,  # type: ignore[arg-type]
        ttl=ttl,
    )


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("lease.token", {"token": -1}),
        ("lease.tenant", {"tenant": ""}),
        ("units", {"units": 0}),
    ],
)
def test_a_malformed_lease_is_refused_before_redis(
    make_quota: MakeClient, field: str, change: dict[str, object]
) -> None:
    """Release and renew store nothing they did not validate: a lease with a negative token,
    no tenant or no units raises ``InvalidRequest`` naming the field, for both clients."""
    pod = make_quota(POLICY, clock=ManualClock(), auto_renew=False)
    decision = pod.try_acquire("a", 1)
    bad = attrs.evolve(decision.lease, **change)
    with pytest.raises(InvalidRequest, match=field):
        pod.release(bad)
    with pytest.raises(InvalidRequest, match=field):
        pod.renew(bad)
    assert pod.snapshot("g").used == 1


def test_a_lease_whose_renewals_all_fail_is_lost_when_its_lifetime_ends() -> None:
    """Redis unreachable for longer than the lease lives: the renewer retries, and once the
    last granted lifetime (counted from the renewal's send) has run out it marks the lease
    ``lost`` instead of letting the holder believe it still holds it."""
    now = [0.0]
    book = RenewalBook(1 / 3, 60.0, lambda: now[0])
    lease = LeaseBase(LeaseInfo("x", "a", "g", 1, 1, 0.0), 6.0)
    book.hold(lease)
    now[0] = 2.0
    assert book.next()[0] == [lease]
    book.settle(lease, _renewal(ttl=6.0))  # sent at 2.0: certainly ends by 8.0
    for at in (4.0, 4.5, 5.0, 6.0, 7.0, 7.9):
        now[0] = at
        due, _ = book.next()
        if due:
            book.settle(lease, BackendUnavailable("down"))
            assert not lease.lost, at
    now[0] = 8.0
    assert book.next()[0] == [lease]
    book.settle(lease, BackendUnavailable("down"))
    assert lease.lost and len(book) == 0
