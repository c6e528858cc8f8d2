"""Sync throughput of acquire and acquire+release against a trivial script (DESIGN §10).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_sync.py [--url redis://127.0.0.1:PORT/0] [--calls N]

Without ``--url`` it starts its own redis-server on a free loopback port and
stops it afterwards. Everything is measured on the same connection, in
interleaved rounds, and reported as ratios against ``EVALSHA "return 1"``:
the bars (DESIGN §10) are acquire >= 0.8x one trivial call, acquire+release >= 0.75x two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy
from tests.servers import RedisServer

#: The issue's bars (DESIGN §10): try_acquire against one trivial call, acquire + release
#: against two.
BARS = {"acquire": 0.8, "acquire+release": 0.75}


def rate(fn: Callable[[], object], calls: int) -> float:
    """Calls per second of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls / (time.perf_counter() - start)


def run(url: str, calls: int, rounds: int) -> dict[str, float]:
    """Median ratios over ``rounds`` interleaved rounds."""
    quota = QuotaClient.from_url(url, prefix="bench")
    quota.apply_policy(
        Policy([GroupPolicy("bench", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])])
    )
    conn = quota.backend.connection("bench")
    trivial_sha = conn.script_load("return 1")

    def trivial() -> object:
        return conn.evalsha(trivial_sha, 0)

    def trivial_pair() -> object:
        conn.evalsha(trivial_sha, 0)
        return conn.evalsha(trivial_sha, 0)

    def acquire() -> object:
        return quota.try_acquire("t", 1)

    def acquire_release() -> object:
        decision = quota.try_acquire("t", 1)
        assert decision.lease is not None
        return quota.release(decision.lease)

    for fn in (trivial, acquire, acquire_release):  # warm up connections and caches
        rate(fn, 200)
    ratios: dict[str, list[float]] = {"acquire": [], "acquire+release": []}
    absolute: dict[str, list[float]] = {k: [] for k in ("trivial", "acquire", "pair", "acq+rel")}
    for _ in range(rounds):
        t1 = rate(trivial, calls)
        a = rate(acquire, calls)
        t2 = rate(trivial_pair, calls // 2)
        ar = rate(acquire_release, calls // 2)
        absolute["trivial"].append(t1)
        absolute["acquire"].append(a)
        absolute["pair"].append(t2)
        absolute["acq+rel"].append(ar)
        ratios["acquire"].append(a / t1)
        ratios["acquire+release"].append(ar / t2)
    # Leases of the acquire-only rounds are left to expire; release them to leave no trace.
    snap = quota.snapshot("bench")
    for lease in snap.leases:
        quota.release(lease)
    quota.close()
    medians = {k: statistics.median(v) for k, v in absolute.items()}
    print(f"{'measure':<22}{'calls/s (median)':>18}")
    print(f"{'trivial EVALSHA':<22}{medians['trivial']:>18.0f}")
    print(f"{'acquire':<22}{medians['acquire']:>18.0f}")
    print(f"{'2x trivial EVALSHA':<22}{medians['pair']:>18.0f}")
    print(f"{'acquire + release':<22}{medians['acq+rel']:>18.0f}")
    result = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"\nratio acquire / trivial:               {result['acquire']:.3f}  (bar {BARS['acquire']})"
    )
    print(
        f"ratio acquire+release / 2x trivial:    {result['acquire+release']:.3f}  "
        f"(bar {BARS['acquire+release']})"
    )
    return result


def main() -> int:
    """Parse options, start a server if needed, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing Redis to measure on (default: start one)")
    parser.add_argument("--calls", type=int, default=5000, help="calls per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        server = RedisServer().start()
        url = server.url
    try:
        run(url, args.calls, args.rounds)
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
