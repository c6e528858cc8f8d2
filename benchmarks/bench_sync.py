"""Sync throughput of acquire and acquire+release against a trivial script (DESIGN §10).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_sync.py [--url redis://127.0.0.1:PORT/0] [--calls N]

Without ``--url`` it starts its own redis-server on a free loopback port and
stops it afterwards. Everything is measured on the same connection, in
interleaved rounds, and reported as ratios against ``EVALSHA "return 1"``:
the bars (DESIGN §10) are acquire >= 0.8x one trivial call, acquire+release >= 0.75x two.
The same calls from a client with ``functions=False`` (scripts by ``EVALSHA``) are measured
in the same rounds.
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
    """Median ratios over ``rounds`` interleaved rounds.

    The client calls the scripts as functions where the server takes them (its default); a
    second client on the same server with ``functions=False`` calls them by ``EVALSHA``,
    measured in the same rounds (docs/design.md, "Scripts as functions").
    """
    policy = Policy(
        [GroupPolicy("bench", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])]
    )
    quota = QuotaClient.from_url(url, prefix="bench")
    by_evalsha = QuotaClient.from_url(url, prefix="bench-e", functions=False)
    quota.apply_policy(policy)
    by_evalsha.apply_policy(policy)
    conn = quota.backend.connection("bench")
    trivial_sha = conn.script_load("return 1")

    def trivial() -> object:
        return conn.evalsha(trivial_sha, 0)

    def trivial_pair() -> object:
        conn.evalsha(trivial_sha, 0)
        return conn.evalsha(trivial_sha, 0)

    def acquire_of(client: QuotaClient) -> Callable[[], object]:
        return lambda: client.try_acquire("t", 1)

    def pair_of(client: QuotaClient) -> Callable[[], object]:
        def acquire_release() -> object:
            decision = client.try_acquire("t", 1)
            assert decision.lease is not None
            return client.release(decision.lease)

        return acquire_release

    acquire, acquire_e = acquire_of(quota), acquire_of(by_evalsha)
    pair, pair_e = pair_of(quota), pair_of(by_evalsha)
    for fn in (trivial, acquire, acquire_e, pair, pair_e):  # warm up connections and caches
        rate(fn, 200)
    names = ("trivial", "acquire", "acquire (EVALSHA)", "pair", "acq+rel", "acq+rel (EVALSHA)")
    absolute: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {
        k: [] for k in ("acquire", "acquire+release", "acquire, EVALSHA", "acq+rel, EVALSHA")
    }
    for _ in range(rounds):
        t1 = rate(trivial, calls)
        a, ae = rate(acquire, calls), rate(acquire_e, calls)
        t2 = rate(trivial_pair, calls // 2)
        ar, are = rate(pair, calls // 2), rate(pair_e, calls // 2)
        for name, value in zip(names, (t1, a, ae, t2, ar, are), strict=True):
            absolute[name].append(value)
        ratios["acquire"].append(a / t1)
        ratios["acquire+release"].append(ar / t2)
        ratios["acquire, EVALSHA"].append(ae / t1)
        ratios["acq+rel, EVALSHA"].append(are / t2)
    # Leases of the acquire-only rounds are left to expire; release them to leave no trace.
    for client in (quota, by_evalsha):
        for lease in client.snapshot("bench").leases:
            client.release(lease)
        client.close()
    medians = {k: statistics.median(v) for k, v in absolute.items()}
    labels = {
        "trivial": "trivial EVALSHA",
        "acquire": "acquire",
        "acquire (EVALSHA)": "acquire, by EVALSHA",
        "pair": "2x trivial EVALSHA",
        "acq+rel": "acquire + release",
        "acq+rel (EVALSHA)": "the same, by EVALSHA",
    }
    print(f"{'measure':<22}{'calls/s (median)':>18}")
    for name in names:
        print(f"{labels[name]:<22}{medians[name]:>18.0f}")
    result = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"\nratio acquire / trivial:               {result['acquire']:.3f}  (bar {BARS['acquire']})"
    )
    print(
        f"ratio acquire+release / 2x trivial:    {result['acquire+release']:.3f}  "
        f"(bar {BARS['acquire+release']})"
    )
    print(
        f"the same by EVALSHA (functions=False): {result['acquire, EVALSHA']:.3f}, "
        f"{result['acq+rel, EVALSHA']:.3f}"
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
