"""Redis-side cost of release and of a refused acquire: the calls the usage ledger writes in.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_release.py [--url redis://127.0.0.1:PORT/0] [--calls N]

Without ``--url`` it starts its own redis-server on a free loopback port. One
group of 10 tenants; ``--calls`` leases are taken, then released one by one
between ``CONFIG RESETSTAT`` and ``INFO commandstats`` (µs per release inside
Redis); then ``--calls`` acquires that are refused (``tenant_limit``), measured
the same way; beside them the trivial ``EVALSHA "return 1"``. Run it on two
checkouts to compare (docs/usage.md, "Cost").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota.engine.keys import KeySpace
from ratequota.engine.protocol import acquire_call, apply_policy_call, release_call
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.servers import RedisServer

TENANTS = 10


def _usec(conn: Any) -> tuple[int, float]:
    stats = conn.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec_per_call", 0.0))


def _run(conn: Any, call: Any) -> Any:
    return conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)


def measure(conn: Any, calls: int) -> dict[str, float]:
    """µs per call of the trivial script, a release, and a refused acquire."""
    for spec in load_scripts().values():
        conn.script_load(spec.source)
    keyspace = KeySpace(prefix="benchrel")
    tenants = tuple(TenantPolicy(f"t{i}", guarantee=calls, borrow_limit=0) for i in range(TENANTS))
    group = GroupPolicy("rel", capacity=TENANTS * calls, tenants=tenants, max_lease_ttl=3600.0)
    _run(conn, apply_policy_call(keyspace, group))
    out: dict[str, float] = {}

    trivial = conn.script_load("return 1")
    conn.config_resetstat()
    for _ in range(calls):
        conn.evalsha(trivial, 0)
    out["trivial"] = _usec(conn)[1]

    leases = []
    for i in range(calls):
        tenant = f"t{i % TENANTS}"
        call = acquire_call(
            keyspace, "rel", tenant, 1, f"l{i}", 600_000, wait=False, pending_ms=2000, purge=64
        )
        leases.append((f"l{i}", tenant, int(_run(conn, call)[3])))
    conn.config_resetstat()
    for lease_id, tenant, token in leases:
        _run(conn, release_call(keyspace, "rel", lease_id, tenant=tenant, token=token, purge=64))
    counted, out["release"] = _usec(conn)
    assert counted == calls

    full = acquire_call(
        keyspace, "rel", "t0", calls, "full", 600_000, wait=False, pending_ms=2000, purge=64
    )
    _run(conn, full)
    conn.config_resetstat()
    for i in range(calls):
        call = acquire_call(
            keyspace,
            "rel",
            "t0",
            1,
            f"r{i}",
            600_000,
            wait=False,
            pending_ms=2000,
            purge=64,
        )
        assert _run(conn, call)[1] in (b"tenant_limit", "tenant_limit")
    out["refused acquire"] = _usec(conn)[1]
    return out


def main(argv: list[str] | None = None) -> int:
    """Print µs per call (median of ``--repeat`` runs) and the ratio to the trivial script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="an existing Redis (default: start one)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    server = RedisServer().start() if args.url is None else None
    try:
        import redis

        conn = server.client() if server is not None else redis.Redis.from_url(args.url)
        runs = []
        for _ in range(args.repeat):
            conn.flushall()
            runs.append(measure(conn, args.calls))
        print(f"Redis-side µs per call, median of {args.repeat} runs of {args.calls} calls")
        for name in runs[0]:
            values = sorted(r[name] for r in runs)
            median = values[len(values) // 2]
            trivial = sorted(r["trivial"] for r in runs)[len(runs) // 2]
            print(f"  {name:<16} {median:7.2f} µs   {median / trivial:5.2f}× trivial")
        conn.close()
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
