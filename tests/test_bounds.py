"""Bounded numbers (issue 9 item 5): units and capacity up to 2**50, exact end to end.

Capacity 10**15 and a request of 10**14 units used to write ``1e+14:...`` into the lease
info, which release and purge could not parse: once that lease expired every call on the
group failed with a Lua error. 2**61 units failed half way through a script. Now every
number is checked against ``MAX_UNITS`` before Redis is touched, and the scripts format
integers exactly. Sync and async clients, fakeredis and a real redis-server.
"""

from __future__ import annotations

import pytest

from ratequota.engine.keys import KeySpace
from ratequota.errors import AcquireTimeout, ConfigError, InvalidRequest
from ratequota.policy import MAX_UNITS, GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.bridge import hold
from tests.conftest import MakeClient

BIG = Policy(
    [
        GroupPolicy(
            "big",
            capacity=10**15,
            tenants=[TenantPolicy("a", guarantee=4 * 10**14), TenantPolicy("b")],
            max_lease_ttl=60.0,
        ),
        GroupPolicy("max", capacity=MAX_UNITS, tenants=[TenantPolicy("m", guarantee=MAX_UNITS)]),
    ]
)


def test_the_bound_is_exact_in_doubles() -> None:
    """2**50 leaves room for the sums the scripts form (held + asked + reserve, a few waiting
    requests) below 2**53, where doubles stop holding every integer."""
    assert MAX_UNITS == 2**50
    assert float(8 * MAX_UNITS) == 8 * MAX_UNITS and 8 * MAX_UNITS <= 2**53


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("capacity", lambda: GroupPolicy("g", capacity=MAX_UNITS + 1)),
        ("guarantee", lambda: TenantPolicy("t", guarantee=2**61)),
        ("borrow_limit", lambda: TenantPolicy("t", borrow_limit=MAX_UNITS + 1)),
        ("max_units", lambda: TenantPolicy("t", max_units=2**53)),
    ],
)
def test_policy_numbers_above_the_bound_are_refused(field: str, make: object) -> None:
    """A policy naming more than 2**50 units fails at construction, naming the field."""
    assert callable(make)
    with pytest.raises(ConfigError, match=field) as caught:
        make()
    assert "2**50" in str(caught.value)


def test_requests_above_the_bound_never_touch_redis(make_quota: MakeClient) -> None:
    """2**61 units (and 2**50 + 1) raise ``InvalidRequest`` naming ``units`` before any
    script runs: nothing is written, nothing is left half done."""
    pod = make_quota(BIG, clock=ManualClock(), auto_renew=False)
    conn = make_quota.conn()
    before = sorted(conn.keys("*"))
    for units in (2**61, MAX_UNITS + 1):
        with pytest.raises(InvalidRequest, match="units"):
            pod.try_acquire("m", units)
        with pytest.raises(InvalidRequest, match="units"):
            hold(pod, "m", units)
    assert sorted(conn.keys("*")) == before
    conn.close()


def test_big_leases_are_exact_through_expiry_and_purge(make_quota: MakeClient) -> None:
    """The issue's repro on both clients: 10**14 units on a capacity of 10**15 are charged,
    stored and credited back exactly, also when the lease expires and is purged by a later
    call, which used to wedge the group."""
    clock = ManualClock()
    pod = make_quota(BIG, clock=clock, auto_renew=False)
    first = pod.try_acquire("a", 10**14, ttl=1.0)
    assert first.admitted and first.used == 10**14
    info = make_quota.conn().hget(KeySpace().group("big").info, "L" + first.lease.id)
    assert info.startswith(b"100000000000000:")  # never "1e+14:..."
    clock.advance(2)  # expired: the next call purges it
    second = pod.try_acquire("b", 6 * 10**14 - 1, ttl=10.0)
    assert second.admitted and second.group_used == 6 * 10**14 - 1
    snap = pod.snapshot("big", ["a", "b"])
    assert (snap.used, snap.tenants["b"].used) == (6 * 10**14 - 1, 6 * 10**14 - 1)
    held = pod.try_acquire("a", 4 * 10**14 + 1, ttl=10.0)
    assert (held.admitted, held.reason, held.capacity) == (True, "admitted", 10**15)
    assert pod.snapshot("big").used == 10**15
    result = pod.release(second.lease)
    assert (result.state, result.units) == ("released", 6 * 10**14 - 1)
    assert pod.release(held.lease).units == 4 * 10**14 + 1
    assert pod.snapshot("big").used == 0


def test_the_largest_request_waits_and_renews_exactly(make_quota: MakeClient) -> None:
    """2**50 units, the bound itself: a waiting request registers and withdraws its pending
    demand exactly, and the granted lease renews and releases exactly."""
    clock = ManualClock()
    pod = make_quota(BIG, clock=clock, auto_renew=False)
    lease = hold(pod, "m", MAX_UNITS, ttl=10.0)
    with pytest.raises(AcquireTimeout):
        hold(pod, "m", MAX_UNITS, timeout=0.5)
    snap = pod.snapshot("max", ["m"])
    assert (snap.used, snap.tenants["m"].pending) == (MAX_UNITS, 0)
    renewed = lease.renew(10.0)
    assert renewed.renewed and renewed.used == MAX_UNITS and renewed.limit == MAX_UNITS
    assert lease.release().units == MAX_UNITS
