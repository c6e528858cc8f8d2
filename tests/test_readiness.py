"""Readiness: the pure verdict on gathered facts, the real check on shards, and ``ratequota check``.

The verdicts are tested on hand-written facts (no Redis); then the gathering
is tested on real redis-servers: a healthy deployment, a killed shard,
flushed scripts, an evicting ``maxmemory-policy`` and an ACL user missing
script rights. The minimal ACL from ``docs/deployment.md`` is tested here too,
so the document cannot drift from what the library needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ratequota.cli import main
from ratequota.clients.readiness import GroupFacts, ShardFacts, evaluate, served_groups
from ratequota.clients.sync import QuotaClient
from ratequota.engine.scripts import SCRIPT_NAMES
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.conftest import MakeClient, _no_redis
from tests.servers import RedisServer, redis_server_binary

ALL_LOADED = dict.fromkeys(SCRIPT_NAMES, True)
INFO = {"redis_version": "7.0.15", "maxmemory_policy": "noeviction"}


def healthy(name: str = "s1", **changes: Any) -> ShardFacts:
    """Facts of a shard where everything is fine, with ``changes`` applied."""
    base: dict[str, Any] = {
        "name": name,
        "latency": 0.001,
        "info": INFO,
        "scripts": ALL_LOADED,
        "time_reply": [b"1800000000", b"0"],
        "groups": (GroupFacts("g", b"1", b"3"),),
        "holds_catalog": True,
    }
    base.update(changes)
    return ShardFacts(**base)


def test_healthy_facts_are_ready() -> None:
    """Reachable, scripts loaded, TIME allowed, policies present, catalog present: ready."""
    report = evaluate([healthy(), healthy("s2", holds_catalog=False)], catalog_present=True)
    assert report.ready
    assert report.problems == ()
    assert report.warnings == ()
    assert [s.name for s in report.shards] == ["s1", "s2"]
    assert report.shards[0].version == "7.0.15"
    assert "READY" in report.table()


@pytest.mark.parametrize(
    ("facts", "needle"),
    [
        (healthy(error="ConnectionError: refused"), "unreachable"),
        (healthy(scripts={**ALL_LOADED, "acquire": False}), "scripts not loaded: acquire"),
        (healthy(script_error="NoPermissionError: script"), "scripts cannot be"),
        (healthy(time_error="ResponseError: TIME not allowed"), "TIME is not allowed"),
        (healthy(time_reply=b"nope"), "TIME in a script"),
        (healthy(groups=(GroupFacts("g"),)), "no policy published for 'g'"),
        (healthy(groups=(GroupFacts("g", b"99", b"1"),)), "key schema 99"),
        (healthy(groups=(GroupFacts("g", error="boom"),)), "policy unreadable"),
    ],
)
def test_each_problem_makes_the_pod_not_ready(facts: ShardFacts, needle: str) -> None:
    """Every kind of shard problem is reported, named, and makes the pod not ready."""
    report = evaluate([facts], catalog_present=True)
    assert not report.ready
    assert any(needle in p for p in report.problems), report.problems
    assert "NOT READY" in report.table()


def test_missing_or_unreadable_catalog_is_not_ready() -> None:
    """Nothing published, or the catalog unreadable: no tenant can be routed, so not ready."""
    assert not evaluate([healthy()], catalog_present=False).ready
    report = evaluate([healthy()], catalog_present=False, catalog_error="SchemaMismatch: v2")
    assert not report.ready
    assert "catalog unreadable" in report.problems[0]
    assert not evaluate([], catalog_present=True).ready


@pytest.mark.parametrize(
    ("policy", "warned"),
    [
        ("allkeys-lru", True),
        ("allkeys-random", True),
        ("volatile-ttl", True),
        ("noeviction", False),
        ("unknown", False),
    ],
)
def test_evicting_maxmemory_policies_warn_without_failing(policy: str, warned: bool) -> None:
    """allkeys-* (and volatile-*) eviction can drop limiter state: a warning, still ready."""
    info = {**INFO, "maxmemory_policy": policy}
    report = evaluate([healthy(info=info)], catalog_present=True)
    assert report.ready
    assert any("maxmemory-policy" in w for w in report.warnings) == warned


def test_slow_round_trip_warns() -> None:
    """A round trip above ``slow_after`` is a warning, not a failure."""
    report = evaluate([healthy(latency=0.5)], catalog_present=True, slow_after=0.25)
    assert report.ready
    assert "slow" in report.warnings[0]


def test_allow_degraded_needs_the_catalog_shard_and_one_more() -> None:
    """Degraded mode keeps the pod ready when a non-catalog shard fails, never the catalog's."""
    down = healthy("s2", error="refused", holds_catalog=False)
    assert not evaluate([healthy(), down], catalog_present=True).ready
    assert evaluate([healthy(), down], catalog_present=True, allow_degraded=True).ready
    catalog_down = healthy("s1", error="refused")
    other = healthy("s2", holds_catalog=False)
    assert not evaluate([catalog_down, other], catalog_present=True, allow_degraded=True).ready


def test_served_groups() -> None:
    """Explicit groups win (deduplicated); otherwise every published group; none without policy."""
    policy = Policy([GroupPolicy(g, 1, [TenantPolicy(f"{g}-t")]) for g in ("a", "b")])
    assert served_groups(policy, None) == ["a", "b"]
    assert served_groups(policy, ["b", "b"]) == ["b"]
    assert served_groups(None, None) == []


def test_check_on_the_embedded_backend(make_kind: MakeClient) -> None:
    """``check()`` works on fakeredis too (no INFO there: version unknown, not a failure),
    from either client."""
    quota = make_kind(Policy([GroupPolicy("g", 2, [TenantPolicy("t")])]))
    report = quota.check()
    assert report.ready, report.problems
    assert report.shards[0].version == "unknown"


# -- real servers ---------------------------------------------------------------------

POLICY = Policy([GroupPolicy(f"g{i}", 4, [TenantPolicy(f"t{i}")]) for i in range(9)])


@pytest.fixture(scope="module")
def servers() -> Iterator[list[RedisServer]]:
    """Three redis-servers for this module, stopped by PID at the end."""
    if redis_server_binary() is None:
        _no_redis()
    started: list[RedisServer] = []
    try:
        for _ in range(3):
            started.append(RedisServer().start())
        yield started
    finally:
        for server in started:
            server.cleanup()


@pytest.fixture
def shards(servers: list[RedisServer]) -> list[RedisServer]:
    """The module's servers, running, emptied, default config."""
    for server in servers:
        if server.process is None:
            server.start()
        client: Any = server.client()
        try:
            client.flushall()
            client.script_flush()
            client.config_set("maxmemory-policy", "noeviction")
            client.execute_command("ACL", "DELUSER", "quota")
        finally:
            client.close()
    return servers


def _urls(shards: list[RedisServer], user: str = "") -> list[str]:
    return [f"redis://{user}127.0.0.1:{s.port}/0" for s in shards]


@pytest.mark.real_redis
def test_real_shards_ready_then_a_killed_shard_is_not(shards: list[RedisServer]) -> None:
    """A healthy sharded deployment is ready; a killed shard makes the pod not ready, named."""
    quota = QuotaClient.sharded(_urls(shards), socket_timeout=0.5)
    try:
        quota.apply_policy(POLICY)
        report = quota.check()
        assert report.ready, report.problems
        assert sum(s.groups_checked for s in report.shards) == 9
        assert all(s.version.startswith("7.") or s.version.startswith("6.") for s in report.shards)
        catalog_shard = quota.backend.node_of(quota.core.keyspace.catalog_route)  # type: ignore[attr-defined]
        victim = next(s for s in shards if f":{s.port}/" not in catalog_shard)
        victim.kill()
        report = quota.check()
        assert not report.ready
        assert any(f":{victim.port}/" in p and "unreachable" in p for p in report.problems)
        assert quota.check(allow_degraded=True).ready
    finally:
        quota.close()


@pytest.mark.real_redis
def test_flushed_scripts_are_reloaded_and_eviction_warned(shards: list[RedisServer]) -> None:
    """After SCRIPT FLUSH the check reloads the scripts (and says so); allkeys-lru is warned."""
    quota = QuotaClient.sharded(_urls(shards), socket_timeout=1.0)
    try:
        quota.apply_policy(POLICY)
        client: Any = shards[0].client()
        try:
            client.script_flush()
            client.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            client.close()
        report = quota.check()
        assert report.ready, report.problems
        first = next(s for s in report.shards if f":{shards[0].port}/" in s.name)
        assert "reloaded" in first.scripts
        assert any("allkeys-lru" in w for w in report.warnings)
    finally:
        quota.close()


@pytest.mark.real_redis
def test_missing_group_policy_is_not_ready(shards: list[RedisServer]) -> None:
    """A served group whose policy hash is gone (e.g. a shard restarted empty) fails the check."""
    quota = QuotaClient.sharded(_urls(shards), socket_timeout=1.0)
    try:
        quota.apply_policy(POLICY)
        quota.backend.connection("g3").delete(quota.core.keyspace.group("g3").policy)
        report = quota.check()
        assert not report.ready
        assert any("'g3'" in p for p in report.problems)
        assert quota.check(["g1", "g2"]).ready
    finally:
        quota.close()


#: The ACL rule documented in docs/deployment.md (kept identical by this test).
MINIMAL_ACL = (
    "on >secret ~rq:* resetchannels -@all +ping +info +get +getrange +set +del +hmget +evalsha "
    "+eval +script|load +script|exists +time +hget +hgetall +hset +hdel +hincrby +pexpire +pttl "
    "+zadd +zrem +zscore +zrange +zrangebyscore +zrangebylex"
)


@pytest.mark.real_redis
def test_minimal_acl_is_enough(shards: list[RedisServer]) -> None:
    """A user with exactly the documented ACL can publish, acquire, release, snapshot and check."""
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
    assert MINIMAL_ACL.split(" ", 2)[2] in " ".join(doc.read_text(encoding="utf-8").split())
    for server in shards:
        client: Any = server.client()
        try:
            client.execute_command("ACL", "SETUSER", "quota", *MINIMAL_ACL.split())
        finally:
            client.close()
    quota = QuotaClient.sharded(_urls(shards, "quota:secret@"), socket_timeout=1.0)
    try:
        quota.apply_policy(POLICY)
        with quota.acquire("t1", 2) as lease:
            assert quota.snapshot("g1").used == 2
            assert lease.renew().renewed
        report = quota.check()
        assert report.ready, report.problems
    finally:
        quota.close()


@pytest.mark.real_redis
def test_user_without_script_rights_is_not_ready(shards: list[RedisServer]) -> None:
    """An ACL that forbids scripts (a common misconfiguration) is caught by the check."""
    for server in shards:
        client: Any = server.client()
        try:
            client.execute_command(
                "ACL", "SETUSER", "quota", "on", ">secret", "~*", "+@all", "-@scripting"
            )
        finally:
            client.close()
    admin = QuotaClient.sharded(_urls(shards), socket_timeout=1.0)
    admin.apply_policy(POLICY)
    admin.close()
    quota = QuotaClient.sharded(_urls(shards, "quota:secret@"), socket_timeout=1.0)
    try:
        report = quota.check()
        assert not report.ready
        assert any("scripts cannot be" in p for p in report.problems)
        assert any("TIME is not allowed" in p for p in report.problems)
    finally:
        quota.close()


@pytest.mark.real_redis
def test_check_command_exit_codes(
    shards: list[RedisServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """``ratequota check`` prints a table and exits 0 when ready, 1 when not (a readiness probe)."""
    args = ["check", "--shards", *_urls(shards), "--socket-timeout", "0.5"]
    assert main(args) == 1  # nothing published yet
    assert "no policy is published" in capsys.readouterr().out
    quota = QuotaClient.sharded(_urls(shards))
    quota.apply_policy(POLICY)
    quota.close()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "READY" in out
    assert out.splitlines()[0].split()[:3] == ["shard", "ok", "latency"]
    assert main([*args, "--group", "g1"]) == 0
    assert main([*args, "--group", "nope"]) == 1


@pytest.mark.real_redis
def test_async_check_on_shards(shards: list[RedisServer]) -> None:
    """``AsyncQuotaClient.check`` gives the same verdicts: ready, then a killed shard named."""
    import asyncio

    from ratequota.clients.aio import AsyncQuotaClient

    async def scenario() -> None:
        quota = AsyncQuotaClient.sharded(_urls(shards), socket_timeout=0.5)
        async with quota:
            await quota.apply_policy(POLICY)
            report = await quota.check()
            assert report.ready, report.problems
            assert sum(s.groups_checked for s in report.shards) == 9
            catalog = quota.backend.node_of(quota.core.keyspace.catalog_route)
            victim = next(s for s in shards if f":{s.port}/" not in catalog)
            victim.kill()
            report = await quota.check()
            assert not report.ready
            assert any(f":{victim.port}/" in p for p in report.problems)

    asyncio.run(scenario())


@pytest.mark.real_redis
def test_a_hung_shard_is_reported_not_waited_for(shards: list[RedisServer]) -> None:
    """A shard that accepts connections but never answers (SIGSTOP) is reported unreachable."""
    quota = QuotaClient.sharded(_urls(shards), socket_timeout=0.3)
    try:
        quota.apply_policy(POLICY)
        catalog = quota.backend.node_of(quota.core.keyspace.catalog_route)  # type: ignore[attr-defined]
        victim = next(s for s in shards if f":{s.port}/" not in catalog)
        victim.pause()
        try:
            report = quota.check()
        finally:
            victim.resume()
        assert not report.ready
        assert any(f":{victim.port}/" in p and "unreachable" in p for p in report.problems)
        assert quota.check().ready
    finally:
        quota.close()


def test_table_of_a_degraded_report() -> None:
    """An unreachable shard shows no policy count; tolerated problems are labelled degraded."""
    down = healthy("s2", error="refused", holds_catalog=False)
    strict = evaluate([healthy(), down], catalog_present=True)
    row = next(line for line in strict.table().splitlines() if line.startswith("s2"))
    assert row.split()[:2] == ["s2", "NO"]
    assert "1/1" not in row
    assert "problem: s2: unreachable" in strict.table()
    degraded = evaluate([healthy(), down], catalog_present=True, allow_degraded=True)
    assert "degraded: s2: unreachable" in degraded.table()
    assert degraded.table().splitlines()[-1] == "READY"


# -- persistence (issue 9): a warning, with what it costs ---------------------------------


@pytest.mark.parametrize(
    ("aof", "save", "expected"),
    [
        ("1", "", "aof"),
        ("0", "3600 1 300 100", "rdb"),
        ("1", "3600 1", "aof+rdb"),
        ("0", "", "none"),
        ("0", None, "unknown"),  # CONFIG GET refused (ACL, managed service)
        (None, "", "unknown"),  # INFO refused
        ("1", None, "aof"),
    ],
)
def test_persistence_verdict(aof: str | None, save: str | None, expected: str) -> None:
    """Only a server known to have neither AOF nor RDB save points is warned about; the pod
    stays ready either way."""
    info = dict(INFO) if aof is None else {**INFO, "aof_enabled": aof}
    report = evaluate([healthy(info=info, save_points=save)], catalog_present=True)
    assert report.ready
    assert report.shards[0].persistence == expected
    warned = [w for w in report.warnings if "no persistence" in w]
    assert bool(warned) == (expected == "none")
    if warned:
        assert "recovery window" in warned[0] and "appendonly yes" in warned[0]
    assert expected in report.table()


@pytest.fixture
def persistence_servers() -> Iterator[dict[str, RedisServer]]:
    """Three private servers: no persistence, AOF, RDB save points."""
    if redis_server_binary() is None:
        _no_redis()
    started: dict[str, RedisServer] = {}
    try:
        started["none"] = RedisServer().start()
        started["aof"] = RedisServer(extra_args=("--appendonly", "yes")).start()
        started["rdb"] = RedisServer(extra_args=("--save", "3600 1")).start()
        yield started
    finally:
        for server in started.values():
            server.cleanup()


@pytest.mark.real_redis
def test_check_warns_about_a_server_without_persistence(
    persistence_servers: dict[str, RedisServer],
) -> None:
    """Sync and async ``check()`` on real servers: only the one without AOF and RDB is warned
    about, and the pod stays ready."""
    import asyncio

    from ratequota.clients.aio import AsyncQuotaClient

    urls = {kind: server.url for kind, server in persistence_servers.items()}
    for kind, url in urls.items():
        quota = QuotaClient(url, socket_timeout=2.0)
        try:
            quota.apply_policy(POLICY)
            report = quota.check()
        finally:
            quota.close()
        assert report.ready, report.problems
        assert report.shards[0].persistence == kind
        assert any("no persistence" in w for w in report.warnings) == (kind == "none")

        async def acheck(target: str) -> Any:
            client = AsyncQuotaClient(target, socket_timeout=2.0)
            try:
                return await client.check()
            finally:
                await client.close()

        areport = asyncio.run(acheck(url))
        assert areport.ready and areport.shards[0].persistence == kind
        assert areport.warnings == report.warnings


@pytest.mark.real_redis
def test_persistence_is_unknown_when_config_is_refused(
    persistence_servers: dict[str, RedisServer],
) -> None:
    """The documented ACL has no CONFIG: persistence shows as unknown, with no warning."""
    server = persistence_servers["none"]
    admin: Any = server.client()
    try:
        admin.execute_command("ACL", "SETUSER", "quota", *MINIMAL_ACL.split())
    finally:
        admin.close()
    publisher = QuotaClient(server.url)
    publisher.apply_policy(POLICY)
    publisher.close()
    quota = QuotaClient(f"redis://quota:secret@127.0.0.1:{server.port}/0", socket_timeout=2.0)
    try:
        report = quota.check()
    finally:
        quota.close()
    assert report.ready, report.problems
    assert report.shards[0].persistence == "unknown"
    assert not any("no persistence" in w for w in report.warnings)
