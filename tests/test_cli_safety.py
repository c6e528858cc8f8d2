"""A command line that cannot cause an outage by accident (issue 13, item 4).

Each test is one friction found by trying the CLI as a new operator would:
``policy apply`` silently unpublishing groups, an empty file accepted,
``check`` passing with nothing to check, problems printed twice, messages in
Python, no ``--json`` or ``--version``, "1 tenants".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.cli.diff import diff_policies
from ratequota.cli.output import plural
from ratequota.clients.sync import QuotaClient
from ratequota.errors import PolicyMissing
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

TWO_GROUPS = """\
[[groups]]
name = "search"
capacity = 24

[[groups.tenants]]
name = "web"
guarantee = 12

[[groups]]
name = "chat"
capacity = 8

[[groups.tenants]]
name = "prod"
guarantee = 8
"""

ONE_GROUP_CHANGED = """\
[[groups]]
name = "search"
capacity = 30

[[groups.tenants]]
name = "web"
guarantee = 10
weight = 2

[[groups.tenants]]
name = "batch"
guarantee = 4
"""


@pytest.fixture
def url(real_redis: RedisServer) -> str:
    """The URL of the session's real redis-server, emptied for this test."""
    return real_redis.url


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _published(url: str) -> Policy | None:
    client = QuotaClient.from_url(url)
    try:
        return client.load_policy()
    finally:
        client.close()


@pytest.mark.real_redis
def test_apply_refuses_to_drop_groups_without_prune(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file with fewer groups prints the diff and publishes nothing unless --prune is given."""
    first = _write(tmp_path, "two.toml", TWO_GROUPS)
    second = _write(tmp_path, "one.toml", ONE_GROUP_CHANGED)
    assert cli.main(["policy", "apply", first, "--redis", url]) == 0
    before = _published(url)
    capsys.readouterr()

    assert cli.main(["policy", "apply", second, "--redis", url]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "  group 'search': changed: capacity 24 -> 30" in lines
    assert "    tenant 'web': changed: guarantee 12 -> 10, weight (default) -> 2" in lines
    assert "    tenant 'batch': added (guarantee 4)" in lines
    assert "  group 'chat': removed (capacity 8, 1 tenant)" in lines
    assert "published" not in captured.out.replace("published on", "")
    assert "leaves out 1 published group: 'chat' (1 tenant)" in captured.err
    assert "--prune" in captured.err
    assert _published(url) == before  # nothing changed, not even the kept group

    assert cli.main(["policy", "apply", second, "--redis", url, "--prune"]) == 0
    out = capsys.readouterr().out
    assert "published group 'search' (policy version 2)" in out
    assert "removed group 'chat'" in out
    assert _published(url) == Policy.from_toml(second)


@pytest.mark.real_redis
def test_apply_refuses_an_empty_file(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty file would unpublish everything: refused, even with --prune."""
    assert (
        cli.main(["policy", "apply", _write(tmp_path, "p.toml", TWO_GROUPS), "--redis", url]) == 0
    )
    before = _published(url)
    empty = _write(tmp_path, "empty.toml", "# nothing yet\n")
    for extra in ([], ["--prune"]):
        capsys.readouterr()
        assert cli.main(["policy", "apply", empty, "--redis", url, *extra]) == 2
        assert "has no groups" in capsys.readouterr().err
    assert _published(url) == before
    # Even on a fresh Redis, where nothing would be removed.
    fresh = ["policy", "apply", empty, "--redis", url, "--prefix", "fresh"]
    assert cli.main(fresh) == 2
    assert "has no groups" in capsys.readouterr().err


@pytest.mark.real_redis
def test_apply_json_reports_the_diff_and_versions(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: one document with the target, the diff per group and the published versions."""
    path = _write(tmp_path, "p.toml", TWO_GROUPS)
    assert cli.main(["policy", "apply", path, "--redis", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == url
    assert data["diff"]["published_before"] is False
    assert [g["status"] for g in data["diff"]["groups"]] == ["added", "added"]
    assert data["published"] == {"search": 1, "chat": 1}
    assert cli.main(["policy", "apply", path, "--redis", url, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [g["status"] for g in again["diff"]["groups"]] == ["unchanged", "unchanged"]


@pytest.mark.real_redis
def test_check_fails_when_nothing_or_an_empty_policy_is_published(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """check exits 1 with no catalog, and with a catalog of zero groups (main said READY 0/0)."""
    assert cli.main(["check", "--redis", url]) == 1
    out = capsys.readouterr().out
    assert "publish one with `ratequota policy apply FILE`" in out
    assert "apply_policy" not in out
    client = QuotaClient.from_url(url)
    try:
        client.apply_policy(Policy(()))  # the library allows it; the probe must not pass
    finally:
        client.close()
    assert cli.main(["check", "--redis", url]) == 1
    out = capsys.readouterr().out
    assert "the published policy has no groups" in out
    assert out.rstrip().endswith("NOT READY")
    assert cli.main(["check", "--redis", url, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ready"] is False
    assert data["shards"][0]["reachable"] is True


def test_check_prints_one_line_per_problem(capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable Redis is one problem, not a catalog problem plus a shard problem."""
    assert cli.main(["check", "--redis", "redis://127.0.0.1:1/0"]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if "problem" in line]
    assert len(problems) == 1
    assert "unreachable" in problems[0]
    assert "holds the routing catalog" in problems[0]


@pytest.mark.real_redis
def test_check_calls_a_bad_database_number_what_it_is(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server answering "DB index is out of range" is reachable: the URL is wrong."""
    bad = url.rsplit("/", 1)[0] + "/99"
    assert cli.main(["check", "--redis", bad]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if "problem" in line]
    assert len(problems) == 1
    assert "unreachable" not in problems[0]
    assert "database number in the URL does not exist" in problems[0]


def _leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {" ".join(path): parser}
    leaves: dict[str, argparse.ArgumentParser] = {}
    for action in subs:
        for name, child in action.choices.items():
            leaves.update(_leaf_parsers(child, (*path, name)))
    return leaves


def test_every_command_has_json() -> None:
    """Every sub-command offers --json for scripts (simulate's comes with the simulation)."""
    leaves = _leaf_parsers(cli.build_parser())
    assert {"policy apply", "policy show", "inspect", "check", "demo"} <= set(leaves)
    missing = [
        name
        for name, parser in leaves.items()
        if name != "simulate" and not any("--json" in a.option_strings for a in parser._actions)
    ]
    assert missing == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``ratequota --version`` prints the installed version and exits 0."""
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"ratequota {metadata.version('ratequota')}"


def test_demo_json_is_one_document() -> None:
    """``ratequota demo --json`` prints one JSON document and nothing else on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "ratequota", "demo", "--seconds", "0.4", "--workers", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["violations"] == []
    assert data["left_over_units"] == 0
    assert set(data["admitted"]) == {"lender", "borrower"}


def test_policy_missing_names_the_command_not_the_python_call() -> None:
    """The error a service shows as its 404 tells the operator what to run."""
    text = str(PolicyMissing("inference"))
    assert "`ratequota policy apply FILE`" in text
    assert "apply_policy" not in text


def test_plural() -> None:
    """Counts agree with their nouns."""
    assert plural(1, "tenant") == "1 tenant"
    assert plural(0, "tenant") == "0 tenants"
    assert plural(2, "batch", "batches") == "2 batches"


def test_diff_of_policies_is_exact() -> None:
    """Added, changed, removed and unchanged groups and tenants; defaults shown as such."""
    old = Policy(
        (
            GroupPolicy("a", capacity=10, tenants=(TenantPolicy("x", guarantee=5),)),
            GroupPolicy("b", capacity=4, tenants=(TenantPolicy("y"),)),
            GroupPolicy("c", capacity=4),
        ),
        default_group="a",
    )
    new = Policy(
        (
            GroupPolicy(
                "a",
                capacity=10,
                tenants=(TenantPolicy("x", guarantee=5, borrow_limit=2), TenantPolicy("z")),
            ),
            GroupPolicy("c", capacity=4),
            GroupPolicy("d", capacity=1),
        )
    )
    diff = diff_policies(old, new)
    assert [(g.name, g.status) for g in diff.groups] == [
        ("a", "changed"),
        ("c", "unchanged"),
        ("d", "added"),
        ("b", "removed"),
    ]
    a = diff.groups[0]
    assert [(t.name, t.status) for t in a.tenants] == [("x", "changed"), ("z", "added")]
    assert a.tenants[0].describe() == "tenant 'x': changed: borrow_limit (default) -> 2"
    assert diff.default_group is not None
    assert diff.default_group.describe() == "default_group 'a' -> (default)"
    assert diff.summary() == "groups: 1 added, 1 changed, 1 removed, 1 unchanged"
    assert diff.changed
    assert not diff_policies(new, new).changed
    assert [g.status for g in diff_policies(None, new).groups] == ["added"] * 3


def test_demo_never_publishes_over_a_deployments_policy() -> None:
    """demo publishes a policy of its own: under the rqdemo prefix unless told otherwise.

    With the deployment's prefix, ``ratequota demo --redis <prod>`` would have
    replaced the published policy with the demo's one group.
    """
    assert cli.build_parser().parse_args(["demo"]).prefix == "rqdemo"
    assert cli.build_parser().parse_args(["simulate"]).prefix == "rqsim"
    assert cli.build_parser().parse_args(["policy", "show"]).prefix == "rq"
