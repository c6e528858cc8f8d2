"""Client CPU per decision outside the round trip: cProfile of the sync and async clients.

Usage (from the repository root)::

    .venv/bin/python benchmarks/profile_client.py [--calls N] [--top K]

Starts its own redis-server on a free loopback port. Runs ``--calls``
``try_acquire`` + ``release`` pairs with the sync client, then the same with
the async client (one caller, so no batching hides the per-call work), each
under cProfile, and prints per decision: wall time, the time spent waiting
for Redis (socket reads, and the event loop's select for asyncio), and the
rest — the client's own CPU — with the functions that cost the most.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    args = parser.parse_args()
    server = RedisServer().start()
    try:
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
