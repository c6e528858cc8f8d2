"""Where inside redis-server one kind of script call spends its instructions (valgrind).

Usage (from the repository root; needs ``valgrind`` and a redis-server built with symbols)::

    .venv/bin/python benchmarks/redis_profile.py --server PATH/TO/redis-server \\
        [--what acquire|release|renew|trivial] [--calls N] [--evalsha]

``bench_instructions.py`` counts a call's instructions; this splits them by the functions of
the server that ran them, grouped into what a script call is made of: taking the call in
and answering it, handing the keys and arguments to Lua, the commands the script issues
(their execution, the conversion of their arguments and of their replies to Lua), the
Lua code itself (string patterns, numbers read from text and written as text,
concatenation, tables) and Lua's garbage collector. Groups overlap where one function runs
inside another (the commands' reply conversion is part of the commands), so shares do not
add up to 100 %.

The Debian package's redis-server has no symbols (every function shows as ``???``). One with
them takes about two minutes on two cores, from the release's tag of github.com/redis/redis::

    git clone --depth 1 --branch 7.0.15 https://github.com/redis/redis /tmp/redis
    make -C /tmp/redis -j2 CFLAGS=-g    # then --server /tmp/redis/src/redis-server

The setup is ``bench_instructions.py``'s: a group of 10 tenants, every tenant active, the
scripts called as functions (``--evalsha``: by ``EVALSHA``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from benchmarks.bench_instructions import TENANTS, CallgrindServer
from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy

#: (label, functions whose inclusive cost it is), in the order printed.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the whole command (FCALL / EVALSHA)", ("fcallCommand", "evalShaCommand")),
    ("  the script's own run (lua_pcall)", ("lua_pcall",)),
    ("  keys and arguments to Lua, reply out", ("luaCallFunction", "-lua_pcall")),
    ("    of which the reply to the client", ("luaReplyToRedisReply",)),
    ("  commands the script issues (redis.call)", ("luaRedisGenericCommand",)),
    ("    their execution (call)", ("scriptCall",)),
    ("    their replies converted to Lua", ("redisProtocolToLuaType",)),
    ("    their arguments converted from Lua", ("luaArgsToRedisArgv",)),
    ("  string.match / string.find", ("str_find_aux",)),
    ("  string.format", ("str_format",)),
    ("  text read as numbers (x - 0, tonumber)", ("luaO_str2d",)),
    ("  concatenation", ("luaV_concat",)),
    ("  new tables", ("luaH_new",)),
    ("  garbage collection (Lua's steps, Redis' lua_gc)", ("luaC_step", "lua_gc")),
)


def inclusive_costs(dump: Path) -> dict[str, int]:
    """Inclusive instructions per function name, as callgrind_annotate reports them."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].replace(",", "").isdigit() or ":" not in parts[2]:
            continue
        name = parts[2].split(":", 1)[1].split(" ")[0].split("'")[0]
        costs[name] = max(costs.get(name, 0), int(parts[0].replace(",", "")))
    return costs


def group_cost(costs: dict[str, int], names: tuple[str, ...]) -> int:
    """The sum of ``names``' costs (a name with a leading '-' is subtracted); a name that
    ends a prefix (``redisProtocolToLuaType``) takes the largest of the functions it starts."""
    total = 0
    for name in names:
        sign = -1 if name.startswith("-") else 1
        name = name.lstrip("-")
        matching = [c for n, c in costs.items() if n == name or n.startswith(name + "_")]
        if name in costs:
            matching = [costs[name]]
        total += sign * max(matching, default=0)
    return total


def main(argv: list[str] | None = None) -> int:
    """Run the calls under callgrind and print their instructions by group."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", default="redis-server", help="a redis-server with symbols")
    parser.add_argument(
        "--what", choices=("acquire", "release", "renew", "trivial"), default="acquire"
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--evalsha", action="store_true", help="by EVALSHA, not as functions")
    args = parser.parse_args(argv)
    if shutil.which("callgrind_annotate") is None:
        print("valgrind (with callgrind_annotate) is not installed", file=sys.stderr)
        return 2
    server = CallgrindServer(args.server)
    dump = Path(tempfile.mkdtemp(prefix="rq-profile-")) / "cg.out"
    try:
        quota = QuotaClient.from_url(
            server.url, prefix="ir", socket_timeout=600.0, functions=not args.evalsha
        )
        tenants = [TenantPolicy(f"a{i}", weight=1.0 + i % 3) for i in range(TENANTS)]
        policy = GroupPolicy("ir", capacity=10**7, tenants=tuple(tenants), max_lease_ttl=3600.0)
        quota.apply_policy(Policy([policy]))
        held = [quota.try_acquire(f"a{i % TENANTS}", 1).lease for i in range(3 * TENANTS)]
        if args.what in ("release", "renew"):
            held = [quota.try_acquire(f"a{i % TENANTS}", 1).lease for i in range(args.calls)]
        conn = redis.Redis(port=server.port, socket_timeout=600)
        sha = conn.script_load("return 1")
        runs = {
            "acquire": lambda: [quota.try_acquire(f"a{i % TENANTS}", 1) for i in range(args.calls)],
            "release": lambda: [quota.release(lease) for lease in held],  # type: ignore[arg-type]
            "renew": lambda: [quota.renew(lease) for lease in held],  # type: ignore[arg-type]
            "trivial": lambda: [conn.evalsha(sha, 0) for _ in range(args.calls)],
        }
        total = server.instructions(runs[args.what], keep=dump)  # type: ignore[arg-type]
        quota.close()
        costs = inclusive_costs(dump)
    finally:
        server.stop()
    if not any(name in costs for name in ("lua_pcall", "luaCallFunction")):
        print("no symbols in this redis-server: build one (see --help)", file=sys.stderr)
        return 2
    per = total / args.calls
    print(
        f"instructions inside redis-server per {args.what} ({args.calls} calls): {per / 1000:.1f}k"
    )
    for label, names in GROUPS:
        cost = group_cost(costs, names) / args.calls
        print(f"  {label:50s} {cost / 1000:7.1f}k  {100 * cost / per:5.1f} %")
    # What the groups inside the script's run leave: Lua's bytecode, calls and table reads.
    inner = (
        "luaRedisGenericCommand",
        "str_find_aux",
        "str_format",
        "luaO_str2d",
        "luaV_concat",
        "luaH_new",
        "luaC_step",
    )
    rest = max(0, group_cost(costs, ("lua_pcall",)) - group_cost(costs, inner)) / args.calls
    label = "  the rest of the run (bytecode, calls, lookups)"
    print(f"  {label:50s} {rest / 1000:7.1f}k  {100 * rest / per:5.1f} %  (about)")
    shutil.rmtree(dump.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
