"""Instructions the sync client executes per call, socket stubbed (valgrind: deterministic).

Usage (from the repository root; needs ``valgrind`` and ``redis-server`` on the PATH;
about a minute)::

    .venv/bin/python benchmarks/client_instructions.py [--calls N] [--src DIR]

CPU time on a shared machine moves by 2-3x with its load; instruction counts
do not. This starts a redis-server, then re-runs itself under ``valgrind
--tool=callgrind``: the child makes a ``QuotaClient.from_url`` client (the
production stack: redis-py's blocking pool, its connection, hiredis), sends
one real ``try_acquire``, ``release`` and trivial ``EVALSHA "return 1"``
while recording the bytes each reply took on the socket, then replaces the
connection's socket by one that plays those bytes back. Every layer of the
client still runs (our flow, the pool, packing, the parser); only the kernel
and Redis are gone. Each measure runs inside its own ``functools.reduce``
(callgrind counts only there, one dump each): ``try_acquire``, ``release``
and a bare redis-py ``evalsha`` of the trivial script, whose count is what any
call costs the client; "over a bare call" is ratequota's part.

``--src`` measures another checkout (``git archive <commit> ratequota lua``
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MEASURES = ("bare EVALSHA", "bare, packed", "try_acquire", "release")
#: Where the SHA of an EVALSHA starts in its RESP form: the key of a recorded reply.
_SHA_AT = b"EVALSHA\r\n$40\r\n"


class ReplayedSocket:
    """A connection's socket: first records the real replies by script, then plays them back.

    ``fileno`` stays the real socket's (idle, so the pool's readiness poll sees nothing to
    read, as it would on a healthy connection).
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._replies: dict[bytes, bytearray] = {}
        self._key = b""
        self._queued = b""
        self.replaying = False

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def settimeout(self, timeout: float | None) -> None:
        if not self.replaying:
            self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()  # type: ignore[no-any-return]

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def sendall(self, data: bytes) -> None:
        at = bytes(data).find(_SHA_AT) + len(_SHA_AT)
        self._key = bytes(data[at : at + 40])
        if self.replaying:
            self._queued = bytes(self._replies[self._key])
        else:
            self._replies[self._key] = bytearray()
            self._sock.sendall(data)

    def recv_into(self, buffer: Any, *args: Any) -> int:
        if not self.replaying:
            n = int(self._sock.recv_into(buffer, *args))
            self._replies[self._key] += bytes(buffer[:n])
            return n
        data, self._queued = self._queued, b""
        buffer[: len(data)] = data
        return len(data)


def child(url: str, calls: int) -> None:
    """Under valgrind: the measures, each one ``functools.reduce`` (one dump each)."""
    from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy

    # No catalog refresh in the background: its thread would take a connection of the pool
    # for a moment, and the replies recorded on the stubbed one could be missing.
    quota = QuotaClient.from_url(url, prefix="cpu", catalog_ttl=3600.0)
    group = GroupPolicy("prof", capacity=10**9, tenants=[TenantPolicy("t", guarantee=10**6)])
    quota.apply_policy(Policy([group]))
    client = quota.backend.connection("prof")
    trivial = client.script_load("return 1")
    pool = client.connection_pool
    conn = pool.get_connection()
    pool.release(conn)
    _, lease = stub_socket(quota, client, trivial)
    runs = {
        "bare EVALSHA": lambda: client.evalsha(trivial, 0),
        "try_acquire": lambda: quota.try_acquire("t", 1),
        "release": lambda: quota.release(lease),
    }
    try:
        from ratequota.clients.backends import PackedScripts
        from ratequota.engine.ops import ScriptCall
        from ratequota.engine.scripts import ScriptSpec
    except ImportError:  # a checkout from before the packed path
        runs["bare, packed"] = runs["bare EVALSHA"]
    else:
        try:
            sender = PackedScripts.of(client, functions=False)  # a bare EVALSHA, no library
        except TypeError:  # a checkout from before functions
            sender = PackedScripts.of(client)
        assert sender is not None
        spec = ScriptSpec("trivial", "return 1", trivial, (), (), False)
        call = ScriptCall(spec, "prof", (), ())
        runs["bare, packed"] = lambda: sender(call)
    for name in MEASURES:
        assert pool.get_connection() is conn  # every call below goes through the one socket
        pool.release(conn)
        run = runs[name]
        run()
        functools.reduce(lambda _a, _b: run(), range(calls), None)


def totals(pattern: str) -> list[int]:
    """The instruction total of each dump, in dump order."""
    found = []
    for path in sorted(glob.glob(pattern), key=lambda p: int(p.rsplit(".", 1)[1])):
        text = Path(path).read_text()
        match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        found.append(int(match.group(1)) if match else 0)
    return found


def run_measured(script: str, child_args: list[str], measures: int) -> list[int]:
    """Run ``script --child *child_args`` under callgrind, counting only inside each
    ``functools.reduce`` the child wraps a measure in: the instruction totals of the last
    ``measures`` dumps (any reduce of the imports dumps too, with nothing of ours in it)."""
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
            script,
            "--child",
            *child_args,
        ]
        subprocess.run(command, check=True, capture_output=True)
        return totals(out + ".*")[-measures:]


def per_call_on_redis(
    script: str, child_args: Callable[[str], list[str]], measures: Sequence[str], calls: int
) -> dict[str, float] | None:
    """Start a redis-server, run ``script``'s child against it (``child_args(url)``) under
    callgrind, and give each measure's instructions per call (None, said on stderr, when the
    child dumped a different number of measures)."""
    from tests.servers import RedisServer

    server = RedisServer().start()
    try:
        counts = run_measured(script, child_args(server.url), len(measures))
    finally:
        server.cleanup()
    if len(counts) != len(measures):
        print(f"expected {len(measures)} dumps, got {len(counts)}", file=sys.stderr)
        return None
    return {name: count / calls for name, count in zip(measures, counts, strict=True)}


def share_connection(quota: Any, conn: Any) -> None:
    """Make the packed sender's own connections (``clients.connections``, where the checkout
    has them) the pool's one ``conn``, so every measure goes through the one stubbed socket.
    One thread: the pool and the stack never hand it out at once."""
    for sender in getattr(quota.backend, "_senders", ()):
        stack = getattr(sender, "connections", None)
        if stack is not None:
            stack.close()
            stack._reset()
            stack._idle.append(conn)
            stack._mine.add(conn)
            stack._count = 1


def stub_socket(quota: Any, client: Any, trivial: str) -> tuple[ReplayedSocket, Any]:
    """Replace the socket of ``client``'s pooled connection by a ``ReplayedSocket``, record a
    ``try_acquire``, its ``release`` and a bare ``EVALSHA`` of ``trivial`` on it, then replay:
    the wire, and the lease whose release is replayed."""
    pool = client.connection_pool
    conn = pool.get_connection()
    pool.release(conn)
    wire = ReplayedSocket(conn._sock)
    conn._sock = conn._parser._sock = wire
    share_connection(quota, conn)
    lease = quota.try_acquire("t", 1).lease
    assert lease is not None
    quota.release(lease)
    client.evalsha(trivial, 0)
    wire.replaying = True
    return wire, lease


def main() -> int:
    """Start Redis, run the child under callgrind and print instructions per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--src", help="a checkout's root holding ratequota/ and lua/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    root = Path(args.src).resolve() if args.src else here
    if args.child:
        sys.path.insert(0, str(root))
        child(args.child, args.calls)
        return 0
    sys.path.insert(0, str(here))
    per = per_call_on_redis(
        __file__,
        lambda url: [url, "--calls", str(args.calls), "--src", str(root)],
        MEASURES,
        args.calls,
    )
    if per is None:
        return 1
    bare = per["bare EVALSHA"]
    print(f"client instructions per call ({root}, {args.calls} calls, socket stubbed)")
    for name in MEASURES:
        print(f"  {name:<13} {per[name]:>9,.0f}   over a bare call {per[name] - bare:>+9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
