"""Histories in which Redis loses any of a group's keys: no admission on top of running leases.

DESIGN §4 (capacity and ceilings) must hold through the losses of docs/failure-modes.md:
any key of a group may vanish between two calls (eviction under ``allkeys-*``, a restart
without persistence, ``FLUSHALL``), alone or with others, the policy hash included, which
pods restore as ``ratequota.clients.router`` does (``recover_ms`` = the group's
``max_lease_ttl``). Hypothesis draws the histories: acquires (some waiting), releases,
renewals, clock steps and losses. The check is this file's own bookkeeping, not the
library's: the leases the pods were granted and still run (not released, not past the
expiry their last grant or renewal gave, not told ``lost`` or ``fenced`` by a renewal). At
every admission, those leases plus the new one must fit the capacity and the tenant's
ceiling. The same property runs on fakeredis and on a real redis-server.

The long fault run found the case this pins (a policy lost while the group recovered from
an earlier loss: the restore forgot the window and the group admitted a full capacity on
top of the leases still running).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from ratequota.decision import LeaseInfo
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.protocol import acquire_call, apply_policy_call, release_call, renew_call
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.servers import RedisServer

GROUP = "lh"
START_MS = 1_800_000_000_000
POLICY = GroupPolicy(
    GROUP,
    capacity=6,
    tenants=(
        TenantPolicy("a", guarantee=1, borrow_limit=2),
        TenantPolicy("b", guarantee=3, borrow_limit=1),
        TenantPolicy("c", guarantee=0, borrow_limit=3),
    ),
    max_lease_ttl=4.0,
)
#: Each tenant's ceiling, written out here rather than asked of the library.
CEILING = {"a": 3, "b": 4, "c": 3}
TENANTS = tuple(CEILING)
KEYS = ("policy", "demand", "exp", "info", "queue", "fair")

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.integers(0, 2),  # tenant
            st.integers(1, 3),  # units
            st.sampled_from([800, 1500, 2500]),  # ttl ms
            st.booleans(),  # wait
        ),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("renew"), st.integers(0, 20)),
        st.tuples(st.just("advance"), st.sampled_from([1, 5, 20, 100, 400, 1500])),
        st.tuples(st.just("lose"), st.sets(st.sampled_from(KEYS), min_size=1, max_size=2)),
    ),
    min_size=20,
    max_size=80,
)


@dataclass
class Running:
    """The leases the pods hold and still run: id -> (tenant, units, token, expiry ms)."""

    leases: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)

    def expire(self, now: int) -> None:
        """Drop the leases whose expiry has passed: their holders have stopped."""
        self.leases = {k: v for k, v in self.leases.items() if v[3] > now}

    def check_admission(self, tenant: str, units: int, now: int) -> None:
        """The new lease fits the capacity and the tenant's ceiling beside the running ones."""
        held = sum(v[1] for v in self.leases.values())
        mine = sum(v[1] for v in self.leases.values() if v[0] == tenant)
        detail = f"{tenant}+{units} at {now - START_MS} ms beside {self.leases}"
        assert held + units <= POLICY.capacity, "over capacity: " + detail
        assert mine + units <= CEILING[tenant], "over ceiling: " + detail


def run_history(conn: Any, ops: list[tuple[Any, ...]]) -> int:
    """Replays ``ops`` on ``conn``; returns how many acquires were admitted."""
    keyspace = KeySpace(prefix="lh")
    keys = keyspace.group(GROUP)

    def call(made: ScriptCall) -> Any:
        return conn.eval(made.script.source, len(made.keys), *made.keys, *made.args)

    now = START_MS
    call(apply_policy_call(keyspace, POLICY, now_ms=now))
    running = Running()
    admitted = serial = 0
    for op in ops:
        running.expire(now)
        kind = op[0]
        held = sorted(running.leases)
        if kind == "acquire":
            _, who, units, ttl, wait = op
            tenant = TENANTS[who]
            serial += 1
            made = acquire_call(
                keyspace, GROUP, tenant, units, f"r{serial}", ttl,
                wait=wait, pending_ms=2000, purge=2, now_ms=now,
            )  # fmt: skip
            reply = call(made)
            if reply[0] == -1 and reply[1] == b"no_policy":  # a pod restores it, then retries
                recover_ms = round(POLICY.max_lease_ttl * 1000)
                call(apply_policy_call(keyspace, POLICY, recover_ms=recover_ms, now_ms=now))
                reply = call(made)
            if reply[0] == 1:
                running.check_admission(tenant, units, now)
                running.leases[f"r{serial}"] = (tenant, units, int(reply[3]), int(reply[2]))
                admitted += 1
        elif kind == "release" and held:
            lease_id = held[op[1] % len(held)]
            tenant, _, token, _ = running.leases.pop(lease_id)
            call(release_call(keyspace, GROUP, lease_id, tenant=tenant, token=token, purge=2,
                              now_ms=now))  # fmt: skip
        elif kind == "renew" and held:
            lease_id = held[op[1] % len(held)]
            tenant, units, token, expiry = running.leases[lease_id]
            info = LeaseInfo(lease_id, tenant, GROUP, units, token, expiry / 1000)
            reply = call(renew_call(keyspace, info, 1500, purge=2, now_ms=now))
            if reply[0] == 1:
                running.leases[lease_id] = (tenant, units, token, int(reply[2]))
            elif reply[1] in (b"lost", b"fenced"):  # the holder stops
                del running.leases[lease_id]
        elif kind == "advance":
            now += op[1]
        elif kind == "lose":
            conn.delete(*[getattr(keys, name) for name in sorted(op[1])])
    return admitted


def test_no_admission_on_top_of_running_leases_on_fakeredis() -> None:
    """Any history of calls and losses (fakeredis)."""
    admitted = []

    @given(ops=operations)
    def prop(ops: list[tuple[Any, ...]]) -> None:
        admitted.append(run_history(fakeredis.FakeRedis(server=fakeredis.FakeServer()), ops))

    prop()
    assert sum(admitted) > 0, "no history admitted anything"


@pytest.mark.real_redis
def test_no_admission_on_top_of_running_leases_on_real_redis(real_redis: RedisServer) -> None:
    """The same property on a real redis-server."""
    conn = redis.Redis(host="127.0.0.1", port=real_redis.port)
    admitted = []

    @given(ops=operations)
    def prop(ops: list[tuple[Any, ...]]) -> None:
        conn.flushdb()
        admitted.append(run_history(conn, ops))

    try:
        prop()
    finally:
        conn.close()
    assert sum(admitted) > 0, "no history admitted anything"


def test_a_policy_lost_while_recovering_keeps_the_window() -> None:
    """The history the long fault run found, written out: the state is lost with a lease
    running, the group recovers, then the policy hash is lost too and a pod restores it."""
    ops: list[tuple[Any, ...]] = [
        ("acquire", 2, 3, 2500, False),  # c holds 3 until 2.5 s
        ("lose", {"demand"}),
        ("advance", 5),
        ("acquire", 1, 1, 1500, False),  # refused: recovering (the window opens)
        ("lose", {"policy"}),
        ("advance", 100),
        ("acquire", 1, 3, 2500, False),  # restores the policy: still recovering
        ("acquire", 0, 3, 2500, False),
    ]
    assert run_history(fakeredis.FakeRedis(server=fakeredis.FakeServer()), ops) == 1
