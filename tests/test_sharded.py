"""Independent shards on real redis-server processes, and the scripts' lifecycle on them.

Three servers stand behind ``QuotaClient.sharded``. Tests check that each
group lives on the shard rendezvous hashing picks, that a ``SCRIPT FLUSH`` or
a killed-and-restarted shard is survived by the clients already running, and
that nothing but NOSCRIPT is ever replayed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ratequota.clients.backends import ShardedBackend
from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import KeySpace
from ratequota.engine.routing import Rendezvous
from ratequota.errors import BackendUnavailable, PolicyMissing
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import _no_redis
from tests.servers import RedisServer, redis_server_binary, script_calls

pytestmark = pytest.mark.real_redis

GROUPS = [f"g{i}" for i in range(12)]
POLICY = Policy(
    [
        GroupPolicy(g, capacity=8, tenants=[TenantPolicy(f"t-{g}"), TenantPolicy(f"u-{g}")])
        for g in GROUPS
    ]
)


@pytest.fixture(scope="module")
def shard_servers() -> Iterator[list[RedisServer]]:
    """Three redis-servers for this module, stopped by PID at the end."""
    if redis_server_binary() is None:
        _no_redis()
    servers: list[RedisServer] = []
    try:
        for _ in range(3):
            servers.append(RedisServer().start())
        yield servers
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
def shards(shard_servers: list[RedisServer]) -> list[RedisServer]:
    """The module's shards, running and emptied for this test."""
    for server in shard_servers:
        if server.process is None:
            server.start()
        client = server.client()
        try:
            client.flushall()
            client.script_flush()
        finally:
            client.close()
    return shard_servers


def _client(shards: list[RedisServer], **options: object) -> QuotaClient:
    options.setdefault("socket_timeout", 2.0)
    options.setdefault("catalog_ttl", 3600.0)
    return QuotaClient.sharded([s.url for s in shards], **options)  # type: ignore[arg-type]


def _shard_of(shards: list[RedisServer], group: str) -> RedisServer:
    return shards[Rendezvous([s.url for s in shards]).index(group)]


def _held_on(server: RedisServer, group: str) -> int:
    """Units held in ``group`` according to the demand hash on ``server``."""
    client: Any = server.client()
    try:
        demand = client.hgetall(KeySpace().group(group).demand)
    finally:
        client.close()
    return sum(int(v) for k, v in demand.items() if str(k, "utf-8").startswith("u:"))


def test_each_group_lives_on_its_rendezvous_shard(shards: list[RedisServer]) -> None:
    """Leases and policy of a group are written only to the shard the routing picks."""
    quota = _client(shards)
    try:
        quota.apply_policy(POLICY)
        leases = [quota.try_acquire(f"t-{g}", 3).lease for g in GROUPS]
        owners = {_shard_of(shards, g).port for g in GROUPS}
        assert len(owners) > 1, "12 groups should spread over more than one shard"
        for g in GROUPS:
            for server in shards:
                expected = 3 if server is _shard_of(shards, g) else 0
                assert _held_on(server, g) == expected
        for lease in leases:
            assert lease is not None
            assert quota.release(lease).state == "released"
    finally:
        quota.close()


def test_shard_ids_decouple_placement_from_urls(shards: list[RedisServer]) -> None:
    """With explicit shard ids, placement follows the ids, whatever the URLs are."""
    backend = ShardedBackend([s.url for s in shards], socket_timeout=1.0, shard_ids=["a", "b", "c"])
    try:
        ring = Rendezvous(["a", "b", "c"])
        for g in GROUPS:
            assert backend.connection(g) is backend.connections()[ring.index(g)]
            assert backend.node_of(g) == ring.shard(g)
    finally:
        backend.close()


def _churn(
    quota: QuotaClient,
    tenant: str,
    stop: threading.Event,
    errors: list[BaseException],
    counts: list[int],
) -> None:
    """Acquire and release in a loop until ``stop`` (bounded by count and time)."""
    deadline = time.monotonic() + 30
    for _ in range(100_000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        try:
            with quota.acquire(tenant, 1, timeout=5):
                counts[0] += 1
        except BaseException as exc:  # collected and asserted on by the test
            errors.append(exc)
            return


def test_script_flush_mid_run_is_survived(shards: list[RedisServer]) -> None:
    """``SCRIPT FLUSH`` on every shard while threads run: NOSCRIPT reloads, no call fails.

    Afterwards no units are held (nothing lost, nothing doubled).
    """
    quota = _client(shards)
    try:
        quota.apply_policy(POLICY)
        stop = threading.Event()
        errors: list[BaseException] = []
        counts = [[0] for _ in range(4)]
        threads = [
            threading.Thread(target=_churn, args=(quota, f"t-{GROUPS[i]}", stop, errors, counts[i]))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for _ in range(3):
            time.sleep(0.15)
            for server in shards:
                client = server.client()
                try:
                    client.script_flush()
                finally:
                    client.close()
        time.sleep(0.15)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert all(c[0] > 0 for c in counts)
        for g in GROUPS:
            assert quota.snapshot(g).used == 0
    finally:
        quota.close()


def test_killed_and_restarted_shard(shards: list[RedisServer]) -> None:
    """A shard's redis-server is killed and restarted; the clients recover without being recreated.

    While the shard is down its groups raise ``BackendUnavailable`` (soon
    without waiting: the shard's circuit breaker opens) and the other shards
    keep serving. Nothing is persisted, so after the restart the shard is
    empty: the first call restores its groups' policy (core._restore_policy),
    which opens the group's recovery window: new work is refused as
    ``recovering`` while the holders of leases granted before the crash
    re-assert them by renewing; after the window (driven on a ManualClock
    pinning the Redis time the scripts see), every lease granted after the
    restart is accounted exactly once.
    """
    clock = ManualClock()

    def pod() -> QuotaClient:
        backend = ShardedBackend([s.url for s in shards], socket_timeout=2.0)
        return QuotaClient(backend=backend, clock=clock, catalog_ttl=3600.0, breaker_reset=0.2)

    pod_a, pod_b = pod(), pod()
    try:
        pod_a.apply_policy(POLICY)
        victim = _shard_of(shards, GROUPS[0])
        down = [g for g in GROUPS if _shard_of(shards, g) is victim]
        up = [g for g in GROUPS if _shard_of(shards, g) is not victim]
        assert up, "the test needs groups on another shard"
        before = [pod_b.try_acquire(f"t-{g}", 2, group=g).lease for g in down]

        victim.kill()
        for g in down:
            with pytest.raises(BackendUnavailable):
                pod_b.try_acquire(f"t-{g}", 1, group=g)
        for g in up:  # the other shards are unaffected
            lease = pod_b.try_acquire(f"t-{g}", 1, group=g).lease
            assert lease is not None
            pod_b.release(lease)

        victim.start()  # same port, empty, no scripts loaded
        clock.advance(0.3)  # the shard's circuit breaker lets a probe through after breaker_reset
        # The first call restores the lost group policy: from the catalog, or, if the catalog
        # was on the same shard and is gone too, from the policy pod_a last published.
        restored = pod_a.try_acquire(f"t-{down[0]}", 1, group=down[0])
        assert restored.reason == "recovering"
        window = POLICY.groups[0].max_lease_ttl
        assert 0 < restored.retry_after <= window
        for lease in before:  # the holders re-assert what they hold; nothing new gets in
            assert lease is not None
            assert pod_b.renew(lease).reason == "reasserted"
        for g in down:
            assert _held_on(victim, g) == 2
            assert pod_a.try_acquire(f"u-{g}", 1, group=g).reason == "recovering"
        clock.advance(window)  # the window is over; the re-asserted leases have expired too
        for lease in before:
            assert lease is not None
            assert pod_b.release(lease).state in ("expired", "unknown")
        after = []
        for g in down:
            for pod in (pod_a, pod_b):
                decision = pod.try_acquire(f"u-{g}", 3, group=g)
                assert decision.admitted
                after.append(decision.lease)
        for g in down:
            assert pod_a.snapshot(g).used == 6 == _held_on(victim, g)
        for lease in after:
            assert lease is not None
            assert pod_a.release(lease).state == "released"
        assert all(pod_b.snapshot(g).used == 0 for g in GROUPS)
    finally:
        pod_a.close()
        pod_b.close()


def _evalsha_calls(server: RedisServer) -> int:
    """Script calls the server ran: by ``EVALSHA`` or as functions (``FCALL``)."""
    client = server.client()
    try:
        return script_calls(client)
    finally:
        client.close()


def test_a_timed_out_script_call_is_not_replayed(shards: list[RedisServer]) -> None:
    """A call that times out raises at once and is sent exactly once.

    The server is paused so the call times out; once resumed it runs the
    call it had already received. Redis's own command counter shows one
    EVALSHA, and retrying with the same request id returns the same lease
    (charged once), which is how callers retry safely.
    """
    quota = _client(shards, socket_timeout=0.3)
    try:
        # Loaded up front (by a client with a roomy timeout), else the paused call would
        # meet NOSCRIPT when the server resumes.
        with _client(shards):
            pass
        quota.apply_policy(POLICY)
        group = GROUPS[1]
        server = _shard_of(shards, group)
        calls = _evalsha_calls(server)
        server.pause()
        try:
            with pytest.raises(BackendUnavailable):
                quota.try_acquire(f"t-{group}", 2, group=group, request_id="req-1")
        finally:
            server.resume()
        assert _evalsha_calls(server) == calls + 1
        retry = quota.try_acquire(f"t-{group}", 2, group=group, request_id="req-1")
        assert retry.admitted
        assert retry.lease is not None
        assert retry.lease.replay
        assert quota.snapshot(group).used == 2
    finally:
        quota.close()


def test_groups_on_healthy_shards_survive_the_catalog_shard_going_down(
    shards: list[RedisServer],
) -> None:
    """The routing catalog lives on one shard; when that shard dies, the others keep serving.

    The client keeps routing tenants by the catalog it last read, so only the
    dead shard's own groups fail.
    """
    quota = _client(shards, catalog_ttl=0.05)
    try:
        quota.apply_policy(POLICY)
        catalog_shard = _shard_of(shards, quota.core.keyspace.catalog_route)
        healthy = [g for g in GROUPS if _shard_of(shards, g) is not catalog_shard]
        assert healthy
        catalog_shard.kill()
        time.sleep(0.1)  # the catalog is stale now: the next call tries to re-read it
        for g in healthy:
            decision = quota.try_acquire(f"t-{g}", 1)  # routed by tenant, not by group=
            assert decision.admitted
            assert decision.lease is not None
            quota.release(decision.lease)
    finally:
        quota.close()


def test_shard_killed_and_restarted_while_threads_run(shards: list[RedisServer]) -> None:
    """Threads acquire and release on every group while one shard is killed and restarted.

    During the outage only ``BackendUnavailable`` (and, once the shard is
    back but empty, ``PolicyMissing``) may be raised, only for that shard's
    groups; once the policy is republished every thread succeeds again with
    the same clients, and in the end no group holds any unit.
    """
    quota = _client(shards, breaker_reset=0.1)
    try:
        quota.apply_policy(POLICY)
        victim = _shard_of(shards, GROUPS[0])
        on_victim = {g for g in GROUPS if _shard_of(shards, g) is victim}
        stop = threading.Event()
        unexpected: list[BaseException] = []
        outage_errors: list[str] = []
        successes: list[list[float]] = [[] for _ in range(4)]

        def worker(i: int) -> None:
            deadline = time.monotonic() + 30
            for n in range(100_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                g = GROUPS[(n + i) % len(GROUPS)]
                try:
                    decision = quota.try_acquire(f"t-{g}", 1, group=g)
                    if decision.lease is not None:
                        quota.release(decision.lease)
                    successes[i].append(time.monotonic())
                except (BackendUnavailable, PolicyMissing) as exc:
                    if g not in on_victim:
                        unexpected.append(exc)
                        return
                    outage_errors.append(type(exc).__name__)
                except BaseException as exc:  # reported by the test
                    unexpected.append(exc)
                    return

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        victim.kill()
        time.sleep(0.3)
        victim.start()
        time.sleep(0.2)
        quota.apply_policy(POLICY)
        republished = time.monotonic()
        time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not unexpected, unexpected[:3]
        assert "BackendUnavailable" in outage_errors
        assert all(any(t > republished for t in s) for s in successes)
        assert all(quota.snapshot(g).used == 0 for g in GROUPS)
    finally:
        quota.close()
