"""A 100,000-tenant catalog: what publishing, loading and refreshing it cost (issue 9, item 6).

Starts its own redis-server on a free loopback port, publishes a policy of
100,000 tenants (50 groups of 2,000), then measures:

- ``document``: building and hashing the catalog document (the publisher);
- ``first load``: a fresh client's first call (fetch + parse + validate once);
- ``refresh (unchanged)``: one catalog refresh when nothing changed (a header
  read, nothing parsed) — what every pod pays every ``catalog_ttl``;
- ``try_acquire while stale``: 8 threads calling ``try_acquire`` with
  ``catalog_ttl`` so short that the catalog is stale on almost every call;
  p50/p99/max per call. Before issue 9 each of those calls re-read and
  re-validated the 6 MB catalog itself (p99 345 ms, worst 6.9 s reported).

Run from the repository root: ``.venv/bin/python benchmarks/bench_catalog.py``.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota.clients.catalog import catalog_document, policy_digest
from ratequota.clients.sync import QuotaClient
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

GROUPS = 50
PER_GROUP = 2_000


def policy() -> Policy:
    """100,000 tenants in 50 groups."""
    return Policy(
        [
            GroupPolicy(
                f"g{i}",
                PER_GROUP,
                [TenantPolicy(f"t{i}-{j}", guarantee=1) for j in range(PER_GROUP)],
            )
            for i in range(GROUPS)
        ]
    )


def main() -> None:
    """Print the figures (seconds unless marked)."""
    big = policy()
    started = time.perf_counter()
    document = catalog_document(big, epoch=1, digest=policy_digest(big))
    print(f"document: {time.perf_counter() - started:.2f}s, {len(document) / 1e6:.1f} MB")
    server = RedisServer().start()
    try:
        admin = QuotaClient(server.url, socket_timeout=30.0)
        started = time.perf_counter()
        admin.apply_policy(big)
        print(f"apply_policy: {time.perf_counter() - started:.2f}s")
        admin.close()

        pod = QuotaClient(server.url, socket_timeout=30.0, catalog_ttl=0.05)
        started = time.perf_counter()
        pod.try_acquire("t1-1", 1)
        print(f"first load (fetch, parse, validate): {time.perf_counter() - started:.2f}s")

        refreshes = []
        for _ in range(50):
            started = time.perf_counter()
            pod.load_policy()
            refreshes.append(time.perf_counter() - started)
        print(f"refresh (unchanged): median {statistics.median(refreshes) * 1e3:.2f} ms")

        latencies: list[float] = []
        lock = threading.Lock()
        end = time.monotonic() + 3.0

        def caller(i: int) -> None:
            while time.monotonic() < end:
                started = time.perf_counter()
                decision = pod.try_acquire(f"t{i}-{i}", 1)
                took = time.perf_counter() - started
                if decision.lease is not None:
                    pod.release(decision.lease)
                with lock:
                    latencies.append(took)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print(
            f"try_acquire while stale (8 threads, {len(latencies)} calls, "
            f"{pod.core.catalog_reads} refreshes, {pod.core.catalog_parses} parses): "
            f"p50 {statistics.median(latencies) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"max {latencies[-1] * 1e3:.2f} ms"
        )
        pod.close()
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
