"""ratequota beside the Redis limiters users compare it with, in one run (DESIGN §10).

Usage (from the repository root, with the ``bench`` extra installed)::

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_peers.py [--url redis://127.0.0.1:PORT/0] [--calls N]

Without ``--url`` it starts its own redis-server on a free loopback port and
stops it afterwards. Every contender runs on the same server, in interleaved
rounds (so the machine's drift hits all alike), one call at a time from one
thread, and is reported as calls per second and as a ratio against the
trivial ``EVALSHA "return 1"`` measured in the same round on a connection of
the same kind:

* single decisions against one trivial call: ratequota ``try_acquire``,
  ``limits`` fixed window and moving window ``hit``;
* held capacity (take, then give back) against two trivial calls: ratequota
  acquire + release, the ``redis-rate-limiters`` semaphore enter + exit.

These are different products: ``limits`` counts requests in a time window
(nothing is held), the semaphore holds one slot of one shared capacity (no
tenants, no fairness), ratequota decides a fair share per tenant. The table
shows what the fair decision costs next to them, not that they are equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from limiters import SyncSemaphore
from limits import RateLimitItemPerHour
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy
from tests.servers import RedisServer


def rate(fn: Callable[[], object], calls: int) -> float:
    """Calls per second of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls / (time.perf_counter() - start)


def run(url: str, calls: int, rounds: int) -> None:
    """Interleaved rounds of every contender; prints medians and ratios."""
    quota = QuotaClient.from_url(url, prefix="peers")
    quota.apply_policy(
        Policy([GroupPolicy("peers", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])])
    )
    conn = quota.backend.connection("peers")
    trivial_sha = conn.script_load("return 1")
    plain = redis.Redis.from_url(url)
    plain_sha = plain.script_load("return 1")
    storage = RedisStorage(url)
    item = RateLimitItemPerHour(10**9)
    fixed = FixedWindowRateLimiter(storage)
    moving = MovingWindowRateLimiter(storage)
    semaphore = SyncSemaphore(name="peers", capacity=100, max_sleep=1.0, connection=plain)

    def acquire_release() -> object:
        decision = quota.try_acquire("t", 1)
        assert decision.lease is not None
        return quota.release(decision.lease)

    def semaphore_pair() -> None:
        with semaphore:
            pass

    contenders: dict[str, Callable[[], object]] = {
        "trivial (ratequota's connection)": lambda: conn.evalsha(trivial_sha, 0),
        "trivial (plain redis-py)": lambda: plain.evalsha(plain_sha, 0),
        "ratequota try_acquire": lambda: quota.try_acquire("t", 1),
        "limits fixed window hit": lambda: fixed.hit(item, "peers-fixed"),
        "limits moving window hit": lambda: moving.hit(item, "peers-moving"),
        "ratequota acquire + release": acquire_release,
        "semaphore enter + exit": semaphore_pair,
    }
    # What each contender is compared with: one trivial call, or two for take-and-give-back.
    baseline = {
        "ratequota try_acquire": ("trivial (ratequota's connection)", 1),
        "limits fixed window hit": ("trivial (plain redis-py)", 1),
        "limits moving window hit": ("trivial (plain redis-py)", 1),
        "ratequota acquire + release": ("trivial (ratequota's connection)", 2),
        "semaphore enter + exit": ("trivial (plain redis-py)", 2),
    }
    for fn in contenders.values():  # warm up connections, scripts and caches
        rate(fn, 200)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {name: [] for name in baseline}
    for _ in range(rounds):
        this_round = {name: rate(fn, calls) for name, fn in contenders.items()}
        for name, value in this_round.items():
            rates[name].append(value)
        for name, (base, n) in baseline.items():
            ratios[name].append(this_round[name] * n / this_round[base])
    print(f"{'contender':<34}{'calls/s (median)':>18}{'ratio (median)':>16}  against")
    for name in contenders:
        median = statistics.median(rates[name])
        if name in baseline:
            base, n = baseline[name]
            against = f"{'two' if n == 2 else 'one'} trivial call{'s' if n == 2 else ''}"
            ratio = f"{statistics.median(ratios[name]):.2f}x"
        else:
            against, ratio = "", "1x"
        print(f"{name:<34}{median:>18.0f}{ratio:>16}  {against}")
    for lease in quota.snapshot("peers").leases:
        quota.release(lease)
    quota.close()
    plain.close()


def main() -> int:
    """Parse options, start a server if needed, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing Redis to measure on (default: start one)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
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
