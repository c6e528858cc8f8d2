"""A real 3-master Redis Cluster behind ``QuotaClient.cluster``.

The session's cluster (see ``redis_cluster`` in conftest) is shared by these
tests; each uses its own key prefix so they never see each other's state.
Checked here: no call is ever cross-slot, scripts reach every primary, a
NOSCRIPT on one primary is recovered, and a live group's slot can be
migrated to another node while threads keep acquiring and releasing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import KeySpace
from ratequota.engine.scripts import load_scripts
from ratequota.errors import BackendUnavailable
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisCluster

pytestmark = pytest.mark.real_redis


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _policy(groups: list[str], capacity: int = 8) -> Policy:
    return Policy(
        [
            GroupPolicy(g, capacity=capacity, tenants=[TenantPolicy(f"{g}/{t}") for t in "ab"])
            for g in groups
        ]
    )


def _client(cluster: RedisCluster, prefix: str, **options: Any) -> QuotaClient:
    options.setdefault("socket_timeout", 2.0)
    options.setdefault("catalog_ttl", 3600.0)
    return QuotaClient.cluster(cluster.url, prefix=prefix, **options)


def test_many_groups_across_all_primaries_without_crossslot(redis_cluster: RedisCluster) -> None:
    """Acquire/release on 60 groups (odd names too) spread over every primary, and their usage
    read back; never CROSSSLOT."""
    prefix = _prefix()
    groups = [f"grp-{i}" for i in range(50)] + [
        "{braces}",
        "a:b:c",
        "with space",
        "ünï",
        "%7B",
        "#catalog",
        "x" * 1000,
        "}{",
        "{",
        "}",
    ]
    quota = _client(redis_cluster, prefix)
    try:
        quota.apply_policy(_policy(groups))
        keyspace = KeySpace(prefix=prefix)
        owners = {
            redis_cluster.owner(key_slot(keyspace.group(g).policy.encode())).port for g in groups
        }
        assert len(owners) == 3
        leases = []
        for g in groups:
            decision = quota.try_acquire(f"{g}/a", 3)
            assert decision.admitted, decision
            leases.append(decision.lease)
        for g in groups:
            assert quota.snapshot(g).used == 3
        for lease in leases:
            assert lease is not None
            assert quota.release(lease).state == "released"
        for g in groups[::7]:  # the usage ledger's hours, pipelined in the group's slot
            assert [(r.tenant, r.leases) for r in quota.usage(g)] == [(f"{g}/a", 1)]
        for node in redis_cluster.nodes:  # Redis counts every error reply it sent
            client: Any = node.client()
            try:
                assert "errorstat_CROSSSLOT" not in client.info("errorstats")
            finally:
                client.close()
    finally:
        quota.close()


def test_scripts_are_loaded_on_every_primary(redis_cluster: RedisCluster) -> None:
    """Creating a client touches no node; entering it (``with``) loads every script on every
    primary (SCRIPT EXISTS on each node)."""
    shas = [spec.sha for spec in load_scripts().values()]
    for node in redis_cluster.nodes:
        client = node.client()
        try:
            client.script_flush()
        finally:
            client.close()
    quota = _client(redis_cluster, _prefix())
    try:
        for node in redis_cluster.nodes:
            client = node.client()
            try:
                assert not any(client.script_exists(*shas))
            finally:
                client.close()
        with quota:
            pass
        for node in redis_cluster.nodes:
            client = node.client()
            try:
                assert all(client.script_exists(*shas))
            finally:
                client.close()
    finally:
        quota.close()


def test_noscript_on_one_primary_is_reloaded(redis_cluster: RedisCluster) -> None:
    """After ``SCRIPT FLUSH`` on one primary (as after a failover) its groups work again at once."""
    prefix = _prefix()
    groups = [f"n{i}" for i in range(12)]
    quota = _client(redis_cluster, prefix)
    try:
        quota.apply_policy(_policy(groups))
        victim = redis_cluster.nodes[1]
        client = victim.client()
        try:
            client.script_flush()
        finally:
            client.close()
        for g in groups:
            decision = quota.try_acquire(f"{g}/a", 1)
            assert decision.admitted
            assert decision.lease is not None
            quota.release(decision.lease)
    finally:
        quota.close()


def _redirects(node: Any) -> tuple[int, int]:
    """(ASK, MOVED) error replies a node has sent so far (Redis 7 ``INFO errorstats``)."""
    client = node.client()
    try:
        stats = client.info("errorstats")
    finally:
        client.close()
    return (
        int(stats.get("errorstat_ASK", {}).get("count", 0)),
        int(stats.get("errorstat_MOVED", {}).get("count", 0)),
    )


def test_live_slot_migration_loses_and_doubles_nothing(redis_cluster: RedisCluster) -> None:
    """A group's slot moves to another node while four threads acquire and release.

    All of the group's keys are present throughout (an anchor lease and a
    waiting request keep them alive), so every call during the migration is
    served: by the source, by the target after an ASK redirection, and by the
    target after MOVED. Each thread keeps a ledger of what it holds; at every
    step of the end the group's own count must equal the ledgers' sum.
    """
    prefix = _prefix()
    group = "migrating"
    policy = Policy(
        [
            GroupPolicy(
                group,
                capacity=20,
                tenants=[
                    TenantPolicy("anchor", guarantee=1, borrow_limit=0),
                    *(TenantPolicy(f"w{i}", guarantee=4, borrow_limit=0) for i in range(4)),
                ],
            )
        ]
    )
    quota = _client(redis_cluster, prefix, lease_ttl=120.0)
    try:
        quota.apply_policy(policy)
        anchor = quota.try_acquire("anchor", 1).lease
        assert anchor is not None
        # A second request of the anchor tenant waits all along, keeping the queue key alive.
        waiter_done = threading.Event()
        waiter_errors: list[BaseException] = []

        def waiter() -> None:
            try:
                with quota.acquire("anchor", 1, timeout=60):
                    pass
            except BaseException as exc:  # reported by the test
                waiter_errors.append(exc)
            finally:
                waiter_done.set()

        waiting = threading.Thread(target=waiter)
        waiting.start()
        time.sleep(0.2)

        stop = threading.Event()
        ledgers: list[dict[str, Any]] = [{} for _ in range(4)]  # lease id -> LeaseInfo, 1 unit each
        ops = [0] * 4
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            held = ledgers[i]
            deadline = time.monotonic() + 40
            for n in range(100_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    if len(held) < 3:
                        decision = quota.try_acquire(f"w{i}", 1, request_id=f"w{i}-{n}")
                        if decision.admitted and decision.lease is not None:
                            held[decision.lease.id] = decision.lease
                    else:
                        lease_id = next(iter(held))
                        assert quota.release(held[lease_id]).state == "released"
                        del held[lease_id]
                    ops[i] += 1
                except BaseException as exc:  # reported by the test
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        slot = key_slot(KeySpace(prefix=prefix).group(group).policy.encode())
        source = redis_cluster.owner(slot)
        target = next(n for n in redis_cluster.nodes if n is not source)
        redirects_before = _redirects(source)
        time.sleep(0.2)
        moved = redis_cluster.migrate_slot(slot, target, pause=0.4)
        time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:3]
        # Every key of the group, the previous layout's tombstone of its policy and the usage
        # ledger's hours the calls named (all in the same slot): two, or three when the calls
        # straddle a half hour, where the neighbouring hour a call names changes
        # (``engine.ledger.ledger_hours``).
        ledger_hours = moved - len(KeySpace(prefix=prefix).group(group).all) - 1
        assert ledger_hours in (2, 3), moved
        asks, moves = (a - b for a, b in zip(_redirects(source), redirects_before, strict=True))
        assert asks > 0, "no call met the ASK state: the test did not exercise it"
        assert moves > 0, "no call met a MOVED redirection after the migration"
        assert redis_cluster.owner(slot) is target
        assert all(n > 0 for n in ops)

        held_units = sum(len(ledger) for ledger in ledgers) + 1  # + the anchor
        assert quota.snapshot(group).used == held_units
        for ledger in ledgers:
            for lease in ledger.values():
                assert quota.release(lease).state == "released"
        assert quota.release(anchor).state == "released"
        assert waiter_done.wait(30)
        assert not waiter_errors
        assert quota.snapshot(group).used == 0
        # The keys now live only on the target.
        client = target.client()
        try:
            assert client.exists(KeySpace(prefix=prefix).group(group).policy) == 1
        finally:
            client.close()
    finally:
        quota.close()


def test_unreachable_cluster_is_backend_unavailable() -> None:
    """Nothing listens at the URL: the client is built (no I/O in a constructor), and the
    first call raises ``BackendUnavailable``, not a redis-py error."""
    from tests.servers import free_port

    quota = QuotaClient.cluster(f"redis://127.0.0.1:{free_port()}", socket_timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable):
            quota.try_acquire("a", units=1)
    finally:
        quota.close()


@pytest.mark.parametrize(("version", "warned"), [("8.1.0", True), ("8.2.0", False), ("9.0", False)])
def test_an_async_cluster_client_warns_on_a_redis_py_too_old_for_it(
    monkeypatch: pytest.MonkeyPatch, version: str, warned: bool
) -> None:
    """redis-py before 8.2 can let AttributeError escape its asyncio cluster client under
    load: building an async cluster client on one warns, naming the version found."""
    import warnings

    from ratequota import AsyncQuotaClient
    from tests.servers import free_port

    monkeypatch.setattr(redis, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quota = AsyncQuotaClient.cluster(f"redis://127.0.0.1:{free_port()}", socket_timeout=0.5)
    asyncio.run(quota.close())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert bool(messages) == warned, messages
    if warned:
        assert "8.2" in messages[0] and version in messages[0]
        assert caught[0].filename == __file__  # pointed at the caller's line


def test_a_cluster_client_connects_on_first_use(redis_cluster: RedisCluster) -> None:
    """Building the client discovers nothing: a pod that starts while its seed node is paused
    starts anyway (the fault harness saw pods die in the constructor), and the first call
    connects."""
    quota = _client(redis_cluster, _prefix())
    try:
        assert quota.backend._client is None  # type: ignore[attr-defined]
        quota.apply_policy(_policy(["g"]))
        assert quota.try_acquire("g/a", units=1).admitted
        assert quota.backend._client is not None  # type: ignore[attr-defined]
    finally:
        quota.close()


def test_cluster_client_never_retries_a_timeout(redis_cluster: RedisCluster) -> None:
    """The cluster client is built with redis-py's retries off: only redirections are followed."""
    quota = _client(redis_cluster, _prefix())
    try:
        cluster: Any = quota.backend.connection("g")
        assert isinstance(cluster, redis.cluster.RedisCluster)
        assert cluster.retry.get_retries() == 0
    finally:
        quota.close()


def test_minimal_cluster_acl_is_enough(redis_cluster: RedisCluster) -> None:
    """A user with the documented ACL (the shard list plus the cluster extras) can do everything."""
    from pathlib import Path

    from tests.test_readiness import MINIMAL_ACL

    doc = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
    assert CLUSTER_ACL_EXTRA in doc.read_text(encoding="utf-8")
    rule = f"{MINIMAL_ACL} {CLUSTER_ACL_EXTRA}"
    for node in redis_cluster.nodes:
        client: Any = node.client()
        try:
            client.execute_command("ACL", "SETUSER", "quota", "reset", *rule.split())
        finally:
            client.close()
    prefix = "rq"  # the documented key pattern is ~rq:*
    groups = [f"acl-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
    port = redis_cluster.nodes[0].port
    quota = QuotaClient.cluster(
        f"redis://quota:secret@127.0.0.1:{port}", prefix=prefix, socket_timeout=2.0
    )
    try:
        quota.apply_policy(_policy(groups))
        for g in groups:
            with quota.acquire(f"{g}/a", 2) as lease:
                assert lease.renew().renewed
        report = quota.check()
        assert report.ready, report.problems
        assert len(report.shards) == 3
    finally:
        quota.close()
        for node in redis_cluster.nodes:
            client = node.client()
            try:
                client.execute_command("ACL", "DELUSER", "quota")
            finally:
                client.close()


#: What a Redis Cluster user needs beyond the shard ACL (docs/deployment.md).
CLUSTER_ACL_EXTRA = "+cluster|slots +asking +command"


def _flush_scripts(cluster: RedisCluster) -> None:
    for node in cluster.nodes:
        client: Any = node.client()
        try:
            client.script_flush()
        finally:
            client.close()


def test_batched_renewal_works_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """Renewing many leases at once (the background renewer's batch) works on a cluster.

    redis-py's cluster pipeline refuses EVALSHA, so cluster batches go call by
    call; scripts are flushed first so the batch's NOSCRIPT reload runs too.
    """
    from ratequota.clients.renewal import renew_many
    from ratequota.decision import RenewResult

    prefix = _prefix()
    groups = [f"r{i}" for i in range(9)]
    quota = _client(redis_cluster, prefix)
    try:
        quota.apply_policy(_policy(groups))
        with contextlib.ExitStack() as stack:
            leases = [stack.enter_context(quota.acquire(f"{g}/a", 1)) for g in groups]
            _flush_scripts(redis_cluster)
            outcomes = quota._run(renew_many(quota.core, leases, quota._node_of))
            assert all(isinstance(o, RenewResult) and o.renewed for o in outcomes), outcomes
        assert all(quota.snapshot(g).used == 0 for g in groups)
    finally:
        quota.close()


def test_async_client_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """``AsyncQuotaClient.cluster``: 200 concurrent acquisitions, scripts flushed midway, batches.

    Every lease is released at the end (no unit lost or doubled) and the
    async batch path (renewals) works although the cluster cannot pipeline.
    """
    from ratequota.clients.aio import AsyncQuotaClient
    from ratequota.clients.renewal import renew_many
    from ratequota.decision import RenewResult

    prefix = _prefix()
    groups = [f"a{i}" for i in range(9)]

    async def scenario() -> None:
        quota = AsyncQuotaClient.cluster(
            redis_cluster.url, prefix=prefix, socket_timeout=2.0, catalog_ttl=3600.0
        )
        async with quota:
            await quota.apply_policy(_policy(groups, capacity=4))

            async def one(i: int) -> None:
                async with quota.acquire(f"{groups[i % 9]}/a", 1, timeout=10):
                    await asyncio.sleep(0.001)

            await asyncio.gather(*(one(i) for i in range(100)))
            _flush_scripts(redis_cluster)
            await asyncio.gather(*(one(i) for i in range(100)))
            held = [await quota.acquire(f"{g}/b", 1).__aenter__() for g in groups]
            _flush_scripts(redis_cluster)
            outcomes = await quota._run(renew_many(quota.core, held, quota._node_of))
            assert all(isinstance(o, RenewResult) and o.renewed for o in outcomes), outcomes
            for lease in held:
                assert (await quota.release(lease)).state == "released"
            for g in groups:
                assert (await quota.snapshot(g)).used == 0
            assert sum(r.leases for r in await quota.usage(groups[0])) >= 1

    asyncio.run(scenario())


def _evalsha_calls(node: Any) -> int:
    client = node.client()
    try:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        client.close()


def test_a_timed_out_cluster_call_is_not_replayed(redis_cluster: RedisCluster) -> None:
    """A script call to a paused primary times out, raises at once, and reached Redis once.

    After the node resumes it runs the call it had received; its own command
    counter shows one EVALSHA, and a retry with the same request id returns
    the same lease (charged once).
    """
    prefix = _prefix()
    keyspace = KeySpace(prefix=prefix)
    node = redis_cluster.nodes[1]
    group = next(
        g
        for g in (f"p{i}" for i in range(1000))
        if redis_cluster.owner(key_slot(keyspace.group(g).policy.encode())) is node
    )
    quota = _client(redis_cluster, prefix, socket_timeout=0.3)
    try:
        # Loaded up front (by a client with a roomy timeout), else the paused call would
        # meet NOSCRIPT when the node resumes.
        with _client(redis_cluster, prefix):
            pass
        quota.apply_policy(_policy([group]))
        calls = _evalsha_calls(node)
        node.pause()
        try:
            with pytest.raises(BackendUnavailable):
                quota.try_acquire(f"{group}/a", 2, request_id="req-1")
        finally:
            node.resume()
        assert _evalsha_calls(node) == calls + 1
        retry = quota.try_acquire(f"{group}/a", 2, request_id="req-1")
        assert retry.lease is not None
        assert retry.lease.replay
        assert quota.snapshot(group).used == 2
    finally:
        quota.close()


def test_check_on_a_cluster_sync_and_async(redis_cluster: RedisCluster) -> None:
    """Both clients' readiness checks report every primary, with policies found on their nodes."""
    from ratequota.clients.aio import AsyncQuotaClient

    prefix = _prefix()
    groups = [f"c{i}" for i in range(12)]
    quota = _client(redis_cluster, prefix)
    try:
        quota.apply_policy(_policy(groups))
        report = quota.check()
        assert report.ready, report.problems
        assert len(report.shards) == 3
        assert sum(s.groups_checked for s in report.shards) == 12
    finally:
        quota.close()

    async def scenario() -> None:
        aquota = AsyncQuotaClient.cluster(redis_cluster.url, prefix=prefix, socket_timeout=2.0)
        async with aquota:
            areport = await aquota.check()
            assert areport.ready, areport.problems
            assert sorted(s.name for s in areport.shards) == sorted(s.name for s in report.shards)
            assert sum(s.groups_checked for s in areport.shards) == 12
            missing = await aquota.check(["never-published"])
            assert not missing.ready

    asyncio.run(scenario())

    from ratequota.cli import main

    assert main(["check", "--cluster", redis_cluster.url, "--prefix", prefix]) == 0
    assert main(["check", "--cluster", redis_cluster.url, "--prefix", _prefix()]) == 1
