"""A real failover in a Redis Cluster: the promoted replica has no scripts, and nobody notices.

Redis does not copy the script cache to replicas, so after a failover the
new primary answers NOSCRIPT; the client (created before the failover, not
recreated) follows the MOVED redirection, reloads the script once, and every
lease granted before the failover is still there (the data was replicated).
This test starts its own small cluster so the session cluster stays as it is.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import KeySpace
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.conftest import _no_redis
from tests.servers import RedisCluster, redis_server_binary

pytestmark = pytest.mark.real_redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster for this module only, stopped by PID at the end."""
    if redis_server_binary() is None or shutil.which("redis-cli") is None:
        _no_redis()
    started = RedisCluster(masters=3).start()
    try:
        yield started
    finally:
        started.cleanup()


def test_failover_to_a_replica_without_scripts(cluster: RedisCluster) -> None:
    """Leases survive a coordinated failover; the first calls reload scripts on the new primary."""
    groups = [f"f{i}" for i in range(30)]
    keyspace = KeySpace()
    master = cluster.nodes[0]
    on_master = [
        g for g in groups if cluster.owner(key_slot(keyspace.group(g).policy.encode())) is master
    ]
    assert on_master
    quota = QuotaClient.cluster(cluster.url, socket_timeout=2.0, catalog_ttl=3600.0)
    try:
        quota.apply_policy(
            Policy([GroupPolicy(g, capacity=4, tenants=[TenantPolicy(f"{g}/t")]) for g in groups])
        )
        before = {g: quota.try_acquire(f"{g}/t", 1).lease for g in groups}
        replica = cluster.add_replica(master)
        client: Any = replica.client()
        try:
            shas = [spec.sha for spec in load_scripts().values()]
            assert not any(client.script_exists(*shas)), "the replica should start without scripts"
        finally:
            client.close()
        cluster.failover(replica)
        assert all(
            cluster.owner(key_slot(keyspace.group(g).policy.encode())) is replica for g in on_master
        )
        for g in groups:
            assert quota.snapshot(g).used == 1  # replicated: nothing lost
            decision = quota.try_acquire(f"{g}/t", 1)
            assert decision.admitted
            assert decision.lease is not None
            assert quota.release(decision.lease).state == "released"
            lease = before[g]
            assert lease is not None
            assert quota.release(lease).state == "released"
            assert quota.snapshot(g).used == 0
        client = replica.client()
        try:  # the new primary did answer NOSCRIPT, and now has the scripts that were used
            assert int(client.info("errorstats")["errorstat_NOSCRIPT"]["count"]) >= 1
            used = [load_scripts()[name].sha for name in ("acquire", "release", "snapshot")]
            assert all(client.script_exists(*used))
        finally:
            client.close()
    finally:
        quota.close()
