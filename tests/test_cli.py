"""The operator command line: ``policy apply``, ``policy show`` and ``inspect``.

Commands are called through ``cli.main([...])`` against the suite's real
redis-server (the command line refuses the embedded store for commands that
touch a deployment's keys), and as ``python -m ratequota`` in a subprocess to
prove the entry point works outside pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.cli.backend import URL_VARIABLE, has_backend
from ratequota.cli.operator import policy_to_toml, render_snapshot
from ratequota.clients.sync import QuotaClient
from ratequota.errors import PolicyFileError
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.tomlpos import locate_field
from tests.servers import RedisServer

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
    """A key prefix of this test alone."""
    return f"clitest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def url(real_redis: RedisServer) -> str:
    """The URL of the session's real redis-server, emptied for this test."""
    return real_redis.url


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """A valid policy file."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.mark.real_redis
def test_apply_then_show_round_trips(
    policy_file: Path, url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A published policy is shown as TOML that reads back to the same policy."""
    assert cli.main(["policy", "apply", str(policy_file), "--redis", url]) == 0
    out = capsys.readouterr().out
    assert "group 'search': added (capacity 24, 2 tenants)" in out
    assert "group 'chat': added (capacity 8, 1 tenant)" in out
    assert "published group 'search'" in out
    assert "published group 'chat'" in out
    assert cli.main(["policy", "show", "--redis", url]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    assert Policy.from_toml(shown) == Policy.from_toml(policy_file)
    assert cli.main(["policy", "show", "--json", "--redis", url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in data["groups"]] == ["search", "chat"]


@pytest.mark.real_redis
def test_show_without_a_policy(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Showing before anything is published says how to publish, and exits 1."""
    assert cli.main(["policy", "show", "--redis", url]) == 1
    err = capsys.readouterr().err
    assert "no policy is published" in err
    assert "`ratequota policy apply FILE`" in err
    assert cli.main(["policy", "show", "--json", "--redis", url]) == 1
    assert json.loads(capsys.readouterr().out) is None


def test_apply_dry_run_without_redis_only_validates(
    policy_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dry-run validates the file without any Redis (and says a Redis would show the diff)."""
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    assert cli.main(["policy", "apply", "--dry-run", str(policy_file)]) == 0
    out = capsys.readouterr().out
    assert "valid; nothing published" in out
    assert "group 'chat': capacity 8, 1 tenant\n" in out  # not "1 tenants"
    assert "group 'search': capacity 24, 2 tenants\n" in out


@pytest.mark.real_redis
def test_apply_dry_run_with_redis_shows_the_diff_and_publishes_nothing(
    policy_file: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run with a Redis named prints what would change, and leaves Redis untouched."""
    assert cli.main(["policy", "apply", "--dry-run", str(policy_file), "--redis", url]) == 0
    out = capsys.readouterr().out
    assert "nothing is published yet" in out
    assert "groups: 2 added, 0 changed, 0 removed, 0 unchanged" in out
    assert "valid; nothing published" in out
    assert cli.main(["policy", "show", "--redis", url]) == 1


@pytest.mark.real_redis
def test_inspect_shows_live_usage_and_leases(
    policy_file: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect lists every tenant's used/limit/pending/borrowed and the live leases."""
    assert cli.main(["policy", "apply", str(policy_file), "--redis", url]) == 0
    client = QuotaClient.from_url(url)  # another pod
    try:
        with client.acquire("batch", 6, ttl=30) as lease:
            capsys.readouterr()
            assert cli.main(["inspect", "--group", "search", "--redis", url]) == 0
            out = capsys.readouterr().out
            assert "6 of 24 units held" in out
            batch_row = next(line for line in out.splitlines() if line.startswith("batch "))
            # used 6, guarantee 4, borrowed 2
            assert batch_row.split()[1] == "6"
            assert batch_row.split()[-1] == "2"
            assert any(line.startswith("web ") for line in out.splitlines())
            assert lease.id in out
            assert cli.main(["inspect", "--group", "search", "--json", "--redis", url]) == 0
            data = json.loads(capsys.readouterr().out)
            assert data["tenants"]["batch"]["borrowed"] == 2
            assert data["leases"][0]["token"] == lease.token
    finally:
        client.close()


@pytest.mark.real_redis
def test_inspect_explains_a_tenant(
    policy_file: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tenant adds why the tenant has its limit; --units whether a request would fit."""
    assert cli.main(["policy", "apply", str(policy_file), "--redis", url]) == 0
    capsys.readouterr()
    args = ["inspect", "--group", "search", "--redis", url, "--tenant", "batch"]
    assert cli.main([*args, "--units", "13"]) == 0
    out = capsys.readouterr().out
    assert "tenant 'batch' in group 'search'" in out
    assert "can never fit" in out  # G + B = 12
    assert cli.main([*args, "--units", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("would be admitted" in line for line in data["explanation"])


@pytest.mark.real_redis
def test_inspect_unknown_group_is_a_clear_error(
    policy_file: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group the published policy lacks is named, with the groups it has; no traceback."""
    assert cli.main(["inspect", "--group", "nope", "--redis", url]) == 1  # nothing published
    assert "`ratequota policy apply FILE`" in capsys.readouterr().err
    assert cli.main(["policy", "apply", str(policy_file), "--redis", url]) == 0
    assert cli.main(["inspect", "--group", "nope", "--redis", url]) == 2
    err = capsys.readouterr().err
    assert "group 'nope' is not in the published policy" in err
    assert "'search'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["policy", "show"], ["inspect", "--group", "g"], ["check"]])
def test_unreachable_server_is_a_clear_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command reports an unreachable Redis (check as its verdict) and exits non-zero."""
    code = cli.main([*command, "--redis", "redis://127.0.0.1:1/0"])
    captured = capsys.readouterr()
    if command == ["check"]:
        assert code == 1
        assert "unreachable" in captured.out
        return
    assert code == 2
    assert captured.err.startswith("ratequota: error:")
    assert "unavailable" in captured.err


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
def test_commands_find_redis_through_the_environment(
    url: str,
    policy_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With RATEQUOTA_URL set, apply, show, inspect and check need no backend option."""
    monkeypatch.setenv(URL_VARIABLE, url)
    assert cli.main(["policy", "apply", str(policy_file)]) == 0
    assert url in capsys.readouterr().out  # the target is named before publishing
    assert cli.main(["policy", "show"]) == 0
    assert 'name = "search"' in capsys.readouterr().out
    assert cli.main(["inspect", "--group", "chat"]) == 0
    assert "0 of 8 units held" in capsys.readouterr().out
    assert cli.main(["check"]) == 0
    assert "READY" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        ["policy", "apply", "FILE"],
        ["policy", "show"],
        ["inspect", "--group", "search"],
        ["check"],
    ],
)
def test_commands_touching_redis_refuse_the_embedded_store(
    command: list[str],
    policy_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --redis/--shards/--cluster or RATEQUOTA_URL: one clear error, exit 2.

    On main these ran on a throw-away in-process store: ``policy apply`` said
    "published" and the next ``policy show`` found nothing.
    """
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    argv = [str(policy_file) if arg == "FILE" else arg for arg in command]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    for named in ("--redis", "--shards", "--cluster", URL_VARIABLE):
        assert named in captured.err


@pytest.mark.parametrize("command", [["demo"], ["simulate"]])
def test_demo_and_simulate_stay_in_process_whatever_the_environment(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """demo and simulate default to the embedded store and ignore RATEQUOTA_URL.

    Simulated traffic must never reach a real Redis because a variable was left set.
    """
    monkeypatch.setenv(URL_VARIABLE, "redis://127.0.0.1:1/0")
    args = cli.build_parser().parse_args(command)
    client = cli.client_from_args(args)
    try:
        assert not has_backend(args)
        assert client.backend.description == "embedded fakeredis"  # type: ignore[attr-defined]
    finally:
        client.close()


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


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level (function-level imports included)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_command_line() -> None:
    """The CLI is a tool on top of the library: no library module imports ``ratequota.cli``.

    (``python -m ratequota`` is the command line. The simulation is a tool too, but it
    gets its pods' client factory from the command line as an argument: it imports the
    library only.)
    """
    package = Path(cli.__file__).parent.parent
    tools = {package / "cli", package / "__main__.py"}
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if any(path == tool or tool in path.parents for tool in tools):
            continue
        if any(
            name == "ratequota.cli" or name.startswith("ratequota.cli.") for name in _imports(path)
        ):
            offenders.append(str(path.relative_to(package)))
    assert offenders == []
    readiness = _imports(package / "clients" / "readiness.py")
    assert not any(n == "ratequota.cli" or n.startswith("ratequota.cli.") for n in readiness)


def test_console_script_points_at_the_cli_package() -> None:
    """``[project.scripts]`` names a function that exists: ``ratequota.cli:main``."""
    import tomllib

    project = Path(cli.__file__).parent.parent.parent / "pyproject.toml"
    target = tomllib.loads(project.read_text())["project"]["scripts"]["ratequota"]
    module, _, attr = target.partition(":")
    assert (module, attr) == ("ratequota.cli", "main")
    assert getattr(cli, attr) is cli.main
