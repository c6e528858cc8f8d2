"""Instructions the async client executes per decision, real round trips (valgrind: deterministic).

Usage (from the repository root; needs ``valgrind`` and ``redis-server`` on the PATH; a minute
or two)::

    .venv/bin/python benchmarks/async_instructions.py [--calls N] [--src DIR]

The async client's overhead is mostly asyncio's (tasks, futures, event-loop
iterations around each round trip), which a stubbed round trip would hide, so
unlike ``client_instructions.py`` this one talks to a real redis-server (started
here, outside valgrind: only the client is counted). Each measure runs ``--calls``
awaited calls inside its own ``functools.reduce`` (callgrind counts only there, one
dump each), on a ``redis.asyncio`` connection made as the client makes its own:

- one caller: a bare ``EVALSHA "return 1"``, the same trivial script with
  acquire's keys and arguments (what redis-py spends on them), the same sent
  packed as the client sends it where it has no pipe (``AsyncPackedScripts``: the
  transport alone; "—" for a checkout without it), the same on the client's own
  pipe (``ScriptPipe``, the transport the client uses from a URL), ``try_acquire``
  and ``release``;
- 64 concurrent callers (``bench_async.py``'s load): the bare ``EVALSHA`` each on
  its own connection, and ``try_acquire`` through the batcher; per decision.

The client's own work per decision is the difference from the bare call. The
kernel's work (send, receive, poll) is not in the counts, nor is the time the
client waits; counts move by a few per cent when a reply is not ready at the
loop's first poll. ``--src`` measures another checkout (``git archive <commit>
ratequota lua`` unpacked somewhere), so a before/after pair needs no second
virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_instructions import per_call_on_redis

MEASURES = (
    "bare EVALSHA",
    "EVALSHA, acquire's arguments",
    "the same, sent packed",
    "the same, on the client's pipe",
    "try_acquire",
    "release",
    "bare EVALSHA, 64 callers",
    "try_acquire, 64 callers",
)
CALLERS = 64


def child(url: str, calls: int) -> None:
    """Under valgrind: the measures, each one ``functools.reduce`` (one dump each)."""
    from ratequota import AsyncQuotaClient, GroupPolicy, Policy, TenantPolicy
    from ratequota.clients.backends import _redis_from_url
    from ratequota.engine.ops import ScriptCall
    from ratequota.engine.protocol import acquire_call
    from ratequota.engine.scripts import ScriptSpec

    tenants = [f"t{i}" for i in range(10)]
    group = GroupPolicy("prof", capacity=10**9, tenants=[TenantPolicy(t, 10**6) for t in tenants])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    run = loop.run_until_complete
    quota = AsyncQuotaClient.from_url(url, prefix="cpu", lease_ttl=600.0)
    run(quota.apply_policy(Policy([group])))
    conn = _redis_from_url(url, quota.core.settings.socket_timeout, aio=True)
    sha = run(conn.script_load("return 1"))
    call = acquire_call(
        quota.core.keyspace,
        "prof",
        "t0",
        1,
        "0123456789abcdef",
        60_000,
        wait=False,
        pending_ms=1000,
        purge=64,
    )
    wide = (sha, len(call.keys), *call.keys, *call.args)
    trivial = ScriptCall(
        ScriptSpec("trivial", "return 1", sha, (), (), True), "prof", call.keys, call.args
    )
    send_packed: Any = None
    try:
        from ratequota.clients.async_backends import AsyncPackedScripts

        send_packed = AsyncPackedScripts.of(conn)
    except ImportError:  # a checkout from before the packed path (not printed)
        pass
    send_piped: Any = None
    try:
        from ratequota.clients.script_pipe import ScriptPipe

        send_piped = quota.backend.script_sender("prof")
        if not isinstance(send_piped, ScriptPipe):
            send_piped = None
    except ImportError:  # a checkout from before the pipe (not printed)
        pass
    held: list[Any] = []

    async def acquire(i: int) -> None:
        held.append((await quota.try_acquire(tenants[i % len(tenants)], 1)).lease)

    async def release(i: int) -> None:
        await quota.release(held.pop())

    async def bare(i: int) -> None:
        await conn.evalsha(sha, 0)

    async def with_arguments(i: int) -> None:
        await conn.evalsha(*wide)

    async def packed(i: int) -> None:
        if send_packed is None:
            await conn.evalsha(*wide)
        else:
            await send_packed(trivial)

    async def piped(i: int) -> None:
        if send_piped is None:
            await conn.evalsha(*wide)
        else:
            await send_piped(trivial)

    async def alone(one: Callable[[int], Awaitable[None]], n: int) -> None:
        for i in range(n):
            await one(i)

    async def together(one: Callable[[int], Awaitable[None]], n: int) -> None:
        async def caller(i: int) -> None:
            for _ in range(n // CALLERS):
                await one(i)

        await asyncio.gather(*(caller(i) for i in range(CALLERS)))

    runs: dict[str, Callable[[], Awaitable[None]]] = {
        "bare EVALSHA": lambda: alone(bare, calls),
        "EVALSHA, acquire's arguments": lambda: alone(with_arguments, calls),
        "the same, sent packed": lambda: alone(packed, calls),
        "the same, on the client's pipe": lambda: alone(piped, calls),
        "try_acquire": lambda: alone(acquire, calls),
        "release": lambda: alone(release, calls),
        "bare EVALSHA, 64 callers": lambda: together(bare, calls),
        "try_acquire, 64 callers": lambda: together(acquire, calls),
    }
    for warm in ("bare EVALSHA, 64 callers", "try_acquire", "release", "try_acquire, 64 callers"):
        run(runs[warm]())  # connections opened, scripts and catalog loaded
    held.clear()
    for name in MEASURES:
        measure = runs[name]
        functools.reduce(lambda _a, _b: run(measure()), range(1), None)
    run(quota.close())
    run(conn.aclose())
    loop.close()


def main() -> int:
    """Start a redis-server, run the child under callgrind, print instructions per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1024)
    parser.add_argument("--src", help="a checkout's root holding ratequota/ and lua/")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.src).resolve() if args.src else Path(__file__).resolve().parent.parent
    if args.child:
        sys.path.insert(0, str(root))
        child(args.url, args.calls)
        return 0
    calls = max(CALLERS, args.calls // CALLERS * CALLERS)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    per = per_call_on_redis(
        __file__,
        lambda url: ["--calls", str(calls), "--src", str(root), "--url", url],
        MEASURES,
        calls,
    )
    if per is None:
        return 1
    print(f"async client instructions per call ({root}, {calls} calls, real round trips)")
    packs = "AsyncPackedScripts" in (root / "ratequota/clients/async_backends.py").read_text()
    pipes = (root / "ratequota/clients/script_pipe.py").exists()
    for name in MEASURES:
        if (name == "the same, sent packed" and not packs) or ("pipe" in name and not pipes):
            print(f"  {name:<30} {'—':>10}")
            continue
        bare = per["bare EVALSHA, 64 callers" if "64" in name else "bare EVALSHA"]
        print(f"  {name:<30} {per[name]:>10,.0f}   over the bare call {per[name] - bare:>+10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
