"""Instructions redis-server executes per script call, counted by valgrind (deterministic).

Usage (from the repository root; needs ``valgrind`` on the PATH)::

    .venv/bin/python benchmarks/bench_instructions.py [--calls N] [--lua-dir DIR]
        [--contended TENANTS] [--batch SIZE]

Timings on a shared machine move by 2-3x with its load; instruction counts do
not. This starts its own redis-server under ``valgrind --tool=callgrind`` (about
fifty times slower, so the runs are short), and for each measure zeroes the
counters, runs the calls, dumps and reads the total: instructions (``Ir``) the
server executed per call — the script, the commands it issues, the network
handling — beside a trivial ``EVALSHA "return 1"`` measured the same way: an
admitted ``acquire`` (``--calls`` leases held at once), a ``renew`` of each, then
its ``release``; then, in a full group, a refused ``try_acquire`` and a refused
retry of a waiting request (what a waiting ``acquire`` sends while it polls); then
admitted acquires naming a ``tokens`` amount, on a tenant's own rate and borrowing, and
acquires a rate meter refuses.
Instructions are not time (cache misses and the kernel are not counted), but a
change that removes work shows here whatever the machine is doing.

``--contended N`` adds an acquire in a group of N tenants all waiting above the
capacity (a walked level); ``--batch N`` adds ``acquire_many`` and
``release_many`` calls of N requests each, as the async client merges them,
per request. The scripts are called as the clients call them from a URL: as functions
(``FCALL``) where the server takes them; ``--evalsha`` calls them by ``EVALSHA``
(``functions=False``), to compare the two. ``--lua-dir`` runs the scripts of another
checkout (``git archive <commit> lua`` unpacked somewhere), so a before/after pair needs
no second virtualenv.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

import ratequota.engine.scripts as scripts
from ratequota import GroupPolicy, MeterPolicy, Policy, QuotaClient, TenantMeter, TenantPolicy
from ratequota.engine.protocol import acquire_call, acquire_many_call, release_many_call
from tests.servers import free_port

TENANTS = 10
#: Whether the clients call the scripts as functions (``--evalsha`` turns it off).
FUNCTIONS = [True]


class CallgrindServer:
    """A redis-server under callgrind, instrumentation on, counters read by dumps."""

    def __init__(self, binary: str = "redis-server") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rq-callgrind-"))
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={self.dir}/cg.out",
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--hz",
                "1",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        conn = redis.Redis(port=self.port, socket_timeout=60)
        for _ in range(300):
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("redis-server under valgrind did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.process.pid)], capture_output=True)

    def instructions(self, fn: Callable[[], None], keep: Path | None = None) -> int:
        """Instructions the server executed while ``fn`` ran (the dump moved to ``keep``)."""
        self._control("-z")
        fn()
        before = set(glob.glob(f"{self.dir}/cg.out*"))
        self._control("-d")
        for _ in range(200):
            new = set(glob.glob(f"{self.dir}/cg.out*")) - before
            if new:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("callgrind wrote no dump")
        path = new.pop()
        time.sleep(0.2)  # let valgrind finish writing
        total = 0
        with open(path, encoding="utf-8", errors="replace") as dump:
            for line in dump:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        if keep is None:
            os.remove(path)
        else:
            shutil.move(path, keep)
        return total

    def stop(self) -> None:
        """Stop the server by its PID and remove its folder."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _client(server: CallgrindServer, prefix: str) -> QuotaClient:
    """A client as the measures use it: long timeouts (valgrind is slow), no renewals."""
    return QuotaClient.from_url(
        server.url, prefix=prefix, socket_timeout=600.0, functions=FUNCTIONS[0]
    )


def contended(server: CallgrindServer, active: int, calls: int) -> int:
    """Instructions for ``calls`` acquires in a group of ``active`` tenants that each hold a
    lease and wait with a request far above the capacity (the level is a walked one; most
    acquires are refused, after the same decision work)."""
    quota = _client(server, "irc")
    tenants = [TenantPolicy(f"a{i}", weight=1.0 + i % 3) for i in range(active)]
    capacity = 2 * active
    policy = GroupPolicy("irc", capacity=capacity, tenants=tuple(tenants), max_lease_ttl=3600.0)
    quota.apply_policy(Policy([policy]))
    keyspace = quota.core.keyspace
    for i in range(active):
        for lease_id, units, wait in ((f"h{i}", 1, False), (f"w{i}", 4 * capacity, True)):
            call = acquire_call(
                keyspace,
                "irc",
                f"a{i}",
                units,
                lease_id,
                3_600_000,
                wait=wait,
                pending_ms=3_600_000,
                purge=64,
            )
            quota.backend.send_script(call)  # type: ignore[attr-defined]
    total = server.instructions(
        lambda: [quota.try_acquire(f"a{i % active}", 1) for i in range(calls)]
    )
    quota.close()
    return total


def refusals(server: CallgrindServer, calls: int) -> tuple[int, int]:
    """Instructions for ``calls`` refusals in a full group of 10 tenants, each holding its
    guarantee: a ``try_acquire`` beyond a guarantee (level 0, no walk), and the retry of a
    waiting request, as a waiting ``acquire`` polls."""
    quota = _client(server, "irr")
    tenants = tuple(TenantPolicy(f"a{i}", guarantee=1) for i in range(TENANTS))
    policy = GroupPolicy("irr", capacity=TENANTS, tenants=tenants, max_lease_ttl=3600.0)
    quota.apply_policy(Policy([policy]))
    for i in range(TENANTS):
        quota.try_acquire(f"a{i}", 1, ttl=3600.0)
    keyspace = quota.core.keyspace

    def waiting_retry() -> None:
        call = acquire_call(
            keyspace, "irr", "a0", 2, "w0", 3_600_000, wait=True, pending_ms=60_000, purge=64
        )
        quota.backend.send_script(call)  # type: ignore[attr-defined]

    waiting_retry()  # registers
    refused = server.instructions(lambda: [quota.try_acquire("a1", 2) for _ in range(calls)])
    polled = server.instructions(lambda: [waiting_retry() for _ in range(calls)])
    quota.close()
    return refused, polled


def metered(server: CallgrindServer, calls: int) -> tuple[int, int]:
    """Instructions for ``calls`` admitted acquires naming a ``tokens`` amount, in a group of
    10 tenants with room for every lease: on a tenant's own rate, then borrowing (a tenant
    with no rate of its own); each lease released between measures."""
    quota = _client(server, "irm")
    own = (TenantMeter("tokens", rate=10**5),)
    tenants = tuple(TenantPolicy(f"a{i}", meters=own) for i in range(TENANTS - 1))
    tenants += (TenantPolicy("borrower"),)  # no rate of its own: every token is borrowed
    meters = (MeterPolicy("tokens", rate=10**7, burst=10**7),)
    policy = GroupPolicy("irm", capacity=10**7, tenants=tenants, meters=meters,
                         max_lease_ttl=3600.0)  # fmt: skip
    quota.apply_policy(Policy([policy]))
    for i in range(2 * TENANTS):  # every tenant active, the scripts loaded
        quota.release(quota.try_acquire(f"a{i % (TENANTS - 1)}", 1, tokens=1).lease)  # type: ignore[arg-type]
    held: list[object] = []

    def acquire(tenant: Callable[[int], str]) -> None:
        for i in range(calls):
            held.append(quota.try_acquire(tenant(i), 1, tokens=10).lease)

    on_rate = server.instructions(lambda: acquire(lambda i: f"a{i % (TENANTS - 1)}"))
    for lease in held:
        quota.release(lease)  # type: ignore[arg-type]
    held.clear()
    borrowing = server.instructions(lambda: acquire(lambda i: "borrower"))
    quota.close()
    return on_rate, borrowing


def meter_refusals(server: CallgrindServer, calls: int) -> int:
    """Instructions for ``calls`` acquires refused by a rate meter (``try_acquire`` naming
    ``tokens=1`` from a tenant that only borrows, its bucket empty), their leases fitting."""
    quota = _client(server, "irq")
    tenants = tuple(TenantPolicy(f"a{i}") for i in range(TENANTS))
    meters = (MeterPolicy("tokens", rate=1, burst=1, per="minute"),)
    policy = GroupPolicy("irq", capacity=10**7, tenants=tenants, meters=meters,
                         max_lease_ttl=3600.0)  # fmt: skip
    quota.apply_policy(Policy([policy]))
    quota.try_acquire("a0", 1, tokens=1)  # the bucket's one token; the scripts loaded
    quota.try_acquire("a1", 1, tokens=1)  # refused
    refused = server.instructions(
        lambda: [quota.try_acquire(f"a{i % TENANTS}", 1, tokens=1) for i in range(calls)]
    )
    quota.close()
    return refused


def batched(server: CallgrindServer, quota: QuotaClient, size: int, calls: int) -> int:
    """Instructions for ``calls`` requests sent as ``acquire_many`` calls of ``size`` requests,
    each followed by a ``release_many`` of the leases it granted (the async client merges
    concurrent calls into these): per request, a batched acquire and its release."""
    conn = quota.backend.connection("ir")
    keyspace = quota.core.keyspace
    for spec in scripts.load_scripts().values():
        conn.script_load(spec.source)
    counter = itertools.count()

    def one_batch() -> None:
        numbers = [next(counter) for _ in range(size)]
        requests = [(f"a{n % TENANTS}", 1, f"b{n}", 60_000, False) for n in numbers]
        call = acquire_many_call(keyspace, "ir", requests, pending_ms=2000, purge=64)
        replies = quota.backend.send_script(call)  # type: ignore[attr-defined]
        held = [
            (f"b{n}", f"a{n % TENANTS}", int(reply[3]))
            for n, reply in zip(numbers, replies, strict=True)
        ]
        call = release_many_call(keyspace, "ir", held, purge=64)
        quota.backend.send_script(call)  # type: ignore[attr-defined]

    one_batch()
    return server.instructions(lambda: [one_batch() for _ in range(max(1, calls // size))])


def main(argv: list[str] | None = None) -> int:
    """Measure and print instructions per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per measure")
    parser.add_argument("--lua-dir", type=Path, help="a folder holding another version's lua/")
    parser.add_argument(
        "--contended", type=int, default=0, help="also a contended group of this many tenants"
    )
    parser.add_argument(
        "--batch", type=int, default=0, help="also acquire_many + release_many of this many"
    )
    parser.add_argument(
        "--evalsha", action="store_true", help="call the scripts by EVALSHA, not as functions"
    )
    args = parser.parse_args(argv)
    FUNCTIONS[0] = not args.evalsha
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    if args.lua_dir is not None:
        folder = args.lua_dir / "lua" if (args.lua_dir / "lua").is_dir() else args.lua_dir
        scripts._lua_dir = lambda: folder  # type: ignore[assignment]
        # An older version may lack library files this one has (_fast.lua): link what it has.
        scripts.LIBRARY = tuple(n for n in scripts.LIBRARY if (folder / f"{n}.lua").is_file())
    server = CallgrindServer()
    try:
        conn = redis.Redis(port=server.port, socket_timeout=60)
        quota = QuotaClient.from_url(
            server.url, prefix="ir", socket_timeout=60.0, functions=FUNCTIONS[0]
        )
        tenants = [TenantPolicy(f"a{i}", weight=1.0 + i % 3) for i in range(TENANTS)]
        policy = GroupPolicy("ir", capacity=10**7, tenants=tuple(tenants), max_lease_ttl=3600.0)
        quota.apply_policy(Policy([policy]))
        for i in range(3 * TENANTS):  # every tenant active; the scripts loaded
            lease = quota.try_acquire(f"a{i % TENANTS}", 1).lease
            if i >= TENANTS and lease is not None:
                quota.release(lease)
        calls = args.calls
        held: list[object] = []

        def acquire() -> None:
            for i in range(calls):
                held.append(quota.try_acquire(f"a{i % TENANTS}", 1).lease)

        def renew() -> None:
            for lease in held:
                quota.renew(lease)  # type: ignore[arg-type]

        def release() -> None:
            for lease in held:
                quota.release(lease)  # type: ignore[arg-type]

        sha = conn.script_load("return 1")
        trivial = server.instructions(lambda: [conn.evalsha(sha, 0) for _ in range(calls)])
        acquired = server.instructions(acquire)
        renewed = server.instructions(renew)
        released = server.instructions(release)
        per = [trivial / calls, acquired / calls, renewed / calls, released / calls]
        names: tuple[str, ...] = ("trivial EVALSHA", "acquire (admitted)", "renew", "release")
        if args.batch:
            requests = max(1, calls // args.batch) * args.batch
            per.append(batched(server, quota, args.batch, calls) / requests)
            names += (f"acq.+rel., {args.batch} a batch",)
        quota.close()
        refused, polled = refusals(server, calls)
        per += [refused / calls, polled / calls]
        names += ("try_acquire refused", "waiting retry refused")
        on_rate, borrowing = metered(server, calls)
        per += [on_rate / calls, borrowing / calls, meter_refusals(server, calls) / calls]
        names += ("metered, own rate", "metered, borrowing", "refused by a meter")
        if args.contended:
            per.append(contended(server, args.contended, calls) / calls)
            names += (f"acquire, {args.contended} contended",)
        print(f"instructions inside redis-server per call ({calls} calls, {TENANTS} tenants)")
        for label, value in zip(names, per, strict=True):
            print(f"  {label:<26} {value / 1000:8.1f}k  {value / per[0]:5.1f}x trivial")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
