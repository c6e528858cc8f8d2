"""Instructions the client executes per sync call, round trip stubbed (valgrind: deterministic).

Usage (from the repository root; needs ``valgrind`` on the PATH; about a minute)::

    .venv/bin/python benchmarks/client_instructions.py [--calls N] [--src DIR]

CPU time on a shared machine moves by 2-3x with its load; instruction counts
do not. This re-runs itself under ``valgrind --tool=callgrind`` on the
embedded store, records the replies of one ``try_acquire`` and one
``release``, then replaces the round trip by those replies (redis-py still
packs every command, so its per-argument encoding counts) and measures, each
inside its own ``functools.reduce`` (callgrind counts only there, one dump
each): ``try_acquire``, ``release``, and redis-py packing the same two
commands alone. ``ratequota`` is the difference: the library's own work per
call. ``--src`` measures another checkout (``git archive <commit> ratequota lua``
unpacked somewhere), so a before/after pair needs no second virtualenv.
Instructions are not time (no cache misses, no kernel), but a change that
removes work shows here whatever the machine is doing.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURES = ("try_acquire", "release", "pack try_acquire", "pack release")


def child(calls: int) -> None:
    """Under valgrind: the four measures, each one ``functools.reduce`` (one dump each)."""
    import redis

    from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy

    quota = QuotaClient(prefix="cpu")
    group = GroupPolicy("prof", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])
    quota.apply_policy(Policy([group]))
    conn = quota.backend.connection("prof")
    real = conn.evalsha
    replies: dict[object, object] = {}
    wires: dict[str, tuple[object, ...]] = {}

    def record(*args: object) -> object:
        replies[args[0]] = reply = real(*args)
        wires["try_acquire" if "try_acquire" not in wires else "release"] = args
        return reply

    conn.evalsha = record
    lease = quota.try_acquire("t", 1).lease
    assert lease is not None
    quota.release(lease)
    pack = redis.Connection().pack_command

    def stubbed(*args: object) -> object:
        pack("EVALSHA", *args)
        return replies[args[0]]

    conn.evalsha = stubbed
    runs = {
        "try_acquire": lambda: quota.try_acquire("t", 1),
        "release": lambda: quota.release(lease),
        "pack try_acquire": lambda: pack("EVALSHA", *wires["try_acquire"]),
        "pack release": lambda: pack("EVALSHA", *wires["release"]),
    }
    for name in MEASURES:
        run = runs[name]
        functools.reduce(lambda _a, _b: run(), range(calls), None)


def totals(pattern: str) -> list[int]:
    """The instruction total of each dump, in dump order."""
    found = []
    for path in sorted(glob.glob(pattern), key=lambda p: int(p.rsplit(".", 1)[1])):
        text = Path(path).read_text()
        match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        found.append(int(match.group(1)) if match else 0)
    return found


def main() -> int:
    """Run the child under callgrind and print instructions per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--src", help="a checkout's root holding ratequota/ and lua/")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.src).resolve() if args.src else Path(__file__).resolve().parent.parent
    if args.child:
        sys.path.insert(0, str(root))
        child(args.calls)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=functools_reduce",
            "--dump-after=functools_reduce",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            "--calls",
            str(args.calls),
            "--src",
            str(root),
        ]
        subprocess.run(command, check=True, capture_output=True)
        # Any reduce of the imports dumps too (with nothing of ours in it): the last four.
        counts = totals(out + ".*")[-len(MEASURES) :]
    if len(counts) != len(MEASURES):
        print(f"expected {len(MEASURES)} dumps, got {len(counts)}", file=sys.stderr)
        return 1
    per = {name: count / args.calls for name, count in zip(MEASURES, counts, strict=True)}
    print(f"client instructions per call ({root}, {args.calls} calls, round trip stubbed)")
    for call in ("try_acquire", "release"):
        total, pack = per[call], per[f"pack {call}"]
        own = total - pack
        print(f"  {call:<12} {total:>9,.0f}  redis-py packing {pack:>7,.0f}  ours {own:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
