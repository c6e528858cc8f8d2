"""Meters in the policy: validation naming the field, TOML with lines, the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given

from ratequota import (
    ConfigError,
    GroupPolicy,
    InvalidRequest,
    InvalidType,
    Policy,
    PolicyFileError,
    QuotaExceeded,
    RequestTooLarge,
    TenantPolicy,
)
from ratequota.decision import Decision
from ratequota.policy import MAX_METER, MAX_METERS, MeterPolicy, TenantMeter
from ratequota.rates import TICKS_PER_TOKEN, meter_limits, share_limits
from ratequota.testing import ManualClock
from tests.conftest import MakeClient
from tests.servers import RedisServer
from tests.strategies import group_policies, meter_groups

TOKENS = MeterPolicy("tokens", rate=1_000, burst=2_000, per="minute")


def group(*shares: TenantMeter, meter: MeterPolicy = TOKENS) -> GroupPolicy:
    """A group with ``meter`` and one tenant per share (``t0``, ``t1``, ...)."""
    tenants = tuple(TenantPolicy(f"t{i}", meters=(s,)) for i, s in enumerate(shares))
    return GroupPolicy("g", capacity=4, tenants=tenants, meters=(meter,))


def test_defaults_come_from_the_group_meter() -> None:
    """ceil defaults to the group's rate, bursts to the group's burst scaled by rate and ceil."""
    share = TenantMeter("tokens", rate=250).resolved(TOKENS)
    assert (share.ceil, share.burst, share.cburst, share.weight) == (1_000, 500, 2_000, 1.0)
    capped = TenantMeter("tokens", rate=250, ceil=500).resolved(TOKENS)
    assert (capped.burst, capped.cburst) == (500, 1_000)
    assert TOKENS.debt_limit == 2_000
    assert MeterPolicy("tokens", rate=1, burst=3, debt=0).debt_limit == 0


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: MeterPolicy("tokens", rate=0, burst=1), "rate"),
        (lambda: MeterPolicy("tokens", rate=1, burst=0), "burst"),
        (lambda: MeterPolicy("tokens", rate=MAX_METER + 1, burst=1), "rate"),
        (lambda: MeterPolicy("tokens", rate=1.5, burst=1), "rate"),
        (lambda: MeterPolicy("tokens", rate=1, burst=1, per="hour"), "per"),
        (lambda: MeterPolicy("tokens", rate=1, burst=1, debt=-1), "debt"),
        (lambda: MeterPolicy("Tokens!", rate=1, burst=1), "meter.name"),
        (lambda: TenantMeter("tokens", rate=-1), "rate"),
        (lambda: TenantMeter("tokens", rate=5, ceil=4), "ceil"),
        (lambda: TenantMeter("tokens", weight=0), "weight"),
        (lambda: TenantMeter("tokens", weight=1e7), "weight"),
        (lambda: TenantMeter("tokens", weight=True), "weight"),
        (lambda: TenantMeter("tokens", burst=-1), "burst"),
        (lambda: TenantMeter("tokens", cburst=2**40), "cburst"),
    ],
)
def test_bad_meter_fields_name_the_field(build: object, field: str) -> None:
    """Each invalid meter parameter fails at construction with a message naming it."""
    with pytest.raises(ConfigError) as info:
        build()  # type: ignore[operator]
    assert field in info.value.field
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("shares", "field", "words"),
    [
        ((TenantMeter("tokens", rate=600), TenantMeter("tokens", rate=500)), "rate", "1100"),
        ((TenantMeter("tokens", rate=10, ceil=1_001),), "ceil", "1000"),
        ((TenantMeter("tokens", rate=1_001),), "rate", "1000"),
        ((TenantMeter("tokens", rate=10, burst=2_001),), "burst", "2000"),
        ((TenantMeter("tokens", rate=10, burst=5, cburst=4),), "cburst", "burst 5"),
        ((TenantMeter("tokens", rate=10, burst=5, cburst=2_001),), "cburst", "2000"),
        ((TenantMeter("tokens", rate=0, burst=5),), "burst", "rate is 0"),
        ((TenantMeter("tokens", rate=0, ceil=0, cburst=5),), "cburst", "ceil is 0"),
        (
            (
                TenantMeter("tokens", rate=100, burst=1_500),
                TenantMeter("tokens", rate=100, burst=1_000),
            ),
            "burst",
            "2500",
        ),
    ],
)
def test_htb_constraints_are_checked(
    shares: tuple[TenantMeter, ...], field: str, words: str
) -> None:
    """Σ rates <= group rate, rate <= ceil <= group rate, bursts within the group's burst."""
    with pytest.raises(ConfigError) as info:
        group(*shares)
    assert field in info.value.field
    assert words in str(info.value)


def test_meters_must_be_declared_by_the_group_and_listed_once() -> None:
    """A tenant's share of an undeclared meter, or a meter listed twice, is refused."""
    with pytest.raises(ConfigError, match="declares no meter 'requests'"):
        group(TenantMeter("requests", rate=1))
    with pytest.raises(ConfigError, match="twice"):
        GroupPolicy("g", 1, meters=(TOKENS, TOKENS))
    with pytest.raises(ConfigError, match="twice"):
        TenantPolicy("a", meters=(TenantMeter("tokens"), TenantMeter("tokens")))
    with pytest.raises(ConfigError, match="rate must be 0 for unknown tenants"):
        GroupPolicy(
            "g",
            1,
            unknown_tenants="default",
            default_tenant=TenantPolicy("*", meters=(TenantMeter("tokens", rate=1),)),
            meters=(TOKENS,),
        )
    with pytest.raises(ConfigError, match="meters"):
        GroupPolicy("g", 1, meters="tokens")  # type: ignore[arg-type]
    many = tuple(MeterPolicy(f"m{i}", rate=1, burst=1) for i in range(MAX_METERS + 1))
    with pytest.raises(ConfigError, match=f"at most {MAX_METERS} meters"):
        GroupPolicy("g", 1, meters=many)
    assert GroupPolicy("g", 1, meters=many[:MAX_METERS]).meters == many[:MAX_METERS]


@given(meter_groups())
def test_meters_round_trip_through_the_catalog_json(policy: GroupPolicy) -> None:
    """to_dict -> JSON -> from_dict gives the same policy, meters and all."""
    data = json.loads(json.dumps(Policy([policy]).to_dict()))
    assert Policy.from_dict(data) == Policy([policy])


@given(group_policies(max_tenants=8))
def test_policies_without_meters_are_unchanged(policy: GroupPolicy) -> None:
    """A policy that declares no meter serialises exactly as before: no 'meters' key anywhere."""
    text = json.dumps(Policy([policy]).to_dict())
    assert "meters" not in text
    assert policy.meters == () and all(t.meters == () for t in policy.tenants)


def test_limits_in_ticks() -> None:
    """Rates per second refill 60 ticks per ms per token, rates per minute 1."""
    g = group(TenantMeter("tokens", rate=250, ceil=500, weight=2.0))
    limits = meter_limits(g, "tokens")
    assert limits.rate == 1_000 and limits.cap == 2_000 * TICKS_PER_TOKEN
    assert limits.reserve == 500 * TICKS_PER_TOKEN and limits.floor == -2_000 * TICKS_PER_TOKEN
    assert limits.quantum == 1_500.0
    share = share_limits(g, g.tenants[0], "tokens")
    assert (share.rate, share.ceil, share.weight) == (250, 500, 2.0)
    per_second = group(meter=MeterPolicy("tokens", rate=3, burst=3))
    assert meter_limits(per_second, "tokens").rate == 180
    stranger = share_limits(per_second, TenantPolicy("x"), "tokens")
    assert (stranger.rate, stranger.ceil, stranger.cap) == (0, 180, 0)
    with pytest.raises(KeyError):
        meter_limits(per_second, "requests")


POLICY_TOML = """\
[[groups]]
name = "batch"
capacity = 8

[groups.meters.tokens]
rate = 90000
per = "minute"
burst = 20000

[groups.meters.requests]
rate = 10
burst = 20

[[groups.tenants]]
name = "a"
guarantee = 4

[groups.tenants.meters.tokens]
rate = 30000
ceil = 60000
weight = 2

[[groups.tenants]]
name = "b"
"""


def test_toml_meters_load_and_round_trip(tmp_path: Path) -> None:
    """Meters are tables keyed by name under the group and under each tenant."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    policy = Policy.from_toml(path)
    batch = policy.groups[0]
    assert batch.meter("tokens") == MeterPolicy("tokens", rate=90_000, burst=20_000, per="minute")
    assert batch.meter("requests") == MeterPolicy("requests", rate=10, burst=20)
    assert batch.tenants[0].meter("tokens") == TenantMeter(
        "tokens", rate=30_000, ceil=60_000, weight=2
    )
    assert batch.tenants[1].meters == ()
    assert Policy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        ("ceil = 60000", "ceil = 100000", 20, "ceil"),
        ("weight = 2", "weight = -2", 21, "weight"),
        ('per = "minute"', 'per = "hour"', 7, "per"),
        ("rate = 10\n", "rate = 10\nspeed = 3\n", 12, "speed"),
        ("rate = 30000", "rate = -1", 19, "rate"),
        ("weight = 2", "weight = 2\nburst = 30000", 22, "burst"),
    ],
)
def test_toml_errors_name_file_line_and_field(
    tmp_path: Path, old: str, new: str, line: int, field: str
) -> None:
    """A bad meter value in a file is reported at its line, with the field."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML.replace(old, new, 1))
    with pytest.raises(PolicyFileError) as info:
        Policy.from_toml(path)
    message = str(info.value)
    assert f"policy.toml:{line}" in message, message
    assert field in message


def metered_policy() -> Policy:
    """Tenant ``a`` guaranteed 100 tokens/s (ceil 200), ``b`` a pure borrower; 5 requests/s."""
    tokens = MeterPolicy("tokens", rate=300, burst=300)
    requests = MeterPolicy("requests", rate=5, burst=5)
    a = TenantPolicy("a", meters=(TenantMeter("tokens", rate=100, ceil=200, burst=100),))
    b = TenantPolicy("b")
    return Policy([GroupPolicy("g", capacity=8, tenants=(a, b), meters=(tokens, requests))])


def test_a_policy_with_meters_is_published_and_enforced(make_quota: MakeClient) -> None:
    """Publishing a metered policy works, and acquire decides every named meter with the lease:
    all or nothing, the refusal naming the meter, its retry from the bucket (both clients,
    fakeredis and real Redis, time pinned by a ManualClock)."""
    clock = ManualClock()
    quota = make_quota(metered_policy(), clock=clock)
    first = quota.try_acquire("a", 1, tokens=150, requests=1)
    assert first.admitted and first.lease is not None
    tokens = first.meter("tokens")
    assert tokens is not None and tokens.path == "borrow"  # above its own burst of 100
    assert (tokens.limit, tokens.window, tokens.remaining) == (200, 1, 50)
    second = quota.try_acquire("a", 1, tokens=100)
    assert not second.admitted and second.reason == "meter"
    refusal = second.meter("tokens")
    assert refusal is not None and refusal.reason == "ceil"
    assert refusal.retry_after == second.retry_after == 0.25  # 50 tokens at 200/s
    assert second.used == 1  # the refused request holds nothing
    assert "meter 'tokens'" in second.describe()
    clock.advance(0.25)
    assert quota.try_acquire("a", 1, tokens=100).admitted
    quota.release(first.lease)


def test_meter_amounts_are_checked_before_redis(make_quota: MakeClient) -> None:
    """A bad amount fails with a ratequota error naming it; a meter the group lacks too."""
    quota = make_quota(metered_policy())
    with pytest.raises(InvalidType, match="tokens"):
        quota.try_acquire("a", 1, tokens="many")
    with pytest.raises(InvalidRequest, match="tokens"):
        quota.try_acquire("a", 1, tokens=-1)
    with pytest.raises(InvalidRequest, match="given twice"):
        quota.try_acquire("a", 1, tokens=1, meters={"tokens": 2})
    with pytest.raises(InvalidRequest, match="no rate meter"):
        quota.try_acquire("a", 1, meters={"watts": 1})


def test_unbounded_meter_amount_raises_too_large_at_once(make_client: MakeClient) -> None:
    """An amount above every bucket can never pass: acquire raises RequestTooLarge at once."""
    quota = make_client(metered_policy())
    with pytest.raises(RequestTooLarge), quota.acquire("a", 1, tokens=10_000, timeout=5.0):
        pass  # pragma: no cover


def test_settle_refunds_once_and_unsettled_keeps_its_estimate(make_quota: MakeClient) -> None:
    """settle(tokens=actual) charges the difference once (replay and conflict charge nothing);
    release(tokens=...) settles first; a settlement after the lease ended is ``closed``."""
    clock = ManualClock()
    quota = make_quota(metered_policy(), clock=clock)
    lease = quota.try_acquire("b", 1, tokens=180).lease  # 200 of the 300 are borrowable
    assert lease is not None
    assert not quota.try_acquire("b", 1, tokens=150).admitted  # the spare is spent
    (done,) = quota.settle(lease, tokens=30)
    assert (done.name, done.outcome, done.delta) == ("tokens", "settled", -150)
    assert [s.outcome for s in quota.settle(lease, tokens=30)] == ["replay"]
    assert [s.outcome for s in quota.settle(lease, tokens=99)] == ["conflict"]
    assert [s.outcome for s in quota.settle(lease, requests=1)] == ["unreserved"]
    again = quota.try_acquire("b", 1, tokens=150)
    assert again.admitted and again.lease is not None  # the refund came back
    assert quota.release(again.lease, tokens=150).state == "released"
    assert [s.outcome for s in quota.settle(again.lease, tokens=1)] == ["closed"]
    with quota.acquire("b", 1, tokens=0) as held:
        assert [s.outcome for s in held.settle(tokens=5)] == ["settled"]


def test_bad_amounts_never_reach_redis() -> None:
    """Amounts are checked before any I/O: a client whose backend fails on use raises the
    ratequota error naming the meter, for acquire and for settle alike."""
    from ratequota import LeaseInfo, QuotaClient
    from tests.test_validation import UntouchableBackend

    quota = QuotaClient(backend=UntouchableBackend())
    with pytest.raises(InvalidRequest, match="tokens"):
        quota.try_acquire("a", 1, group="g", tokens=2**40)
    with pytest.raises(InvalidRequest, match="not a meter name"):
        quota.try_acquire("a", 1, group="g", meters={"Tokens!": 1})
    lease = LeaseInfo("id", "a", "g", 1, 1, 0.0)
    with pytest.raises(InvalidType, match="tokens"):
        quota.settle(lease, tokens=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="at least one meter"):
        quota.settle(lease)


def test_shadow_mode_admits_a_meter_refusal_and_says_so(make_quota: MakeClient) -> None:
    """In shadow mode a meter refusal admits (charged as a borrow would be), reason "meter"."""
    group = metered_policy().groups[0]
    quota = make_quota(Policy([attrs.evolve(group, shadow=True)]))
    assert quota.try_acquire("b", 1, requests=5).reason == "admitted"
    shadowed = quota.try_acquire("b", 1, requests=5)
    assert shadowed.admitted and shadowed.shadow_refused and shadowed.reason == "meter"
    result = shadowed.meter("requests")
    assert result is not None and result.reason == "ceil" and not result.admitted
    assert "shadow mode" in shadowed.describe()


def test_limit_reads_meter_estimates_from_the_handler(make_client: MakeClient) -> None:
    """``limit(tokens="estimate")`` charges each call the estimate its argument names."""
    clock = ManualClock()
    quota = make_client(metered_policy(), clock=clock)
    seen: list[int] = []

    @quota.limit(tenant="tenant", tokens="estimate", requests=1, timeout=0)
    def handler(tenant: str, estimate: int) -> int:
        seen.append(estimate)
        return estimate

    assert handler("b", 150) == 150
    with pytest.raises(QuotaExceeded) as info:
        handler("b", 150)  # 50 left of what b may borrow now
    assert info.value.decision.reason == "meter"
    assert seen == [150]


def test_concurrent_async_acquires_carry_their_meters(real_redis: RedisServer) -> None:
    """Concurrent acquires of the async client (which may merge them into one acquire_many
    call) each keep their own meter amounts and results; the spare is never overdrawn."""
    import asyncio

    from ratequota import AsyncQuotaClient

    async def run() -> list[Decision]:
        quota = AsyncQuotaClient.from_url(real_redis.url)
        try:
            await quota.apply_policy(metered_policy())
            asks = [quota.try_acquire("b", 1, tokens=60, requests=1) for _ in range(5)]
            return list(await asyncio.gather(*asks))
        finally:
            await quota.close()

    decisions = asyncio.run(run())
    assert [d.admitted for d in decisions].count(True) == 3  # 200 borrowable: 3 × 60
    for d in decisions:
        assert {m.name for m in d.meters} == {"tokens", "requests"}
