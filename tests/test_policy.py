"""Policy classes: validation names the field, TOML round-trips, routing helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratequota import ConfigError, GroupPolicy, Policy, PolicyFileError, TenantPolicy


def test_guarantees_above_capacity_are_refused() -> None:
    """ΣG ≤ C is what makes guarantees keepable; a policy breaking it fails at construction."""
    with pytest.raises(ConfigError, match="guarantee") as info:
        GroupPolicy("g", capacity=10, tenants=[TenantPolicy("a", 6), TenantPolicy("b", 5)])
    assert isinstance(info.value, ValueError)
    assert "11" in str(info.value) and "10" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weight": -1.0}, "weight"),
        ({"weight": 0}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"lendable": 1.5}, "lendable"),
        ({"lendable": -0.1}, "lendable"),
        ({"guarantee": -1}, "guarantee"),
        ({"guarantee": 1.5}, "guarantee"),
        ({"borrow_limit": -2}, "borrow_limit"),
        ({"max_units": 0}, "max_units"),
    ],
)
def test_bad_tenant_fields_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each invalid tenant parameter is refused with a message naming it and the tenant."""
    with pytest.raises(ConfigError) as info:
        TenantPolicy("alice", **kwargs)  # type: ignore[arg-type]
    assert field in info.value.field
    assert "alice" in str(info.value)


@pytest.mark.parametrize("name", ["", 3, None])
def test_bad_names_are_refused(name: object) -> None:
    """Tenant and group names must be non-empty strings."""
    with pytest.raises(ConfigError, match="name"):
        TenantPolicy(name)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        GroupPolicy(name, capacity=1)  # type: ignore[arg-type]


def test_group_level_fields_are_checked() -> None:
    """Capacity, duplicate tenants, strangers' guarantee and lease TTL bounds are validated."""
    with pytest.raises(ConfigError, match="capacity"):
        GroupPolicy("g", capacity=0)
    with pytest.raises(ConfigError, match="twice"):
        GroupPolicy("g", capacity=5, tenants=[TenantPolicy("a"), TenantPolicy("a")])
    with pytest.raises(ConfigError, match=r"default_tenant\.guarantee"):
        GroupPolicy("g", capacity=5, default_tenant=TenantPolicy("*", guarantee=1))
    with pytest.raises(ConfigError, match="unknown_tenants"):
        GroupPolicy("g", capacity=5, unknown_tenants="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_lease_ttl"):
        GroupPolicy("g", capacity=5, max_lease_ttl=0.5)


def test_a_tenant_belongs_to_one_group() -> None:
    """A tenant is charged to exactly one group, so listing it twice is an error."""
    with pytest.raises(ConfigError, match="both group"):
        Policy(
            [GroupPolicy("g1", 5, [TenantPolicy("a")]), GroupPolicy("g2", 5, [TenantPolicy("a")])]
        )
    with pytest.raises(ConfigError, match="default_group"):
        Policy([GroupPolicy("g1", 5)], default_group="nope")


def test_routing_helpers() -> None:
    """group_of routes listed tenants to their group and strangers to the default group."""
    policy = Policy(
        [
            GroupPolicy("g1", 5, [TenantPolicy("a")]),
            GroupPolicy("g2", 5, unknown_tenants="default"),
        ],
        default_group="g2",
    )
    assert policy.group_of("a") == "g1"
    assert policy.group_of("stranger") == "g2"
    g2 = policy.group("g2")
    assert g2 is not None
    stranger = g2.tenant("stranger")
    assert stranger is not None and stranger.guarantee == 0
    g1 = policy.group("g1")
    assert g1 is not None and g1.tenant("stranger") is None


TOML = """
default_group = "batch"

[[groups]]
name = "batch"
capacity = 24
unknown_tenants = "default"
max_lease_ttl = 600
default_tenant = { weight = 0.5, borrow_limit = 4 }

[[groups.tenants]]
name = "acme"
guarantee = 12
lendable = 0.5
borrow_limit = 4
weight = 2.0

[[groups.tenants]]
name = "globex"
guarantee = 8
max_units = 6
"""


def test_toml_round_trip(tmp_path: Path) -> None:
    """A TOML policy file loads into the same classes, and to_dict/from_dict round-trips."""
    path = tmp_path / "policy.toml"
    path.write_text(TOML)
    policy = Policy.from_toml(path)
    batch = policy.group("batch")
    assert batch is not None
    assert batch.capacity == 24 and batch.max_lease_ttl == 600
    assert batch.tenants[0] == TenantPolicy("acme", 12, 0.5, 4, 2.0)
    assert batch.default_tenant.weight == 0.5
    assert Policy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[groups]]\nname = 'g'\n", "capacity"),
        ("[[groups]]\nname = 'g'\ncapacity = 4\ncolour = 'red'\n", "colour"),
        (
            "[[groups]]\nname = 'g'\ncapacity = 4\n[[groups.tenants]]\nname='a'\nweight=-1\n",
            "weight",
        ),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_policy_files_name_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    """A malformed policy file raises PolicyFileError naming the file and what is wrong."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyFileError) as info:
        Policy.from_toml(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    """A missing file is a PolicyFileError, not a bare OSError."""
    with pytest.raises(PolicyFileError, match="cannot read"):
        Policy.from_toml(tmp_path / "absent.toml")
