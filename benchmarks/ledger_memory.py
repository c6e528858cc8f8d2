"""Memory of the usage ledger per tenant-hour, by ``MEMORY USAGE`` on a real redis-server.

Usage (from the repository root)::

    .venv/bin/python benchmarks/ledger_memory.py [--url redis://127.0.0.1:PORT/0]

Without ``--url`` it starts its own redis-server on a free loopback port. For
each number of tenants it writes one hour's ledger hash the way the scripts
do (HINCRBY of ``<tenant>|<counter>`` fields) with the counters a busy tenant
has in an hour (unit·ms, leases, two refusal reasons), and prints the
hash's ``MEMORY USAGE`` and the bytes per tenant. Tenant names are 12
characters (``tenant-00042``); a longer name adds its extra length once per
field. The figures are the ones in docs/usage.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import RedisServer

#: The counters a busy tenant writes in one hour, with plausible values.
COUNTERS = {"us": 1_234_567_890, "rq": 48_213, "rf:tenant_limit": 1_532, "rf:group_full": 87}
TENANTS = (1, 8, 32, 33, 100, 1000)


def ledger_bytes(conn: Any, tenants: int, counters: dict[str, int] = COUNTERS) -> int:
    """``MEMORY USAGE`` of one ledger hour with ``tenants`` tenants (``SAMPLES 0``: exact)."""
    key = f"rq:v2:{{mem}}:led:{tenants}"
    conn.delete(key)
    pipe = conn.pipeline(transaction=False)
    for i in range(tenants):
        for counter, value in counters.items():
            pipe.hincrby(key, f"tenant-{i:05d}|{counter}", value)
    pipe.execute()
    size = int(conn.memory_usage(key, samples=0))
    conn.delete(key)
    return size


def main(argv: list[str] | None = None) -> int:
    """Print bytes per ledger hour and per tenant-hour for several tenant counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="an existing Redis (default: start one)")
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        server = RedisServer().start()
    try:
        conn = server.client() if server is not None else _connect(args.url)
        print(f"fields per tenant: {len(COUNTERS)} ({', '.join(COUNTERS)})")
        configured = conn.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"]
        for entries in (configured, "128"):
            conn.config_set("hash-max-listpack-entries", entries)
            print(f"hash-max-listpack-entries {entries}")
            print(f"{'tenants':>8} {'encoding':>10} {'bytes/hour':>11} {'bytes/tenant-hour':>18}")
            for n in TENANTS:
                size = ledger_bytes(conn, n)
                encoding = _encoding(conn, n)
                print(f"{n:>8} {encoding:>10} {size:>11} {size / n:>18.0f}")
        conn.config_set("hash-max-listpack-entries", configured)
        conn.close()
    finally:
        if server is not None:
            server.cleanup()
    return 0


def _encoding(conn: Any, tenants: int) -> str:
    key = "rq:v2:{mem}:enc"
    conn.delete(key)
    for i in range(tenants):
        for counter, value in COUNTERS.items():
            conn.hincrby(key, f"tenant-{i:05d}|{counter}", value)
    encoding = conn.object("encoding", key)
    conn.delete(key)
    return encoding.decode() if isinstance(encoding, bytes) else str(encoding)


def _connect(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


if __name__ == "__main__":
    raise SystemExit(main())
