"""The acquire script's work is flat in tenants, idle *and* active (§3, issue 11).

Deterministic, not timed: on a real redis-server, ``MONITOR`` lists every
command a script issues (tagged ``lua``) with its arguments. One acquire in a
group with 10 active tenants must issue exactly as many commands, with as many
arguments, whether the policy registers 0 or 10,000 idle tenants, and whether
10 or 400 tenants are active: the incremental fair state reads the tenant's own
fields and the group's sums, never every active tenant. Timings are for
``benchmarks/bench_cost.py``.
"""

from __future__ import annotations

import re

import attrs
import pytest
import redis

from ratequota.clients.sync import QuotaClient
from ratequota.policy import GroupPolicy, MeterPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import MakeClient
from tests.servers import RedisServer

pytestmark = pytest.mark.real_redis

_MONITOR_LINE = re.compile(r"^[\d.]+ \[\d+ ([^\]]*)\] (.*)$", re.DOTALL)
_ARGUMENT = re.compile(r'"(?:[^"\\]|\\.)*"')


def group_policy(name: str, active: int, idle: int) -> GroupPolicy:
    """``active`` tenants that will hold units and ``idle`` ones that never ask."""
    tenants = [TenantPolicy(f"a{i}", weight=1.0 + i % 3) for i in range(active)]
    tenants += [TenantPolicy(f"idle{i}", guarantee=1, lendable=0.5) for i in range(idle)]
    return GroupPolicy(name, capacity=100_000, tenants=tuple(tenants))


def script_work(
    server: RedisServer, name: str, active: int, idle: int, **meters: int
) -> list[tuple[str, int]]:
    """Commands (name, argument count) one acquire's script issues, read from MONITOR; a
    ``ZRANGE`` must read a head (0 0), never a range that grows with the group.

    With ``meters`` (amounts by meter name) the group has those rate meters, every active
    tenant borrows on them (so all contend for the spare), and the acquire names them too.
    """
    client = QuotaClient.from_url(server.url, socket_timeout=10.0, clock=ManualClock())
    plain = redis.Redis(port=server.port, socket_timeout=10.0)
    try:
        policy = group_policy(name, active, idle)
        if meters:
            spec = tuple(MeterPolicy(m, rate=10**9, burst=10**9) for m in meters)
            policy = attrs.evolve(policy, meters=spec)
        client.apply_policy(Policy([policy]))
        for i in range(active):  # every active tenant holds a lease
            assert client.try_acquire(f"a{i}", 2, group=name, meters=meters).admitted
        with plain.monitor() as monitor:  # type: ignore[no-untyped-call]
            decision = client.try_acquire("a0", 1, group=name, meters=meters)
            assert decision.admitted
            plain.echo("end-of-acquire")  # a fence: MONITOR lists commands in order
            issued: list[tuple[str, int]] = []
            for _ in range(10_000):  # bounded read; each read also has a socket timeout
                raw = monitor.connection.read_response()
                line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                match = _MONITOR_LINE.match(line)
                assert match, line
                source, body = match.groups()
                words = _ARGUMENT.findall(body)
                if words and words[0].strip('"').lower() == "echo":
                    break
                if source == "lua":
                    command = words[0].strip('"').lower()
                    if command == "zrange":  # only ever a head: ZRANGE key 0 0 [WITHSCORES]
                        assert words[2:4] == ['"0"', '"0"'], line
                    issued.append((command, len(words)))
            else:  # pragma: no cover - the fence never came
                pytest.fail("MONITOR never showed the fence")
        return issued
    finally:
        client.close()
        plain.close()


def test_acquire_work_ignores_idle_and_active_tenants(real_redis: RedisServer) -> None:
    """10,000 registered idle tenants, or 40 times more active ones, add no command and no
    argument to an acquire; no command reads a whole hash."""
    lean = script_work(real_redis, "lean", active=10, idle=0)
    crowded = script_work(real_redis, "crowd", active=10, idle=10_000)
    assert lean, "MONITOR showed no script command"
    assert crowded == lean
    busier = script_work(real_redis, "busy", active=400, idle=0)
    assert busier == lean
    assert not {name for name, _ in lean} & {"hgetall", "hkeys", "hvals"}
    assert lean.count(("zrange", 5)) == 1  # exp's first member, WITHSCORES (script_work)


def test_metered_acquire_work_ignores_how_many_borrowers_contend(real_redis: RedisServer) -> None:
    """With two rate meters, 10 or 200 tenants contending for the spare add no command and no
    argument: the floor of the contention set is one ZRANGE of its head, the rest O(1)."""
    lean = script_work(real_redis, "mlean", active=10, idle=0, tokens=5, requests=1)
    busier = script_work(real_redis, "mbusy", active=200, idle=0, tokens=5, requests=1)
    assert busier == lean
    assert lean.count(("zrange", 4)) == 2  # ZRANGE key 0 0: one head per meter
    assert not {name for name, _ in lean} & {"hgetall", "hkeys", "hvals"}


def test_thousands_of_active_tenants_fit_in_one_call(make_client: MakeClient) -> None:
    """9,000 active tenants: the spec lookup is chunked, so the script never overflows Lua's
    C stack (8,000 values in Redis) with one huge unpack() ('too many results to unpack')."""
    from ratequota.testing import ManualClock

    names = [f"t{i}" for i in range(9000)]
    group = GroupPolicy("big", capacity=20_000, tenants=[TenantPolicy(n, 1) for n in names])
    quota = make_client(Policy([group]), clock=ManualClock())
    conn = quota.backend.connection("big")
    demand = quota.core.keyspace.group("big").demand
    conn.hset(demand, mapping={f"u:{n}": 1 for n in names[1:]})  # everyone else active
    conn.expire(demand, 60)
    decision = quota.try_acquire("t0", 1)
    assert decision.admitted
    assert quota.snapshot("big").used == 9000
