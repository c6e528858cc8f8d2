"""Histories in which Redis loses any of a group's keys: no admission on top of running leases.

DESIGN §4 (capacity and ceilings) must hold through the losses of docs/failure-modes.md:
any key of a group may vanish between two calls (eviction under ``allkeys-*``, a restart
without persistence, ``FLUSHALL``), alone or with others, the policy hash included, which
pods restore as ``ratequota.clients.router`` does (``recover_ms`` = the group's
``max_lease_ttl``). Hypothesis draws the histories: acquires (some waiting, then retried
with their request id or withdrawn), batches of acquires and of releases as the async
client merges them, releases, renewals, clock steps and losses.

The check is this file's own bookkeeping, not the library's: the leases the pods were
granted and still run (not released, not past the expiry their last grant or renewal gave,
not told ``lost`` or ``fenced`` by a renewal). At every admission, those leases plus the
new one must fit the capacity and the tenant's ceiling. The same property runs on
fakeredis and on a real redis-server.

Looking into a failed long fault run found the case the last test pins: a policy lost
while the group recovered from an earlier loss. The restore forgot the window, and the
group admitted a full capacity on top of the leases still running.
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
from ratequota.engine.protocol import (
    acquire_call,
    acquire_many_call,
    apply_policy_call,
    release_call,
    release_many_call,
    renew_call,
)
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
        st.tuples(st.just("retry"), st.integers(0, 20)),
        st.tuples(st.just("withdraw"), st.integers(0, 20)),
        st.tuples(
            st.just("batch"),
            st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3), st.booleans()), max_size=3),
        ),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("release_many"), st.integers(1, 3)),
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

    def decided(made: ScriptCall) -> Any:
        """The call's reply; a lost policy is restored first, as a pod restores it."""
        reply = call(made)
        first = reply if made.script.name == "acquire" else (reply or [[0]])[0]
        if first[0] == -1 and first[1] == b"no_policy":
            recover_ms = round(POLICY.max_lease_ttl * 1000)
            call(apply_policy_call(keyspace, POLICY, recover_ms=recover_ms, now_ms=now))
            reply = call(made)
        return reply

    now = START_MS
    call(apply_policy_call(keyspace, POLICY, now_ms=now))
    running = Running()
    waiting: dict[str, tuple[str, int]] = {}  # request id -> (tenant, units), registered
    admitted = serial = 0

    def settle(lease_id: str, tenant: str, units: int, wait: bool, reply: Any) -> None:
        nonlocal admitted
        if reply[0] == 1 and reply[10] == 0:  # admitted now, not a replay
            running.check_admission(tenant, units, now)
            running.leases[lease_id] = (tenant, units, int(reply[3]), int(reply[2]))
            admitted += 1
        if reply[0] == 1:
            waiting.pop(lease_id, None)
        elif wait and reply[1] in (b"tenant_limit", b"group_full"):
            waiting[lease_id] = (tenant, units)

    for op in ops:
        running.expire(now)
        kind = op[0]
        held, pending = sorted(running.leases), sorted(waiting)
        if kind in ("acquire", "retry") and (kind == "acquire" or pending):
            if kind == "acquire":
                _, who, units, ttl, wait = op
                tenant = TENANTS[who]
                serial += 1
                lease_id = f"r{serial}"
            else:
                lease_id = pending[op[1] % len(pending)]
                (tenant, units), ttl, wait = waiting[lease_id], 1500, True
            made = acquire_call(
                keyspace, GROUP, tenant, units, lease_id, ttl,
                wait=wait, pending_ms=2000, purge=2, now_ms=now,
            )  # fmt: skip
            settle(lease_id, tenant, units, wait, decided(made))
        elif kind == "batch" and op[1]:
            requests = []
            for who, units, wait in op[1]:
                serial += 1
                requests.append((TENANTS[who], units, f"r{serial}", 1500, wait))
            many = acquire_many_call(keyspace, GROUP, requests, pending_ms=2000, purge=2,
                                     now_ms=now)  # fmt: skip
            for (tenant, units, lease_id, _, wait), reply in zip(
                requests, decided(many), strict=True
            ):
                settle(lease_id, tenant, units, wait, reply)
        elif kind == "withdraw" and pending:
            lease_id = pending[op[1] % len(pending)]
            tenant, _ = waiting.pop(lease_id)
            call(release_call(keyspace, GROUP, lease_id, tenant=tenant, token=0, purge=2,
                              now_ms=now))  # fmt: skip
        elif kind == "release" and held:
            lease_id = held[op[1] % len(held)]
            tenant, _, token, _ = running.leases.pop(lease_id)
            call(release_call(keyspace, GROUP, lease_id, tenant=tenant, token=token, purge=2,
                              now_ms=now))  # fmt: skip
        elif kind == "release_many" and held:
            ended = [(i, *running.leases.pop(i)[::2]) for i in held[: op[1]]]
            call(release_many_call(keyspace, GROUP, [(i, t, k) for i, t, k in ended], purge=2,
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
