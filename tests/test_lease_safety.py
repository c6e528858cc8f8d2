"""Invariant 14 under real concurrency: live lease units never exceed C, nor G + B per tenant.

Many threads of several tenants (different weights, guarantees and borrow
limits) acquire, wait, renew, release and abandon leases on a real
redis-server, while a sampler thread continuously reads the group's raw keys
in one MULTI/EXEC (live leases with their expiry, the per-tenant counters and
Redis TIME) and the snapshot script. Afterwards no unit is held and every key
but the policy hash and the catalog carries an expiry.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import redis

from ratequota.clients.sync import QuotaClient
from ratequota.decision import LeaseInfo
from ratequota.engine.keys import GroupKeys
from ratequota.errors import QuotaExceeded
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

pytestmark = pytest.mark.real_redis

CAPACITY = 20
POLICY = GroupPolicy(
    "safety",
    capacity=CAPACITY,
    tenants=(
        TenantPolicy("heavy", guarantee=6, weight=3.0, borrow_limit=6),
        TenantPolicy("light", guarantee=4, weight=1.0),
        TenantPolicy("capped", guarantee=2, lendable=0.5, weight=0.5, borrow_limit=0),
        TenantPolicy("guest", guarantee=0, weight=2.0, borrow_limit=5),
    ),
)
CEILING = {t.name: t.ceiling for t in POLICY.tenants}
RUN_SECONDS = 3.0
THREADS_PER_TENANT = 3


def read_raw(conn: redis.Redis, keys: GroupKeys) -> tuple[Counter[str], Counter[str]]:
    """Live lease units per tenant (from exp + info at Redis TIME) and the counters, atomically."""
    pipe = conn.pipeline(transaction=True)
    pipe.time()
    pipe.zrange(keys.exp, 0, -1, withscores=True)
    pipe.hgetall(keys.info)
    pipe.hgetall(keys.demand)
    now_pair, members, infos, counters = pipe.execute()
    now_ms = now_pair[0] * 1000 + now_pair[1] // 1000
    live: Counter[str] = Counter()
    for member, expiry in members:
        if not member.startswith(b"L") or expiry <= now_ms:
            continue
        info = infos.get(member)
        assert info is not None, f"lease {member!r} has no info"
        units, _token, tenant = info.decode().split(":", 2)
        live[tenant] += int(units)
    held: Counter[str] = Counter()
    for field, value in counters.items():
        if field.startswith(b"u:"):
            held[field[2:].decode()] += int(value)
    return live, held


def worker(client: QuotaClient, tenant: str, seed: int, stop: threading.Event) -> None:
    """Acquire (waiting or not), hold briefly, sometimes renew, release or abandon; bounded."""
    rnd = random.Random(seed)
    held: list[LeaseInfo] = []
    deadline = time.monotonic() + RUN_SECONDS + 5
    while not stop.is_set() and time.monotonic() < deadline:
        units = rnd.choice([1, 1, 2, 3, 5])
        if rnd.random() < 0.3:
            try:
                with client.acquire(tenant, units, group=POLICY.name, timeout=0.05, ttl=2.0):
                    time.sleep(rnd.uniform(0, 0.01))
            except QuotaExceeded:  # timed out, or too large for a capped tenant
                pass
        else:
            ttl = rnd.choice([1.0, 2.0])
            decision = client.try_acquire(tenant, units, group=POLICY.name, ttl=ttl)
            if decision.lease is not None:
                held.append(decision.lease)
        if held and rnd.random() < 0.2:
            client.renew(rnd.choice(held), ttl=1.0)
        while len(held) > rnd.randint(0, 3):
            lease = held.pop(0)
            if rnd.random() < 0.1:
                continue  # abandoned: its units come back when it expires
            client.release(lease)
        time.sleep(rnd.uniform(0, 0.003))
    for lease in held:
        client.release(lease)


def test_invariant_14_under_concurrency(real_redis: RedisServer) -> None:
    """Sampled continuously, live units stay within C per group and G + B per tenant."""
    client = QuotaClient.from_url(real_redis.url, socket_timeout=10.0, pending_ttl=0.5)
    conn = real_redis.client()
    keys = client.core.keyspace.group(POLICY.name)
    violations: list[str] = []
    samples = 0
    stop = threading.Event()
    try:
        client.apply_policy(Policy([POLICY]))
        names = [t.name for t in POLICY.tenants]
        threads = [
            threading.Thread(target=worker, args=(client, name, 100 * i + j, stop), daemon=True)
            for i, name in enumerate(names)
            for j in range(THREADS_PER_TENANT)
        ]
        for thread in threads:
            thread.start()
        peak = 0
        end = time.monotonic() + RUN_SECONDS
        while time.monotonic() < end:
            live, counters = read_raw(conn, keys)
            snap = client.snapshot(POLICY.name)
            samples += 1
            peak = max(peak, sum(live.values()))
            for label, view in (("live leases", live), ("counters", counters)):
                if sum(view.values()) > CAPACITY:
                    violations.append(f"{label}: group holds {sum(view.values())} > {CAPACITY}")
                for tenant, units in view.items():
                    if units > CEILING[tenant]:
                        violations.append(f"{label}: {tenant} holds {units} > G+B")
            if snap.used > CAPACITY:
                violations.append(f"snapshot: group holds {snap.used}")
            for row in snap.tenants.values():
                if row.used > CEILING[row.name]:
                    violations.append(f"snapshot: {row.name} holds {row.used}")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a worker did not stop"
        assert not violations, violations[:10]
        assert samples > 20
        assert peak > CAPACITY // 2, "the run never loaded the group"

        # Abandoned leases expire (ttl <= 2 s); then nothing is held.
        time.sleep(2.1)
        assert client.snapshot(POLICY.name).used == 0
        client.release(LeaseInfo("purge-now", "light", POLICY.name, 1, 0, 0.0))
        live, counters = read_raw(conn, keys)
        assert sum(live.values()) == 0
        assert sum(counters.values()) == 0
        # Every key expires except the published policy and the catalog.
        # (And the previous key layout's tombstone of the group's policy: docs/deployment.md.)
        tombstone = client.core.keyspace.previous_layout(POLICY.name)[0]
        permanent = {
            keys.policy.encode(),
            client.core.keyspace.catalog.encode(),
            tombstone.encode(),
        }
        for key in conn.scan_iter(count=1000):
            if key not in permanent:
                assert conn.pttl(key) > 0, f"{key!r} never expires"
    finally:
        stop.set()
        client.close()
        conn.close()
