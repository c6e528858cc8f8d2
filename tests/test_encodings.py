"""The encodings Redis keeps a group's keys in: hashtables and skiplists, never listpacks.

A small hash or zset is a listpack in Redis, where every lookup scans and every write moves
the whole blob; the scripts keep a member or value longer than Redis's listpack limits in
each key of the decision path so that Redis converts them at their first write
(``lua/_codec.lua``, ``WIDE`` and ``WIDE_MEMBER``). Only a real redis-server has encodings,
so these tests run there. What they pin is a cost, but it is checked by what Redis reports,
not by timing.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from ratequota.engine.fairstate import WIDE_MEMBER
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.protocol import acquire_call, apply_policy_call, release_call
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.servers import RedisServer

pytestmark = pytest.mark.real_redis

GROUP = "enc"
NOW = 1_800_000_000_000
KEYSPACE = KeySpace(prefix="enc")
KEYS = KEYSPACE.group(GROUP)
POLICY = GroupPolicy(
    GROUP,
    capacity=100,
    tenants=tuple(TenantPolicy(f"t{i}", guarantee=5, weight=1.0 + i % 3) for i in range(10)),
    max_lease_ttl=60.0,
)


@pytest.fixture
def conn(real_redis: RedisServer) -> Any:
    client = redis.Redis.from_url(real_redis.url)
    for spec in load_scripts().values():
        client.script_load(spec.source)
    yield client
    client.close()


def run(conn: Any, made: ScriptCall) -> Any:
    return conn.evalsha(made.script.sha, len(made.keys), *made.keys, *made.args)


def acquire(conn: Any, tenant: str, rid: str, units: int = 1) -> int:
    """Admits ``units`` for ``tenant`` and returns the lease's token."""
    reply = run(
        conn,
        acquire_call(
            KEYSPACE,
            GROUP,
            tenant,
            units,
            rid,
            30_000,
            wait=False,
            pending_ms=1,
            purge=8,
            now_ms=NOW,
        ),
    )
    assert (reply[0], reply[1]) == (1, b"admitted"), reply
    return int(reply[3])


def encodings(conn: Any) -> dict[str, bytes]:
    return {
        name: conn.object("encoding", key)
        for name, key in (
            ("policy", KEYS.policy),
            ("demand", KEYS.demand),
            ("exp", KEYS.exp),
            ("info", KEYS.info),
            ("fair", KEYS.fair),
        )
    }


WIDE = {
    "policy": b"hashtable",
    "demand": b"hashtable",
    "exp": b"skiplist",
    "info": b"hashtable",
    "fair": b"skiplist",
}


def test_a_groups_keys_are_hashtables_and_skiplists_from_their_first_write(conn: Any) -> None:
    run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))
    tokens = {f"t{i}": acquire(conn, f"t{i}", f"r{i}", units=6) for i in range(10)}
    assert encodings(conn) == WIDE
    # The extra members sit beside the sentinels, where nothing reads them as state.
    assert conn.zscore(KEYS.exp, WIDE_MEMBER) == conn.zscore(KEYS.exp, "s:")
    assert conn.zscore(KEYS.fair, WIDE_MEMBER) == -1.0
    for i, (tenant, token) in enumerate(tokens.items()):
        reply = run(
            conn,
            release_call(KEYSPACE, GROUP, f"r{i}", tenant=tenant, token=token, purge=8, now_ms=NOW),
        )
        assert reply[0] == b"released", reply
    # The group is idle: what is left are the sentinels, and the keys still expire.
    assert conn.zrange(KEYS.exp, 0, -1) == [b"s:", WIDE_MEMBER.encode()]
    assert conn.zrange(KEYS.fair, 0, -1) == [WIDE_MEMBER.encode(), b"~"]
    assert encodings(conn) == WIDE
    assert all(conn.pttl(key) > 0 for key in (KEYS.demand, KEYS.exp, KEYS.info, KEYS.fair))


def test_a_new_policy_rebuilds_the_fair_zset_as_a_skiplist(conn: Any) -> None:
    run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))
    acquire(conn, "t1", "a", units=7)
    bigger = GroupPolicy(GROUP, capacity=200, tenants=POLICY.tenants, max_lease_ttl=60.0)
    assert run(conn, apply_policy_call(KEYSPACE, bigger, now_ms=NOW))[0] == 1
    assert encodings(conn) == WIDE


def test_zsets_an_earlier_release_created_are_served_and_upgraded_by_apply_policy(
    conn: Any,
) -> None:
    """The previous release wrote exp and fair without the long member: their listpacks are
    a whole state all the same (an acquire is admitted, not "recovering"), and the next
    apply_policy (each pod makes one at start) adds the member, keeping the keys' expiry."""
    run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))
    acquire(conn, "t1", "a", units=7)
    for key in (KEYS.exp, KEYS.fair):  # rewritten as the previous release left them
        members = conn.zrange(key, 0, -1, withscores=True)
        ttl = conn.pttl(key)
        conn.delete(key)
        conn.zadd(key, {m: s for m, s in members if m != WIDE_MEMBER.encode()})
        conn.pexpire(key, ttl)
    assert (conn.object("encoding", KEYS.exp), conn.object("encoding", KEYS.fair)) == (
        b"listpack",
        b"listpack",
    )
    acquire(conn, "t2", "b", units=7)
    acquire(conn, "t1", "c", units=1)
    assert conn.object("encoding", KEYS.fair) == b"listpack"

    assert run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))[0] == 0  # unchanged
    assert encodings(conn) == WIDE
    assert conn.zscore(KEYS.exp, WIDE_MEMBER) == conn.zscore(KEYS.exp, "s:")
    assert conn.zscore(KEYS.fair, WIDE_MEMBER) == -1.0
    assert all(conn.pttl(key) > 0 for key in (KEYS.exp, KEYS.fair))
    acquire(conn, "t3", "d")


def test_apply_policy_adds_no_member_to_a_zset_without_its_sentinel(conn: Any) -> None:
    """A zset without its sentinel is a lost state for the decisions (check_state): the
    upgrade must not make it look whole, nor create a key without an expiry."""
    run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))
    acquire(conn, "t1", "a")
    conn.zrem(KEYS.exp, "s:", WIDE_MEMBER)
    conn.delete(KEYS.fair)
    run(conn, apply_policy_call(KEYSPACE, POLICY, now_ms=NOW))
    assert conn.zrange(KEYS.exp, 0, -1) == [b"La"]
    assert not conn.exists(KEYS.fair)
