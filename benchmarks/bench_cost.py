"""Redis-side cost of one acquire by active tenants, live leases and idle tenants (DESIGN §10).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_cost.py [--url redis://127.0.0.1:PORT/0] [--calls N]
        [--active 10,100,1000,10000] [--rounds R]

Without ``--url`` it starts its own redis-server on a free loopback port and
stops it afterwards. Each scenario publishes one group, makes ``active``
tenants active (each holds leases; 10,000 live leases in all), optionally
registers 10,000 idle tenants in the policy. All scenarios are built first and
kept live; then ``--rounds`` interleaved rounds each run ``--calls`` acquires of
every scenario (and as many trivial calls) between ``CONFIG RESETSTAT`` and
``INFO commandstats``, releasing what they took, in an order that alternates from
round to round: the reported µs/call is the median over the rounds of
``usec_per_call`` of ``evalsha``, i.e. time spent inside Redis running the
script, without the network or the client; each round's ratios to the first
layout's spare figure of the same round follow the table.

Two columns: *spare*, where the capacity exceeds all demand (every acquire
is admitted and the fair level needs no search), and *contended*, where every
active tenant also has a large waiting request registered, so demand exceeds
the capacity and each acquire solves the full fix-point (most are refused:
the decision costs the same, minus the writes).

Beside them, in the same run and on the same server, the µs per call of a
trivial ``EVALSHA "return 1"``: every figure is also printed as a multiple of
it, and the larger groups as a multiple of the 10-tenant figure (DESIGN §10).

``--meters`` measures instead decisions with rate meters (docs/rates.md)
beside the lease-only decision, in the same group (10 active tenants, 10,000
live leases, spare capacity and rate), in interleaved rounds: one ``tokens``
meter on the tenant's own rate, the same borrowing, and ``tokens`` with
``requests`` (``METERED_CASES``): still one script call, and what meters add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota.clients.sync import QuotaClient
from ratequota.engine.protocol import acquire_call, apply_policy_call, release_call
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, MeterPolicy, Policy, TenantMeter, TenantPolicy
from tests.servers import RedisServer

LIVE_LEASES = 10_000
IDLE_TENANTS = 10_000
ACTIVE = (10, 100, 1000, 10_000)


def build_policy(active: int, idle: int, capacity: int = 10**7) -> GroupPolicy:
    """A group with ``active`` tenants that will hold leases and ``idle`` that never ask."""
    tenants = [TenantPolicy(f"a{i}", weight=1.0 + i % 3) for i in range(active)]
    # Idle tenants carry a non-lendable guarantee: they count only through the summed reserve.
    tenants += [TenantPolicy(f"idle{i}", guarantee=1, lendable=0.5) for i in range(idle)]
    return GroupPolicy("cost", capacity=capacity, tenants=tuple(tenants), max_lease_ttl=3600.0)


def populate(
    quota: QuotaClient, group: str, active: int, leases: int
) -> list[tuple[str, str, int]]:
    """``leases`` live leases spread over ``active`` tenants, pipelined; returns
    ``(lease id, tenant, fencing token)`` of each (release names all three).

    Every active tenant holds at least one lease (10,000 active tenants: one each).
    """
    conn = quota.backend.connection(group)
    keyspace = quota.core.keyspace
    ids: list[tuple[str, str]] = []
    replies: list[Any] = []
    pipe = conn.pipeline(transaction=False)
    for i in range(leases):
        call = acquire_call(
            keyspace,
            group,
            f"a{i % active}",
            1,
            f"seed{i}",
            3_600_000,
            wait=False,
            pending_ms=2000,
            purge=64,
        )
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        ids.append((f"seed{i}", f"a{i % active}"))
        if len(pipe) >= 1000:
            replies += pipe.execute()
    replies += pipe.execute()
    return [(i, t, int(reply[3])) for (i, t), reply in zip(ids, replies, strict=True)]


def release_all(quota: QuotaClient, group: str, leases: list[tuple[str, str, int]]) -> None:
    """Release leases by id, tenant and token, pipelined."""
    conn = quota.backend.connection(group)
    pipe = conn.pipeline(transaction=False)
    for lease_id, tenant, token in leases:
        call = release_call(
            quota.core.keyspace, group, lease_id, tenant=tenant, token=token, purge=64
        )
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def evalsha_stats(conn: Any) -> tuple[int, float]:
    """Calls and µs per call of the script calls (EVALSHA and FCALL, as the client sends
    them: docs/design.md, "Scripts as functions") since the last CONFIG RESETSTAT."""
    stats = conn.info("commandstats")
    both = [stats.get(f"cmdstat_{c}", {}) for c in ("evalsha", "fcall")]
    calls = sum(int(s.get("calls", 0)) for s in both)
    usec = sum(float(s.get("usec", 0.0)) for s in both)
    return calls, usec / calls if calls else 0.0


def register_waiting(quota: QuotaClient, group: str, active: int, units: int) -> None:
    """One waiting request of ``units`` per active tenant, registered for an hour."""
    conn = quota.backend.connection(group)
    pipe = conn.pipeline(transaction=False)
    for i in range(active):
        call = acquire_call(
            quota.core.keyspace,
            group,
            f"a{i}",
            units,
            f"wait{i}",
            1000,
            wait=True,
            pending_ms=3_600_000,
            purge=64,
        )
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    pipe.execute()


class Scenario:
    """One group kept live for the whole run: ``active`` tenants holding ``LIVE_LEASES`` leases,
    ``idle`` tenants only in the policy, and with ``contended`` a large waiting request per
    active tenant, so that demand exceeds the capacity and each acquire walks the level."""

    def __init__(self, url: str, active: int, idle: int, calls: int, *, contended: bool) -> None:
        prefix = f"cost{active}x{idle}{'c' if contended else ''}"
        self.active, self.contended = active, contended
        self.quota = QuotaClient.from_url(url, prefix=prefix, socket_timeout=30.0)
        capacity = 2 * LIVE_LEASES + 2 * calls if contended else 10**7
        self.policy = build_policy(active, idle, capacity)
        self.quota.apply_policy(Policy([self.policy]))
        self.conn = self.quota.backend.connection(self.policy.name)
        for spec in load_scripts().values():  # the pipelines below send EVALSHA directly
            self.conn.script_load(spec.source)
        self.seeded = populate(self.quota, self.policy.name, active, max(LIVE_LEASES, active))
        if contended:
            register_waiting(self.quota, self.policy.name, active, max(1, 4 * capacity // active))
        self.live = self.quota.snapshot(self.policy.name, []).used

    def block(self, calls: int) -> float:
        """Redis-side µs per acquire over ``calls`` acquires (after 50 to warm up); the leases
        they take are released afterwards, so every block sees the same group."""
        taken = []
        for i in range(50 + calls):
            if i == 50:  # the first 50 warm up, outside the measurement
                self.conn.config_resetstat()
            decision = self.quota.try_acquire(f"a{i % self.active}", 1, group=self.policy.name)
            assert self.contended or decision.lease is not None, decision.describe()
            if decision.lease is not None:
                taken.append(decision.lease)
        counted, usec = evalsha_stats(self.conn)
        assert counted == calls, (counted, calls)
        for lease in taken:
            self.quota.release(lease)
        return usec

    def close(self) -> None:
        release_all(self.quota, self.policy.name, self.seeded)
        self.quota.close()


def metered_policy(active: int) -> GroupPolicy:
    """``build_policy``'s group with a ``tokens`` and a ``requests`` meter that never refuse
    here: half the tenants ask within a guaranteed rate, the others borrow."""
    tenants = [
        TenantPolicy(
            f"a{i}",
            weight=1.0 + i % 3,
            meters=(TenantMeter("tokens", rate=10**6 if i % 2 else 0, weight=1.0 + i % 3),),
        )
        for i in range(active)
    ]
    meters = (
        MeterPolicy("tokens", rate=10**8, burst=10**8),
        MeterPolicy("requests", rate=10**6, burst=10**6),
    )
    return GroupPolicy("cost", 10**7, tuple(tenants), max_lease_ttl=3600.0, meters=meters)


#: The ``--meters`` decisions: a label, which of the 10 tenants ask (odd ones have a guaranteed
#: token rate, even ones only borrow), and the amounts each acquire names.
METERED_CASES: tuple[tuple[str, tuple[int, ...], dict[str, int]], ...] = (
    ("lease", tuple(range(10)), {}),
    ("lease + tokens (own rate)", (1, 3, 5, 7, 9), {"tokens": 700}),
    ("lease + tokens (borrowing)", (0, 2, 4, 6, 8), {"tokens": 700}),
    ("lease + tokens + requests", tuple(range(10)), {"tokens": 700, "requests": 1}),
)


def measure_meters(url: str, calls: int, rounds: int = 5) -> tuple[list[float], int]:
    """Redis-side µs per acquire of each of ``METERED_CASES`` (medians of ``rounds``
    interleaved rounds of ``calls`` each), and the live leases during the run."""
    quota = QuotaClient.from_url(url, prefix="costm", socket_timeout=30.0)
    try:
        policy = metered_policy(10)
        conn = quota.backend.connection(policy.name)
        for spec in load_scripts().values():
            conn.script_load(spec.source)
        keyspace = quota.core.keyspace
        call = apply_policy_call(keyspace, policy)
        conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        seeded = populate(quota, policy.name, 10, LIVE_LEASES)
        results: list[list[float]] = [[] for _ in METERED_CASES]
        count = 0
        for _ in range(rounds):
            for (_label, tenants, amounts), out in zip(METERED_CASES, results, strict=True):
                for i in range(50 + calls):
                    if i == 50:  # the first 50 warm up, outside the measurement
                        conn.config_resetstat()
                    count += 1
                    tenant = f"a{tenants[i % len(tenants)]}"
                    one = acquire_call(
                        keyspace, policy.name, tenant, 1, f"m{count}", 1000,
                        wait=False, pending_ms=2000, purge=64, meters=amounts,
                    )  # fmt: skip
                    reply = conn.evalsha(one.script.sha, len(one.keys), *one.keys, *one.args)
                    assert int(reply[0]) == 1, reply
                counted, usec = evalsha_stats(conn)
                assert counted == calls, (counted, calls)
                out.append(usec)
        live = quota.snapshot(policy.name, []).used
        release_all(quota, policy.name, seeded)
        return [sorted(r)[rounds // 2] for r in results], live
    finally:
        quota.close()


class Trivial:
    """``EVALSHA "return 1"`` on its own connection, measured the same way."""

    def __init__(self, url: str) -> None:
        self.quota = QuotaClient.from_url(url, prefix="trivial", socket_timeout=30.0)
        self.conn = self.quota.backend.connection("trivial")
        self.sha = self.conn.script_load("return 1")

    def block(self, calls: int) -> float:
        """Redis-side µs per call over ``calls`` calls (after 50 to warm up)."""
        for _ in range(50):
            self.conn.evalsha(self.sha, 0)
        self.conn.config_resetstat()
        for _ in range(calls):
            self.conn.evalsha(self.sha, 0)
        counted, usec = evalsha_stats(self.conn)
        assert counted == calls, (counted, calls)
        return usec

    def close(self) -> None:
        self.quota.close()


def trivial_usec(url: str, calls: int) -> float:
    """Redis-side µs per call of ``EVALSHA "return 1"`` (one block)."""
    trivial = Trivial(url)
    try:
        return trivial.block(calls)
    finally:
        trivial.close()


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="an existing Redis (default: start one)")
    parser.add_argument("--calls", type=int, default=2000, help="measured acquires per scenario")
    parser.add_argument(
        "--active",
        default=",".join(str(n) for n in ACTIVE),
        help="comma-separated active-tenant counts (default %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument(
        "--meters", action="store_true", help="a lease with two rate meters beside a lease alone"
    )
    args = parser.parse_args(argv)
    if args.meters:
        return main_meters(args.url, args.calls)
    actives = [int(n) for n in args.active.split(",")]
    layouts = [(n, 0) for n in actives] + [(actives[0], IDLE_TENANTS)]
    server = None
    url = args.url
    if url is None:
        server = RedisServer().start()
        url = server.url
    try:
        table = interleaved(url, layouts, args.calls, args.rounds)
    finally:
        if server is not None:
            server.cleanup()
    trivial = statistics.median(table["trivial"])
    print(
        f"Redis-side µs per acquire (INFO commandstats, FCALL and EVALSHA): medians of "
        f"{args.rounds} interleaved rounds of {args.calls} calls"
    )
    print(f'trivial EVALSHA "return 1": {trivial:.2f} µs per call\n')
    print(
        f"{'active':>7} {'idle':>6} {'live leases':>12} {'spare':>8} {'x trivial':>10} "
        f"{'x first':>8} {'contended':>10} {'x trivial':>10} {'x first':>8}"
    )
    first = statistics.median(table[(actives[0], 0, False)])
    for active, idle in layouts:
        spare = statistics.median(table[(active, idle, False)])
        tight = statistics.median(table[(active, idle, True)])
        live = table[("live", active, idle)][0]
        print(
            f"{active:>7} {idle:>6} {live:>12.0f} {spare:>8.1f} {spare / trivial:>9.1f}x "
            f"{spare / first:>7.2f}x {tight:>10.1f} {tight / trivial:>9.1f}x "
            f"{tight / first:>7.2f}x"
        )
    print("\nper round, x the first layout's spare figure of the same round:")
    for active, idle in layouts:
        for contended in (False, True):
            ratios = [
                mine / base
                for mine, base in zip(
                    table[(active, idle, contended)], table[(actives[0], 0, False)], strict=True
                )
            ]
            label = f"{active} active{f', {idle} idle' if idle else ''}"
            label += ", contended" if contended else ", spare"
            print(f"  {label:<34} " + " ".join(f"{r:5.2f}" for r in ratios))
    return 0


def interleaved(
    url: str, layouts: list[tuple[int, int]], calls: int, rounds: int
) -> dict[Any, list[float]]:
    """Every scenario built first and kept live, then ``rounds`` rounds that each measure one
    block of every scenario and of the trivial script, in an order that alternates: the
    machine's load moves from minute to minute, and each round's figures share it."""
    scenarios: dict[Any, Scenario] = {}
    trivial = Trivial(url)
    try:
        for active, idle in layouts:
            for contended in (False, True):
                scenarios[(active, idle, contended)] = Scenario(
                    url, active, idle, calls, contended=contended
                )
        table: dict[Any, list[float]] = {key: [] for key in scenarios}
        table["trivial"] = []
        for active, idle in layouts:
            table[("live", active, idle)] = [float(scenarios[(active, idle, False)].live)]
        order: list[Any] = ["trivial", *scenarios]
        for r in range(rounds):
            for key in order if r % 2 == 0 else order[::-1]:
                runner = trivial if key == "trivial" else scenarios[key]
                table[key].append(runner.block(calls))
        return table
    finally:
        trivial.close()
        for scenario in scenarios.values():
            scenario.close()


def main_meters(url: str | None, calls: int) -> int:
    """The ``--meters`` table: one decision with and without two meters, same group, same run."""
    server = None
    if url is None:
        server = RedisServer().start()
        url = server.url
    try:
        trivial = trivial_usec(url, calls)
        usecs, live = measure_meters(url, calls)
        print("Redis-side µs per acquire (INFO commandstats, FCALL and EVALSHA, medians)")
        print(f'trivial EVALSHA "return 1": {trivial:.2f} µs; {live} live leases, 10 tenants\n')
        print(f"{'decision':<28} {'µs':>8} {'x trivial':>10} {'x lease':>8}")
        for (name, _, _), usec in zip(METERED_CASES, usecs, strict=True):
            print(f"{name:<28} {usec:>8.1f} {usec / trivial:>9.1f}x {usec / usecs[0]:>7.2f}x")
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
