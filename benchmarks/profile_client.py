"""Client CPU per decision outside the round trip: cProfile of the sync and async clients.

Usage (from the repository root)::

    .venv/bin/python benchmarks/profile_client.py [--calls N] [--top K]

Starts its own redis-server on a free loopback port. Runs ``--calls``
``try_acquire`` + ``release`` pairs with the sync client, then the same with
the async client (one caller, so no batching hides the per-call work), each
under cProfile, and prints per decision: wall time, the time spent waiting
for Redis (socket reads, and the event loop's select for asyncio), and the
rest — the client's own CPU — with the functions that cost the most.

First, without the profiler: the client process's CPU time (``time.process_time``,
user + system, so the socket syscalls count) per call of ``try_acquire``, of
``release`` and of a bare redis-py ``EVALSHA "return 1"`` on the same
connection. Redis runs in another process, so its time is not in these
figures, and CPU time barely moves when a loaded machine deschedules the
client. "Over a bare EVALSHA" is the client's own work per decision: what the
round trip itself costs redis-py is subtracted. Then the same three calls with
the connection's socket replaced by one replaying recorded replies (as
``client_instructions.py`` does): every layer of the client, no kernel, no Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio

from ratequota.clients.script_pipe import ScriptPipe
from ratequota.engine.ops import ScriptCall
from ratequota.engine.protocol import acquire_call
from ratequota.engine.scripts import ScriptSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.client_instructions import stub_socket
from ratequota import AsyncQuotaClient, GroupPolicy, Policy, QuotaClient, TenantPolicy
from tests.servers import RedisServer

POLICY = Policy([GroupPolicy("prof", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])])
#: Functions in which the client waits for Redis rather than computing.
WAITS = ("recv_into", "recv", "send", "sendall", "poll", "select", "_read_from_socket")


def waiting(stats: pstats.Stats) -> float:
    """Seconds spent in the waiting primitives (their own time)."""
    total = 0.0
    for (_, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if any(f"{w}'" in name or name == w for w in WAITS):
            total += row[2]
    return total


def cpu_us(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Client CPU µs per call of ``fn`` (process time, best of ``rounds``)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


async def async_cpu_us(fn: Callable[[], Awaitable[object]], calls: int, rounds: int = 5) -> float:
    """Client CPU µs per awaited call of ``fn``, one caller (no batching to share the cost)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            await fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def cpu_table(rows: list[tuple[str, float]], bare: float) -> None:
    """Print client CPU per call and the part above a bare EVALSHA."""
    for label, us in rows:
        print(f"  {label:<30} {us:7.1f} µs CPU   over a bare EVALSHA {us - bare:+7.1f} µs")


def sync_cpu(url: str, calls: int) -> None:
    """Client CPU per sync call, no profiler."""
    # No catalog refresh in the background: its thread would take a connection of the pool
    # for a moment, and the replies recorded on the stubbed one could be missing.
    quota = QuotaClient.from_url(url, prefix="cpu", catalog_ttl=3600.0)
    quota.apply_policy(POLICY)
    conn = quota.backend.connection("prof")
    sha = conn.script_load("return 1")
    held: list[Any] = []

    def acquire() -> None:
        held.append(quota.try_acquire("t", 1).lease)

    def release() -> None:
        quota.release(held.pop())

    bare = cpu_us(lambda: conn.evalsha(sha, 0), calls)
    rows = [("bare EVALSHA", bare)]
    best_acquire = best_release = float("inf")
    for _ in range(5):  # acquire then release the same leases, so the group stays the same
        best_acquire = min(best_acquire, cpu_us(acquire, calls, rounds=1))
        best_release = min(best_release, cpu_us(release, calls, rounds=1))
    rows += [("try_acquire", best_acquire), ("release", best_release)]

    # The same EVALSHA round trip with acquire's keys and arguments (a trivial script): what
    # redis-py spends on the arguments alone.
    call = acquire_call(
        quota.core.keyspace,
        "prof",
        "t",
        1,
        "0123456789abcdef",
        60_000,
        wait=False,
        pending_ms=1000,
        purge=64,
    )
    wide = cpu_us(lambda: conn.evalsha(sha, len(call.keys), *call.keys, *call.args), calls)
    rows.append(("EVALSHA, acquire's arguments", wide))
    print("\nsync client CPU per call (process time, best of 5 rounds)")
    cpu_table(rows, bare)

    # The socket replaced by one that replays recorded replies (client_instructions.py): the
    # client's own CPU per call, every layer of it, with no kernel and no Redis.
    _, lease = stub_socket(quota, conn, sha)
    stubbed_bare = cpu_us(lambda: conn.evalsha(sha, 0), calls)
    stubbed = [
        ("bare EVALSHA", stubbed_bare),
        ("try_acquire", cpu_us(lambda: quota.try_acquire("t", 1), calls)),
        ("release", cpu_us(lambda: quota.release(lease), calls)),
    ]
    print("\nsync client CPU per call, socket stubbed (no kernel, no Redis)")
    cpu_table(stubbed, stubbed_bare)
    quota.close()


async def async_cpu(url: str, calls: int) -> None:
    """Client CPU per awaited async call, one caller, no profiler."""
    client = AsyncQuotaClient.from_url(url, prefix="cpu")
    await client.apply_policy(POLICY)
    raw = redis.asyncio.Redis.from_url(url)
    sha = await raw.script_load("return 1")
    held: list[Any] = []

    async def acquire() -> None:
        held.append((await client.try_acquire("t", 1)).lease)

    async def release() -> None:
        await client.release(held.pop())

    bare = await async_cpu_us(lambda: raw.evalsha(sha, 0), calls)
    best_acquire = best_release = float("inf")
    for _ in range(5):
        best_acquire = min(best_acquire, await async_cpu_us(acquire, calls, rounds=1))
        best_release = min(best_release, await async_cpu_us(release, calls, rounds=1))
    print("\nasync client CPU per awaited call, one caller (process time, best of 5 rounds)")
    rows = [("bare EVALSHA", bare), ("try_acquire", best_acquire), ("release", best_release)]
    cpu_table(rows, bare)
    # The client's own transport (``ScriptPipe``) costs less per round trip than redis.asyncio:
    # the decision's own CPU is also given over a bare call on it.
    pipe = client.backend.script_sender("prof")
    if isinstance(pipe, ScriptPipe):
        trivial = ScriptSpec("trivial", "return 1", sha, (), (), False)
        piped = await async_cpu_us(lambda: pipe(ScriptCall(trivial, "prof", (), ())), calls)
        print("\nthe same, over a bare EVALSHA on the client's own pipe")
        cpu_table([("bare EVALSHA, pipe", piped), *rows[1:]], piped)
    await raw.aclose()
    await client.close()


def report(label: str, profile: cProfile.Profile, wall: float, calls: int, top: int) -> None:
    """Per-decision wall, wait and client CPU, then the top functions by own time."""
    stats = pstats.Stats(profile)
    wait = waiting(stats)
    per = 1e6 / calls
    print(f"\n{label}: {calls} decisions (try_acquire + release = 2 calls each)")
    print(f"  wall {wall * per:8.1f} µs per decision")
    print(f"  waiting for Redis {wait * per:8.1f} µs")
    print(f"  client CPU {(wall - wait) * per:8.1f} µs (under the profiler, which inflates it)")
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    """Profile both clients and print the reports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--cpu-only", action="store_true", help="skip the cProfile part")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        sync_cpu(server.url, min(args.calls, 2000))
        asyncio.run(async_cpu(server.url, min(args.calls, 2000)))
        if args.cpu_only:
            return 0
        quota = QuotaClient.from_url(server.url, prefix="prof")
        quota.apply_policy(POLICY)
        for _ in range(300):
            lease = quota.try_acquire("t", 1).lease
            assert lease is not None
            quota.release(lease)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for _ in range(args.calls):
            lease = quota.try_acquire("t", 1).lease
            assert lease is not None
            quota.release(lease)
        profile.disable()
        report("sync", profile, time.perf_counter() - start, args.calls, args.top)
        quota.close()

        async def run_async() -> None:
            client = AsyncQuotaClient.from_url(server.url, prefix="prof")
            await client.apply_policy(POLICY)
            for _ in range(300):
                lease = (await client.try_acquire("t", 1)).lease
                assert lease is not None
                await client.release(lease)
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            for _ in range(args.calls):
                lease = (await client.try_acquire("t", 1)).lease
                assert lease is not None
                await client.release(lease)
            profile.disable()
            report("async", profile, time.perf_counter() - start, args.calls, args.top)
            await client.close()

        asyncio.run(run_async())
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
