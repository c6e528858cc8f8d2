"""The operator command line: ``policy apply``, ``policy show`` and ``inspect``.

Commands are called through ``cli.main([...])`` on the embedded default
(each test under its own key prefix, so tests never see each other's state),
once against a real redis-server, and once as ``python -m ratequota`` in a
subprocess to prove the entry point works outside pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.clients.sync import QuotaClient
from ratequota.errors import PolicyFileError
from ratequota.operator import policy_to_toml, render_snapshot
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.tomlpos import locate_field

POLICY = """\
# Two groups of the staging region.
[[groups]]
name = "search"
capacity = 24

[[groups.tenants]]
name = "web"
guarantee = 12
weight = 2

[[groups.tenants]]
name = "batch"
guarantee = 4
borrow_limit = 8

[[groups]]
name = "chat"
capacity = 8
unknown_tenants = "default"

[[groups.tenants]]
name = "prod"
guarantee = 8
"""


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone on the process-wide embedded server."""
    return f"clitest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """A valid policy file."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


def test_apply_then_show_round_trips(
    policy_file: Path, prefix: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A published policy is shown as TOML that reads back to the same policy."""
    assert cli.main(["policy", "apply", str(policy_file), "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "published group 'search'" in out
    assert "published group 'chat'" in out
    assert cli.main(["policy", "show", "--prefix", prefix]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    assert Policy.from_toml(shown) == Policy.from_toml(policy_file)
    assert cli.main(["policy", "show", "--json", "--prefix", prefix]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in data["groups"]] == ["search", "chat"]


def test_show_without_a_policy(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Showing before anything is published says so and exits 1."""
    assert cli.main(["policy", "show", "--prefix", prefix]) == 1
    assert "no policy is published" in capsys.readouterr().out


def test_apply_dry_run_publishes_nothing(
    policy_file: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run validates the file and leaves the backend untouched."""
    assert cli.main(["policy", "apply", "--dry-run", str(policy_file), "--prefix", prefix]) == 0
    assert "valid; nothing published" in capsys.readouterr().out
    assert cli.main(["policy", "show", "--prefix", prefix]) == 1


def test_inspect_shows_live_usage_and_leases(
    policy_file: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect lists every tenant's used/limit/pending/borrowed and the live leases."""
    assert cli.main(["policy", "apply", str(policy_file), "--prefix", prefix]) == 0
    client = QuotaClient(prefix=prefix)  # the embedded server, like another pod
    try:
        with client.acquire("batch", 6, ttl=30) as lease:
            capsys.readouterr()
            assert cli.main(["inspect", "--group", "search", "--prefix", prefix]) == 0
            out = capsys.readouterr().out
            assert "6 of 24 units held" in out
            batch_row = next(line for line in out.splitlines() if line.startswith("batch "))
            # used 6, guarantee 4, borrowed 2
            assert batch_row.split()[1] == "6"
            assert batch_row.split()[-1] == "2"
            assert any(line.startswith("web ") for line in out.splitlines())
            assert lease.id in out
            assert cli.main(["inspect", "--group", "search", "--json", "--prefix", prefix]) == 0
            data = json.loads(capsys.readouterr().out)
            assert data["tenants"]["batch"]["borrowed"] == 2
            assert data["leases"][0]["token"] == lease.token
    finally:
        client.close()


def test_inspect_explains_a_tenant(
    policy_file: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tenant adds why the tenant has its limit; --units whether a request would fit."""
    assert cli.main(["policy", "apply", str(policy_file), "--prefix", prefix]) == 0
    capsys.readouterr()
    args = ["inspect", "--group", "search", "--prefix", prefix, "--tenant", "batch"]
    assert cli.main([*args, "--units", "13"]) == 0
    out = capsys.readouterr().out
    assert "tenant 'batch' in group 'search'" in out
    assert "can never fit" in out  # G + B = 12
    assert cli.main([*args, "--units", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("would be admitted" in line for line in data["explanation"])


def test_inspect_unknown_group_is_a_clear_error(
    prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group without a published policy is reported, not a traceback."""
    assert cli.main(["inspect", "--group", "nope", "--prefix", prefix]) == 2
    err = capsys.readouterr().err
    assert "nope" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["policy", "show"], ["inspect", "--group", "g"]])
def test_unreachable_server_is_a_clear_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command reports an unreachable Redis in one line and exits 2."""
    assert cli.main([*command, "--redis", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratequota: error:")
    assert "unavailable" in err


def test_apply_unreachable_server(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Publishing to a server that is down fails clearly (nothing half-applied is claimed)."""
    assert cli.main(["policy", "apply", str(policy_file), "--redis", "redis://127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert "unavailable" in captured.err
    assert "published" not in captured.out


def test_malformed_files_name_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Syntax errors and bad values are reported with file:line and the field."""
    broken = tmp_path / "broken.toml"
    broken.write_text('[[groups]]\nname = "g"\ncapacity 8\n')
    assert cli.main(["policy", "apply", str(broken)]) == 2
    assert f"{broken}:3: not valid TOML" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(POLICY.replace("weight = 2", "weight = -2"))
    assert cli.main(["policy", "apply", "--dry-run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:9:" in err
    assert "tenant 'web': weight" in err
    over = tmp_path / "over.toml"
    over.write_text(POLICY.replace("capacity = 8", "capacity = 6"))
    assert cli.main(["policy", "apply", "--dry-run", str(over)]) == 2
    err = capsys.readouterr().err
    assert f"{over}:16:" in err  # the [[groups]] table of "chat"
    assert "guarantees sum to 8" in err
    assert cli.main(["policy", "apply", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_locate_field_paths() -> None:
    """Field names as validators spell them map back to the line they are written on."""
    text = POLICY + "\n[groups.default_tenant]\nweight = 0.5\n"
    assert locate_field(text, "groups[0].tenants[1].borrow_limit") == 14
    assert locate_field(text, "tenant 'web': weight") == 9
    assert locate_field(text, "group 'chat': capacity") == 18
    assert locate_field(text, "groups[1].default_tenant.weight") == 26
    assert locate_field(text, "groups[1].tenants[0].nothing") == 21  # its table
    assert locate_field(text, "tenant 'ghost': weight") is None


def test_policy_to_toml_is_lossless_for_awkward_values(tmp_path: Path) -> None:
    """Names with quotes, braces and unicode, fractions and defaults survive a round trip."""
    policy = Policy(
        (
            GroupPolicy(
                'odd "group" {x}',
                capacity=10,
                tenants=(
                    TenantPolicy("ténant:1", guarantee=3, lendable=1 / 3, max_units=2),
                    TenantPolicy("b\\c", weight=0.1),
                ),
                unknown_tenants="default",
                default_tenant=TenantPolicy("*", weight=0.25, borrow_limit=2),
                max_lease_ttl=120.0,
            ),
        ),
        default_group='odd "group" {x}',
    )
    path = tmp_path / "p.toml"
    path.write_text(policy_to_toml(policy), encoding="utf-8")
    assert Policy.from_toml(path) == policy


def test_render_snapshot_without_leases() -> None:
    """The table renders for an idle group too."""
    from ratequota.testing import fake_client

    group = GroupPolicy("g", capacity=4, tenants=(TenantPolicy("a", guarantee=2),))
    client = fake_client(Policy((group,)))
    try:
        text = render_snapshot(client.snapshot("g", ["a"]))
    finally:
        client.close()
    assert "0 of 4 units held" in text
    assert "lease " not in text


@pytest.mark.real_redis
def test_operator_commands_on_real_redis(  # type: ignore[no-untyped-def]
    real_redis, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply, show and inspect work the same against a real redis-server."""
    url = real_redis.url
    assert cli.main(["policy", "apply", str(policy_file), "--redis", url]) == 0
    assert cli.main(["policy", "show", "--redis", url]) == 0
    assert 'name = "search"' in capsys.readouterr().out
    assert cli.main(["inspect", "--group", "chat", "--redis", url]) == 0
    assert "0 of 8 units held" in capsys.readouterr().out


def test_python_dash_m_entry_point(policy_file: Path) -> None:
    """`python -m ratequota` works as a real process (exit codes included)."""
    ok = subprocess.run(
        [sys.executable, "-m", "ratequota", "policy", "apply", "--dry-run", str(policy_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid; nothing published" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ratequota", "policy", "apply", str(policy_file.parent / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "cannot read" in bad.stderr


def test_policy_file_error_is_a_config_error(tmp_path: Path) -> None:
    """Library callers can catch a bad file as PolicyFileError (a ValueError)."""
    path = tmp_path / "x.toml"
    path.write_text("groups = 3\n")
    with pytest.raises(PolicyFileError) as caught:
        Policy.from_toml(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value)
