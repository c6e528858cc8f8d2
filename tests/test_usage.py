"""``quota.usage(group, since=..., until=...)`` on both clients, fakeredis and real Redis.

Time is a ``ManualClock`` pinning the Redis time the scripts see: a lease held
for exactly 10 s of that time is 10 unit·seconds per unit in the hour its
release falls in; expiry is learned by the next call that purges.
"""

from __future__ import annotations

import datetime as dt

import pytest

from ratequota import (
    GroupPolicy,
    InvalidRequest,
    InvalidType,
    MeterPolicy,
    Observer,
    Policy,
    TenantMeter,
    TenantPolicy,
    UsageRow,
)
from ratequota.clients.usage import HOURS_PER_TRIP
from ratequota.engine.ledger import HOUR_MS
from ratequota.testing import ManualClock
from tests.conftest import MakeClient

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=8,
            tenants=(
                TenantPolicy("a", guarantee=4, borrow_limit=0),
                TenantPolicy("b", guarantee=4),
            ),
            max_lease_ttl=600.0,
        ),
        GroupPolicy(
            "s",
            capacity=2,
            tenants=(TenantPolicy("c", guarantee=2, borrow_limit=0, shadow=True),),
        ),
    ]
)
# Ten seconds before an hour boundary.
START = 500_000 * HOUR_MS - 10_000


def test_usage_reports_unit_seconds_leases_and_refusals_per_hour(make_quota: MakeClient) -> None:
    """A lease of 3 units released after 10 s is 30 unit·s; a refusal is counted by reason;
    the next hour's lease (expired, purged by a later call) is filed in that hour."""
    clock = ManualClock(START)
    quota = make_quota(POLICY, clock=clock)
    lease = quota.try_acquire("a", 3, ttl=60).lease
    assert lease is not None
    assert not quota.try_acquire("a", 2).admitted  # tenant_limit
    clock.advance(8)
    quota.release(lease)
    clock.advance(4)  # the next hour
    assert quota.try_acquire("b", 1, ttl=5).admitted
    clock.advance(6)
    assert not quota.try_acquire("a", 9).admitted  # too_large; purges b's expired lease

    rows = quota.usage("g", since=dt.timedelta(hours=2))
    hour = START // HOUR_MS
    assert rows == [
        UsageRow("g", "a", hour, unit_seconds=24.0, leases=1, refusals={"tenant_limit": 1}),
        UsageRow("g", "a", hour + 1, refusals={"too_large": 1}),
        UsageRow("g", "b", hour + 1, unit_seconds=5.0, leases=1),
    ]
    assert rows[0].start == hour * 3600.0
    assert rows[0].refused == 1
    # A window holding only the first hour; epoch seconds and datetimes alike.
    first = quota.usage("g", since=START / 1000, until=(hour + 1) * 3600.0)
    assert [r.hour for r in first] == [hour]
    since = dt.datetime.fromtimestamp(START / 1000, tz=dt.timezone.utc)
    assert quota.usage("g", since=since) == rows
    assert quota.usage("g", since=since.replace(tzinfo=None)) == rows  # naive: UTC


def test_usage_counts_shadow_admissions_apart(make_quota: MakeClient) -> None:
    """In shadow mode a would-be refusal is admitted: counted as a shadow refusal, and its
    lease is counted like any other when it ends."""
    clock = ManualClock(START)
    quota = make_quota(POLICY, clock=clock)
    leases = [quota.try_acquire("c", 2, ttl=60).lease for _ in range(2)]
    clock.advance(1)
    for lease in leases:
        assert lease is not None
        quota.release(lease)
    (row,) = quota.usage("s")
    assert row.shadow_refusals == {"tenant_limit": 1}
    assert row.refusals == {}
    assert (row.leases, row.unit_seconds) == (2, 4.0)


TOKENS = Policy(
    [
        GroupPolicy(
            "m",
            capacity=8,
            tenants=(TenantPolicy("t", meters=(TenantMeter("tokens", rate=1_000, burst=1_000),)),),
            meters=(MeterPolicy("tokens", rate=1_000, burst=1_000, per="minute"),),
        )
    ]
)


def test_usage_counts_tokens_reserved_at_admission_and_settled_once(
    make_quota: MakeClient,
) -> None:
    """``tokens_reserved`` is the estimate an admitted lease charged; ``tokens_settled`` the
    actual amount of its first settlement (a replay, a conflicting amount, a refused request
    and a settlement after the lease ended count nothing)."""
    clock = ManualClock(START)
    quota = make_quota(TOKENS, clock=clock)
    first = quota.try_acquire("t", 1, ttl=60, tokens=400).lease
    second = quota.try_acquire("t", 1, ttl=60, tokens=300).lease
    assert first is not None and second is not None
    refused = quota.try_acquire("t", 1, ttl=60, tokens=900)
    assert not refused.admitted and refused.reason == "meter"
    assert [s.outcome for s in quota.settle(first, tokens=250)] == ["settled"]
    assert [s.outcome for s in quota.settle(first, tokens=250)] == ["replay"]
    assert [s.outcome for s in quota.settle(first, tokens=999)] == ["conflict"]
    quota.release(second)
    assert [s.outcome for s in quota.settle(second, tokens=10)] == ["closed"]

    (row,) = quota.usage("m", since=dt.timedelta(hours=1))
    assert (row.tokens_reserved, row.tokens_settled) == (700, 250)
    assert row.leases == 1  # the second lease ended; the first still runs
    assert row.refusals == {"meter": 1}


def test_usage_rejects_bad_windows(make_quota: MakeClient) -> None:
    """A window that ends before it starts, a bad type or a span above a year: errors naming
    the field, before anything is read."""
    quota = make_quota(POLICY, clock=ManualClock(START))
    with pytest.raises(InvalidRequest, match="since"):
        quota.usage("g", since=START / 1000, until=START / 1000 - 1)
    with pytest.raises(InvalidType, match="until"):
        quota.usage("g", until="yesterday")
    with pytest.raises(InvalidRequest, match="since"):
        quota.usage("g", since=dt.timedelta(days=400))
    with pytest.raises(InvalidType, match="group"):
        quota.usage(3)
    assert quota.usage("nowhere") == []


def test_usage_retention_is_a_validated_group_setting(tmp_path: object) -> None:
    """usage_retention: seconds in [0, 366 days], 7 days by default (then absent from the
    policy's JSON, so existing digests do not change); read from TOML; a bad value names the
    field."""
    from pathlib import Path

    from ratequota import ConfigError

    group = GroupPolicy("g", capacity=1)
    assert group.usage_retention == 7 * 24 * 3600.0
    assert "usage_retention" not in group.to_dict()
    assert GroupPolicy("g", 1, usage_retention=60.0).to_dict()["usage_retention"] == 60.0
    for bad in (-1.0, 367 * 24 * 3600.0, float("nan"), True, "1d"):
        with pytest.raises(ConfigError, match="usage_retention"):
            GroupPolicy("g", capacity=1, usage_retention=bad)  # type: ignore[arg-type]
    path = Path(str(tmp_path)) / "p.toml"
    path.write_text('[[groups]]\nname = "g"\ncapacity = 2\nusage_retention = 86400\n')
    loaded = Policy.from_toml(path).group("g")
    assert loaded is not None and loaded.usage_retention == 86400


class _Trips(Observer):
    """Counts the client's Redis round trips by call name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def redis_call(self, shard: str, call: str, seconds: float, ok: bool) -> None:
        self.calls.append(call)


def test_usage_reads_a_week_of_hours_in_one_round_trip(make_quota: MakeClient) -> None:
    """Nine days hold 217 hours: two round trips of pipelined reads (``HOURS_PER_TRIP``), not
    one per hour, and the rows of both are there."""
    clock = ManualClock(START)
    trips = _Trips()
    quota = make_quota(POLICY, clock=clock, observer=trips)
    first = quota.try_acquire("a", 1, ttl=60).lease
    assert first is not None
    clock.advance(5)
    quota.release(first)
    clock.advance(200 * 3600 - 60)  # 200 hours on, past the first round trip's hours
    later = quota.try_acquire("b", 2, ttl=60).lease
    assert later is not None
    clock.advance(5)
    quota.release(later)
    trips.calls.clear()
    rows = quota.usage("g", since=dt.timedelta(days=9))
    hour = START // HOUR_MS
    assert [(r.tenant, r.hour, r.unit_seconds) for r in rows] == [
        ("a", hour, 5.0),
        ("b", hour + 200, 10.0),
    ]
    # (The catalog's own checks may interleave: only the ledger's reads are counted.)
    assert [call for call in trips.calls if call == "hgetall"] == ["hgetall", "hgetall"]
    assert HOURS_PER_TRIP == 168
