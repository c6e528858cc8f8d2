"""Meters in the policy: validation naming the field, TOML with lines, the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given

from ratequota import ConfigError, GroupPolicy, Policy, PolicyFileError, TenantPolicy
from ratequota.policy import MAX_METER, MAX_METERS, MeterPolicy, TenantMeter
from ratequota.rates import TICKS_PER_TOKEN, meter_limits, share_limits
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


def test_a_policy_with_meters_is_not_published_until_they_are_enforced() -> None:
    """Meters are validated but the acquire script does not enforce them yet: publishing such a
    policy is refused, naming the group's meters, before anything touches Redis."""
    from ratequota import QuotaClient
    from tests.test_validation import UntouchableBackend

    metered = Policy([GroupPolicy("g", capacity=4, meters=(TOKENS,))])
    quota = QuotaClient(backend=UntouchableBackend())
    with pytest.raises(ConfigError) as info:
        quota.apply_policy(metered)
    assert info.value.field == "group 'g': meters"
    assert "not yet enforced" in str(info.value)
