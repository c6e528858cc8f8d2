"""Rolling update from key schema 1 (the previous release) to 2: refused both ways, never doubled.

A pod of the previous release is played by its own scripts, kept verbatim in
``tests/golden/schema1/`` and run on the schema-1 keys of the same Redis. The
properties:

* a new pod on a group the previous release still serves refuses to publish
  it (``LegacyLayout``) and writes nothing, so it cannot admit beside it;
* publishing with ``migrate=True`` carries the live leases (units, expiry,
  token) and the fencing counter over: the new pod admits only what is left;
* from then on the previous release's pods refuse the group (their acquire and
  renew answer "schema", their readiness reads schema 2 and fails, their
  apply_policy refuses), and their release frees nothing twice;
* a group first published by the new release is tombstoned for the previous one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fakeredis
import pytest

from ratequota.clients.backends import embedded_backend
from ratequota.clients.readiness import GroupFacts, ShardFacts, evaluate
from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import PREVIOUS_SCHEMA, KeySpace
from ratequota.engine.protocol import tenant_spec
from ratequota.errors import LegacyLayout, PolicyMissing
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock

SCHEMA1 = Path(__file__).parent / "golden" / "schema1"
POLICY = GroupPolicy(
    "g", capacity=10, tenants=(TenantPolicy("a", guarantee=4), TenantPolicy("b", guarantee=4))
)


class OldPod:
    """The previous release's scripts on the previous layout's keys (its wire protocol)."""

    def __init__(self, conn: Any, clock: ManualClock) -> None:
        self.conn, self.clock = conn, clock
        self.keys = KeySpace().previous_layout(POLICY.name)
        lib = (SCHEMA1 / "_lib.lua").read_text(encoding="utf-8")
        self.source = {
            n: (SCHEMA1 / f"{n}.lua").read_text(encoding="utf-8")
            for n in ("acquire", "release", "renew", "apply_policy")
        }
        for name in ("acquire", "release", "renew"):
            self.source[name] = f"{lib}\n{self.source[name]}"

    def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self.conn.eval(self.source[name], len(keys), *keys, *args)

    def publish(self) -> list[Any]:
        pairs: list[Any] = []
        for t in POLICY.tenants:
            pairs += [t.name, tenant_spec(t)]
        args = [
            PREVIOUS_SCHEMA,
            POLICY.capacity,
            repr(POLICY.reserve),
            POLICY.unknown_tenants,
            tenant_spec(POLICY.default_tenant),
            int(POLICY.max_lease_ttl * 1000),
            "digest-1",
            self.clock.redis_ms(),
            0,
            *pairs,
        ]
        return list(self.run("apply_policy", self.keys[:1], args))

    def acquire(self, tenant: str, units: int, rid: str) -> list[Any]:
        now = self.clock.redis_ms()
        args = [now, PREVIOUS_SCHEMA, tenant, units, rid, 30_000, "0", 2000, 64]
        return list(self.run("acquire", self.keys, args))

    def release(self, rid: str, tenant: str, token: int) -> list[Any]:
        now = self.clock.redis_ms()
        return list(self.run("release", self.keys, [now, 1, rid, 64, tenant, str(token)]))

    def renew(self, rid: str, tenant: str, units: int, token: int) -> list[Any]:
        now = self.clock.redis_ms()
        args = [now, 1, rid, 30_000, 64, tenant, units, str(token), now + 30_000]
        return list(self.run("renew", self.keys, args))


Pods = tuple[OldPod, QuotaClient, Any, fakeredis.FakeServer]


@pytest.fixture
def pods() -> Pods:
    """An old pod and a new client on one fakeredis server, one clock."""
    server = fakeredis.FakeServer()
    clock = ManualClock()
    conn = fakeredis.FakeRedis(server=server)
    new = QuotaClient(backend=embedded_backend(server=server), clock=clock)
    return OldPod(conn, clock), new, conn, server


def test_new_pod_refuses_a_group_the_previous_release_serves(
    pods: Pods,
) -> None:
    """Without migrate, the new release neither publishes nor admits: no second capacity."""
    old, new, conn, server = pods
    assert old.publish()[0] == 1
    assert old.acquire("a", 6, "old-1")[0] == 1
    before = sorted(conn.keys("*"))
    with pytest.raises(LegacyLayout, match="migrate=True"):
        new.apply_policy(Policy([POLICY]))
    assert not conn.exists(KeySpace().group("g").policy)
    assert old.acquire("b", 2, "old-2")[0] == 1  # the old release still serves the group
    assert set(before) <= set(conn.keys("*"))
    assert not conn.exists(KeySpace().group("g").policy)
    # A new pod that never published: refused (and its readiness says no policy is published).
    fresh = QuotaClient(backend=embedded_backend(server=server))
    with pytest.raises(PolicyMissing):
        fresh.try_acquire("a", 1, group="g")


def test_migration_carries_leases_and_tokens_and_locks_the_old_release_out(
    pods: Pods,
) -> None:
    """migrate=True: old leases count in the new layout, tokens go on, old pods are refused."""
    old, new, conn, _ = pods
    old.publish()
    first = old.acquire("a", 6, "old-1")
    assert first[0] == 1
    old_token = int(first[3])
    new.apply_policy(Policy([POLICY]), migrate=True)

    snap = new.snapshot("g")
    assert snap.used == 6
    assert [(lease.id, lease.units, lease.token) for lease in snap.leases] == [
        ("old-1", 6, old_token)
    ]
    # Only what the old lease left: 4 units, whoever asks.
    assert not new.try_acquire("b", 5).admitted
    admitted = new.try_acquire("b", 4)
    assert admitted.lease is not None and admitted.lease.token > old_token
    assert not new.try_acquire("b", 1).admitted

    # The previous release: refused with its own "schema" error, never admitting.
    reply = old.acquire("a", 1, "old-2")
    assert (reply[0], reply[1], int(reply[9])) == (-1, b"schema", 2)
    assert old.renew("old-1", "a", 6, old_token)[1] == b"schema"
    assert old.publish() == [-1, 2]
    assert old.release("old-1", "a", old_token) == [b"unknown", 0]  # freed in the new layout only
    assert int(conn.hget(old.keys[0], "schema")) == 2  # what the old pods' readiness reads
    # The lease moved along: the new release frees it once.
    assert new.release(snap.leases[0]).state == "released"
    assert new.snapshot("g").used == 4


def test_group_first_published_by_the_new_release_is_tombstoned(
    pods: Pods,
) -> None:
    """A pod of the previous release can neither publish nor use a group the new one owns."""
    old, new, conn, _ = pods
    new.apply_policy(Policy([POLICY]))
    assert old.publish() == [-1, 2]
    assert old.acquire("a", 1, "old-1")[1] == b"schema"
    assert new.try_acquire("a", 10).admitted
    # Its readiness (the same evaluation, at the previous schema) reports it.
    facts = ShardFacts("shard", groups=(GroupFacts("g", conn.hget(old.keys[0], "schema"), b"1"),))
    report = evaluate([facts], catalog_present=True, schema=PREVIOUS_SCHEMA)
    assert not report.ready
    assert "key schema 2" in "\n".join(report.problems)
