"""Async throughput with 64 concurrent callers vs a trivial ``EVALSHA "return 1"`` (§10).

Starts its own redis-server on a free loopback port, then measures, each for
a few seconds with 64 tasks:

- ``trivial``: each task awaits ``EVALSHA "return 1"`` in a loop on one
  redis.asyncio client (its connection pool, one connection per task);
- ``acquire``: ``AsyncQuotaClient.try_acquire`` (one acquire.lua call each),
  with the per-shard batcher on (default) and off (``batch_size=1``);
- ``acquire+release`` against two trivial calls.

It prints operations per second and the ratios. Issue 11's bar: batched
``try_acquire`` >= 1.2x the trivial call (the median of the per-round ratios).
Run from the repository root:
``.venv/bin/python benchmarks/bench_async.py [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.backends import _redis_from_url
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

CALLERS = 64
#: Issue 11's bar: 64 callers' batched acquires >= 1.2x the trivial call's throughput.
BAR = 1.2
TENANTS = [f"t{i}" for i in range(10)]
POLICY = Policy(
    [
        GroupPolicy(
            "bench",
            capacity=1_000_000,
            tenants=[TenantPolicy(t, guarantee=100_000) for t in TENANTS],
        )
    ]
)


async def rate(seconds: float, one: Any) -> float:
    """Operations per second of ``CALLERS`` tasks each looping ``await one(i)``."""
    end = time.perf_counter() + seconds
    counts = [0] * CALLERS

    async def loop(i: int) -> None:
        while time.perf_counter() < end:
            await one(i)
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(CALLERS)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(url: str, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Every figure in operations per second, once per round.

    Figures are interleaved round by round, so a machine whose load changes
    during the run (CI neighbours) skews every figure alike; ratios are taken
    within a round.
    """
    plain = _redis_from_url(url, 5.0, aio=True)
    sha = await plain.script_load("return 1")

    async def trivial(i: int) -> None:
        await plain.evalsha(sha, 0)

    async def trivial_pair(i: int) -> None:
        await plain.evalsha(sha, 0)
        await plain.evalsha(sha, 0)

    configs = {"batched": {}, "unbatched": {"batch_size": 1, "batch_in_flight": 64}}
    clients: dict[str, AsyncQuotaClient] = {}
    for label, options in configs.items():
        clients[label] = AsyncQuotaClient(url, socket_timeout=5.0, lease_ttl=2.0, **options)
        await clients[label].apply_policy(POLICY)
        await clients[label].load_scripts()

    def acquire_of(quota: AsyncQuotaClient) -> Any:
        async def acquire(i: int) -> None:
            decision = await quota.try_acquire(TENANTS[i % len(TENANTS)], 1)
            assert decision.admitted

        return acquire

    def pair_of(quota: AsyncQuotaClient) -> Any:
        async def pair(i: int) -> None:
            decision = await quota.try_acquire(TENANTS[i % len(TENANTS)], 1)
            assert decision.lease is not None
            await quota.release(decision.lease)

        return pair

    figures: dict[str, list[float]] = {}
    await rate(0.5, trivial)  # warm the pools
    for quota in clients.values():
        await rate(0.5, pair_of(quota))
    for _ in range(rounds):
        figures.setdefault("trivial", []).append(await rate(seconds, trivial))
        figures.setdefault("trivial x2", []).append(await rate(seconds, trivial_pair))
        for label, quota in clients.items():
            figures.setdefault(f"acquire+release ({label})", []).append(
                await rate(seconds, pair_of(quota))
            )
            await asyncio.sleep(2.1)  # let the leases of the acquire-only figure expire
            figures.setdefault(f"acquire ({label})", []).append(
                await rate(seconds, acquire_of(quota))
            )
    for quota in clients.values():
        await quota.close()
    await plain.aclose()
    return figures


def main() -> None:
    """Start a server, measure, print medians and per-round ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        figures = asyncio.run(measure(server.url, args.seconds, args.rounds))
    finally:
        server.cleanup()
    print(f"{CALLERS} concurrent asyncio callers, {args.rounds} rounds of {args.seconds:g}s")
    for name, values in figures.items():
        print(f"  {name:32s} {statistics.median(values):10.0f} ops/s (median)")
    for label in ("batched", "unbatched"):
        trivial, twice = figures["trivial"], figures["trivial x2"]
        acquire = [a / t for a, t in zip(figures[f"acquire ({label})"], trivial, strict=True)]
        pairs = figures[f"acquire+release ({label})"]
        pair = [p / t for p, t in zip(pairs, twice, strict=True)]
        print(
            f"  {label:9s} acquire / trivial = {statistics.median(acquire):.2f}x"
            f" (rounds {', '.join(f'{r:.2f}' for r in acquire)});"
            f"  acquire+release / 2 trivial = {statistics.median(pair):.2f}x"
            f" (rounds {', '.join(f'{r:.2f}' for r in pair)})"
        )
    batched = statistics.median(
        a / t for a, t in zip(figures["acquire (batched)"], figures["trivial"], strict=True)
    )
    verdict = "met" if batched >= BAR else "NOT met"
    print(f"  bar: batched acquire / trivial >= {BAR:.2f}x -- {verdict} ({batched:.2f}x)")


if __name__ == "__main__":
    main()
