"""Where a fast decision's instructions go inside Redis, and the floor its commands set.

Usage (from the repository root; needs ``valgrind`` on the PATH; about a minute)::

    .venv/bin/python benchmarks/command_floor.py [--calls N]

Issue 11 asks for a decision at most 6× a trivial ``EVALSHA "return 1"`` inside
Redis. This measures, with ``bench_instructions.py``'s redis-server under callgrind
(instructions, not time: repeatable whatever the machine's load), what each part
of an admitted ``acquire`` and of a ``release`` costs, by running cut-down scripts
on the same group (10 tenants, 250 live leases) with the real call's keys and
arguments:

* the trivial script, bare and with the call's keys and arguments (what Redis
  spends to hand them to Lua);
* **the commands only**: a script that issues exactly the commands the real
  script issued for one such call (recorded with ``MONITOR``), with the same
  arguments, the lease id following the call's, and no logic at all. Nothing
  that issues these commands can cost less: it is the floor of the design's
  reads and writes;
* the script's definitions only (the library text it runs before its first
  command: Redis runs a script's whole text on every call), then the definitions
  with the commands;
* the real script.

The decision logic is the real script less the definitions and the commands.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from bench_instructions import CallgrindServer

from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy
from ratequota.engine.protocol import acquire_call, release_call
from ratequota.engine.scripts import load_scripts

TENANTS = 10
LIVE = 250
#: Where each entry script's body starts: what comes before is its definitions.
BODY_STARTS = {
    "acquire": "local now = now_ms(ARGV[1])",
    "release": "local now = now_ms(ARGV[1])",
}


def record(url: str, fn: Any) -> list[list[str]]:
    """The commands scripts issued while ``fn`` ran, as argument lists (``MONITOR``)."""
    watcher = redis.Redis.from_url(url, socket_timeout=60)
    lines: list[list[str]] = []
    ready = threading.Event()

    def watch() -> None:
        with watcher.monitor() as monitor:  # MONITOR sent and answered
            ready.set()
            while True:
                raw = monitor.connection.read_response()  # type: ignore[union-attr]
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                source, _, rest = text.partition("]")
                words = shlex.split(rest)
                if words[0].upper() == "ECHO" and words[1:] == ["command-floor-end"]:
                    return
                if source.endswith(" lua"):  # issued by a script, not by a client
                    lines.append(words)

    thread = threading.Thread(target=watch)
    thread.start()
    ready.wait(60)
    fn()
    redis.Redis.from_url(url, socket_timeout=60).echo("command-floor-end")
    thread.join(60)
    watcher.close()
    return lines


def replay_script(commands: list[list[str]], lease_id: str, keys: list[str]) -> str:
    """A script issuing ``commands`` and nothing else."""
    out = []
    for words in commands:
        args = []
        for word in words:
            if word in keys:
                args.append(f"KEYS[{keys.index(word) + 1}]")
            elif lease_id in word:
                pieces = [repr(p) for p in word.split(lease_id)]
                args.append(" .. ARGV[1] .. ".join(pieces))
            else:
                args.append(repr(word))
        out.append(f"redis.call({', '.join(args)})")
    return "\n".join(out) + "\nreturn 1\n"


def replayer(run: Any, calls: list[Any], sha: str | None, ids: list[str]) -> Any:
    """Runs ``calls`` as they are (``sha`` None) or through the script ``sha``, with each
    call's arguments but the first replaced by its lease id (the replay's ARGV[1])."""

    def go() -> None:
        for call, lease_id in zip(calls, ids, strict=True):
            if sha is None:
                run(call)
            else:
                run(call, sha, [lease_id, *call.args[1:]])

    return go


def main(argv: list[str] | None = None) -> int:
    """Measure and print the parts of an acquire and of a release."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per measure")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    calls = args.calls
    sources = {name: spec.source for name, spec in load_scripts().items()}
    server = CallgrindServer()
    try:
        conn = redis.Redis(port=server.port, socket_timeout=600)
        quota = QuotaClient.from_url(server.url, prefix="cf", socket_timeout=600.0)
        tenants = [TenantPolicy(f"t{i}", guarantee=10**6) for i in range(TENANTS)]
        group = GroupPolicy("cf", capacity=10**9, tenants=tenants, max_lease_ttl=3600.0)
        quota.apply_policy(Policy([group]))
        keyspace = quota.core.keyspace
        for i in range(LIVE):
            quota.try_acquire(f"t{i % TENANTS}", 1)
        for source in sources.values():
            conn.script_load(source)
        serial = iter(range(10**9))

        def acquire(lease_id: str, tenant: str) -> Any:
            return acquire_call(
                keyspace, "cf", tenant, 1, lease_id, 600_000, wait=False, pending_ms=1000,
                purge=64,
            )  # fmt: skip

        def run(call: Any, sha: str | None = None, argv: list[Any] | None = None) -> Any:
            return conn.evalsha(
                sha or call.script.sha, len(call.keys), *call.keys, *(argv or call.args)
            )

        # One admitted acquire and its release, recorded (after one of each: the ledger's
        # fields of the hour exist, as they do for every release but an hour's first).
        warm = run(acquire("warm", "t3"))
        run(release_call(keyspace, "cf", "warm", tenant="t3", token=int(warm[3]), purge=64))
        first = acquire("recorded-0", "t3")
        acquired: list[Any] = []
        acq_cmds = record(server.url, lambda: acquired.append(run(first)))
        token = int(acquired[0][3])
        done = release_call(keyspace, "cf", "recorded-0", tenant="t3", token=token, purge=64)
        rel_cmds = record(server.url, lambda: run(done))

        rows: list[tuple[str, float]] = []
        trivial = conn.script_load("return 1")

        def measure(label: str, fn: Any) -> None:
            rows.append((label, server.instructions(fn) / calls))

        measure("trivial EVALSHA, no arguments", lambda: [
            conn.evalsha(trivial, 0) for _ in range(calls)])  # fmt: skip
        sample = acquire("x", "t1")
        measure("trivial, acquire's keys and arguments", lambda: [
            run(sample, trivial) for _ in range(calls)])  # fmt: skip

        for name, commands, lease_id in (
            ("acquire", acq_cmds, "recorded-0"),
            ("release", rel_cmds, "recorded-0"),
        ):
            source = sources[name]
            defs = source[: source.index(BODY_STARTS[name])]
            replay = replay_script(commands, lease_id, list(first.keys))
            shas = {
                "commands only": conn.script_load(replay),
                "definitions only": conn.script_load(defs + "\nreturn 1\n"),
                "definitions + commands": conn.script_load(defs + "\n" + replay),
                "the real script": None,
            }
            count = len(commands)
            for label, sha in shas.items():
                batch = [f"f{next(serial)}" for _ in range(calls)]
                tenants_of = [f"t{i % TENANTS}" for i in range(calls)]
                if name == "release":  # live leases to release, taken before counting
                    tokens = [
                        int(run(acquire(i, t))[3]) for i, t in zip(batch, tenants_of, strict=True)
                    ]
                    batch_calls = [
                        release_call(keyspace, "cf", i, tenant=t, token=k, purge=64)
                        for i, t, k in zip(batch, tenants_of, tokens, strict=True)
                    ]
                else:
                    batch_calls = [acquire(i, t) for i, t in zip(batch, tenants_of, strict=True)]
                measure(
                    f"{name}: {label}" + (f" ({count})" if "commands" in label else ""),
                    replayer(run, batch_calls, sha, batch),
                )
        quota.close()
    finally:
        server.stop()
    base = rows[0][1]
    print(f"instructions inside redis-server per call ({calls} calls, {TENANTS} tenants, "
          f"{LIVE} live leases)")  # fmt: skip
    for label, value in rows:
        print(f"  {label:<46} {value / 1000:8.1f}k  {value / base:5.1f}x trivial")
    print("  (commands: how many the recorded call issued, TIME included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
