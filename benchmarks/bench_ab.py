"""Paired A/B of the lease scripts: this checkout against another one, on one Redis, interleaved.

Usage (from the repository root)::

    git archive main | tar -x -C /tmp/base      # the checkout to compare with
    .venv/bin/python benchmarks/bench_ab.py --base /tmp/base [--rounds 30] [--block 300]

On a shared machine the Redis-side µs of one script vary by ±50 % from one
run to the next, far more than a change of a few commands. This measures
both versions in the same run, alternating blocks of ``--block`` calls
(``CONFIG RESETSTAT`` before each block, ``INFO commandstats`` after), so
both see the same load; it prints the median and the minimum over the
rounds. Four measurements, each on the same state for both versions:
an admitted ``acquire``, a refused one (``tenant_limit``), ``release``
of a live lease, and an admitted acquire with a ``tokens`` rate meter on the
tenant's own rate (another group, published by this checkout's ``apply_policy``).
A fifth, "own group", gives each version a group of its own, published by its own
``apply_policy`` and written only by its own scripts, so a change in how the keys are laid
out or encoded shows: tenants borrowing beyond a guarantee of 1 (each acquire and release
moves the tenant's breakpoints), 20 leases held throughout, and an acquire released at once
(µs per call over both).
The base's scripts are linked by the base's own ``ratequota.engine.scripts`` (read
in a subprocess) and called with this checkout's arguments: the extra trailing
KEYS this checkout passes are ignored by scripts that do not read them, so the
base's ARGV must be equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequota.engine.keys import KeySpace
from ratequota.engine.protocol import acquire_call, apply_policy_call, release_call
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from tests.servers import RedisServer

TENANTS = 10
_READ = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); "
    "from ratequota.engine.scripts import load_scripts; "
    "print(json.dumps({n: s.source for n, s in load_scripts().items()}))"
)


def base_sources(base: Path) -> dict[str, str]:
    """The base checkout's linked scripts, by name."""
    out = subprocess.run(
        [sys.executable, "-c", _READ, str(base)], check=True, capture_output=True, text=True
    )
    sources: dict[str, str] = json.loads(out.stdout)
    return sources


def _usec(conn: Any) -> float:
    return float(conn.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def run(base: Path, rounds: int, block: int) -> dict[str, dict[str, list[float]]]:
    """µs per call per round: {measurement: {version: [...]}}."""
    server = RedisServer().start()
    try:
        conn = server.client()
        mine = {name: spec.source for name, spec in load_scripts().items()}
        versions = {"this": mine, "base": base_sources(base)}
        shas = {v: {n: conn.script_load(src) for n, src in s.items()} for v, s in versions.items()}
        keyspace = KeySpace(prefix="ab")
        tenants = tuple(
            TenantPolicy(f"t{i}", guarantee=10**6, borrow_limit=0) for i in range(TENANTS)
        )
        tenants += (TenantPolicy("full", guarantee=1, borrow_limit=0),)
        group = GroupPolicy("ab", capacity=10**8, tenants=tenants, max_lease_ttl=3600.0)
        own = (TenantMeter("tokens", rate=10**6),)
        metered = GroupPolicy(
            "abm",
            capacity=10**8,
            tenants=tuple(attrs.evolve(t, meters=own) for t in tenants[:TENANTS]),
            meters=(MeterPolicy("tokens", rate=10**7, burst=10**7),),
            max_lease_ttl=3600.0,
        )
        for published in (group, metered):
            setup = apply_policy_call(keyspace, published)
            conn.evalsha(shas["this"]["apply_policy"], len(setup.keys), *setup.keys, *setup.args)
        borrowers = tuple(TenantPolicy(f"t{i}", guarantee=1) for i in range(TENANTS))
        for version in versions:
            own_group = GroupPolicy(f"ab-{version}", capacity=10**6, tenants=borrowers)
            setup = apply_policy_call(keyspace, own_group)
            conn.evalsha(shas[version]["apply_policy"], len(setup.keys), *setup.keys, *setup.args)

        def call(version: str, c: Any) -> Any:
            sha = shas[version][c.script.name]
            return conn.evalsha(sha, len(c.keys), *c.keys, *c.args)

        def acquire(i: int, tenant: str, meters: dict[str, int] | None = None) -> Any:
            return acquire_call(
                keyspace, "abm" if meters else "ab", tenant, 1, f"l{i}", 600_000, wait=False,
                pending_ms=2000, purge=64, meters=meters,
            )  # fmt: skip

        def own(version: str, lease_id: str, tenant: str) -> int:
            made = acquire_call(
                keyspace, f"ab-{version}", tenant, 1, lease_id, 600_000, wait=False,
                pending_ms=2000, purge=64,
            )  # fmt: skip
            return int(call(version, made)[3])

        for version in versions:  # 20 leases held: every tenant borrows beyond its guarantee
            for i in range(20):
                own(version, f"held{i}", f"t{i % TENANTS}")
        call("this", acquire(-1, "full"))  # "full" is at its limit from now on
        results: dict[str, dict[str, list[float]]] = {
            m: {v: [] for v in versions}
            for m in ("acquire", "refused acquire", "release", "metered acquire", "own group")
        }
        serial = 0
        for r in range(rounds):
            for version in list(versions) if r % 2 else list(versions)[::-1]:
                calls = []
                for _ in range(block):
                    serial += 1
                    calls.append(acquire(serial, f"t{serial % TENANTS}"))
                conn.config_resetstat()
                tokens = [int(call(version, c)[3]) for c in calls]
                results["acquire"][version].append(_usec(conn))
                conn.config_resetstat()
                for j in range(block):
                    call(version, acquire(-2 - j, "full"))
                results["refused acquire"][version].append(_usec(conn))
                conn.config_resetstat()
                for c, token in zip(calls, tokens, strict=True):
                    tenant, lease_id = str(c.args[2]), str(c.args[4])
                    done = release_call(
                        keyspace, "ab", lease_id, tenant=tenant, token=token, purge=64
                    )
                    call(version, done)
                results["release"][version].append(_usec(conn))
                conn.config_resetstat()
                for _ in range(block):
                    serial += 1
                    call(version, acquire(serial, f"t{serial % TENANTS}", {"tokens": 1}))
                results["metered acquire"][version].append(_usec(conn))
                conn.config_resetstat()
                for _ in range(block // 2):
                    serial += 1
                    tenant = f"t{serial % TENANTS}"
                    token = own(version, f"o{serial}", tenant)
                    done = release_call(
                        keyspace,
                        f"ab-{version}",
                        f"o{serial}",
                        tenant=tenant,
                        token=token,
                        purge=64,
                    )
                    call(version, done)
                results["own group"][version].append(_usec(conn))
        conn.close()
        return results
    finally:
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Print the median and minimum µs per call of each version, and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=300)
    args = parser.parse_args(argv)
    results = run(args.base, args.rounds, args.block)
    print(f"Redis-side µs per call, {args.rounds} interleaved rounds of {args.block} calls")
    print(f"{'':18} {'this median':>12} {'base median':>12} {'this min':>9} {'base min':>9}")
    for name, by in results.items():
        this, base = by["this"], by["base"]
        print(
            f"{name:18} {statistics.median(this):12.1f} {statistics.median(base):12.1f} "
            f"{min(this):9.1f} {min(base):9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
