"""Policy classes: validation names the field, TOML round-trips, routing helpers."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

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


#: The data of ``TOML``, as a policy file parses to.
TOML_POLICY_DATA: dict[str, Any] = tomllib.loads(TOML)


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


# -- bad files and bad fields never escape as raw tracebacks (issue 9, item 8) ---------------


def test_a_policy_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    """Latin-1 bytes in a policy file: a ``PolicyFileError`` with the line, not a decode crash."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[groups]]\ncapacity = 4\nname = "caf\xe9"\n')
    with pytest.raises(PolicyFileError) as info:
        Policy.from_toml(path)
    assert str(info.value).startswith(f"{path}:3: not UTF-8")


@pytest.mark.parametrize(
    ("body", "line", "field"),
    [
        ('default_tenant = "oops"', 4, "groups[0].default_tenant"),
        ("default_tenant = 5", 4, "groups[0].default_tenant"),
        ("default_tenant = { weight = -1 }", 4, "groups[0].default_tenant.weight"),
        ("default_tenant = { guarantee = 1 }", 4, "default_tenant.guarantee"),
        ("default_tenant = { colour = 1 }", 4, "groups[0].default_tenant.colour"),
        ("unknown_tenants = [1]", 4, "unknown_tenants"),
        ('max_lease_ttl = "long"', 4, "max_lease_ttl"),
        ('tenants = "a"', 4, "groups[0].tenants"),
        ("[[groups.tenants]]\nname = 5", 5, "groups[0].tenants[0].name"),
        ("[[groups.tenants]]\nname = 'a'\nweight = nan", 6, "weight"),
        ("[[groups.tenants]]\nname = 'a'\nguarantee = 1.5", 6, "guarantee"),
    ],
)
def test_bad_fields_name_file_line_and_field(
    tmp_path: Path, body: str, line: int, field: str
) -> None:
    """Every bad value is a ``PolicyFileError`` naming the file, its line and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(f'[[groups]]\nname = "g"\ncapacity = 4\n{body}\n', encoding="utf-8")
    with pytest.raises(PolicyFileError) as info:
        Policy.from_toml(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert field in str(info.value)


def test_the_cli_reports_bad_files_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ratequota policy apply --dry-run`` on such files: one line, exit 2."""
    from ratequota.cli import main

    latin = tmp_path / "latin1.toml"
    latin.write_bytes(b"[[groups]]\nname = '\xff'\ncapacity = 1\n")
    oops = tmp_path / "oops.toml"
    oops.write_text('[[groups]]\nname = "g"\ncapacity = 4\ndefault_tenant = "oops"\n')
    for path in (latin, oops):
        assert main(["policy", "apply", "--dry-run", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ratequota: error: {path}:") and "Traceback" not in err


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in nested dicts and lists a value could be replaced."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


@given(data=st.data())
def test_any_bad_field_is_a_config_error(data: st.DataObject) -> None:
    """Replace any one field of a valid policy's data (or add an unknown one) with junk:
    building it either works or raises ``ConfigError`` — never another exception."""
    document = copy.deepcopy(TOML_POLICY_DATA)
    paths = _paths(document)
    path = data.draw(st.sampled_from(paths))
    junk = data.draw(_JUNK)
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    if data.draw(st.booleans()) and isinstance(target, dict):
        target[data.draw(st.text(min_size=1, max_size=4))] = junk
    else:
        target[path[-1]] = junk
    with contextlib.suppress(ConfigError):
        Policy.from_dict(document)


@given(content=st.binary(max_size=200))
def test_any_file_content_is_a_policy_file_error(content: bytes) -> None:
    """Arbitrary bytes as a policy file: a policy or a ``PolicyFileError``, nothing else."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "policy.toml"
        path.write_bytes(content)
        with contextlib.suppress(PolicyFileError):
            Policy.from_toml(path)
