"""The readiness probe and script loading, as commands without I/O; two small drivers run them.

A probe is a generator of commands for one server (``execute_command``
arguments): the driver sends each reply back in, or throws its exception in.
A *round* is a list of jobs — a probe and the callable that performs its
commands on its server — run concurrently (threads for the sync client,
tasks for the async one). ``check`` and ``load_everywhere`` are written once,
as generators of rounds; ``run`` and ``arun`` are the only code that differs
between the clients, and the verdict is ``ratequota.clients.readiness``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from ratequota.clients.backends import translate_error
from ratequota.clients.readiness import (
    GroupFacts,
    ReadinessReport,
    ShardFacts,
    as_text,
    conclude,
    served_groups,
)
from ratequota.clients.router import parse_catalog
from ratequota.clients.runner import REDIS_ERRORS
from ratequota.clients.scripting import load_all, reload_missing
from ratequota.engine.keys import KeySpace
from ratequota.errors import RateQuotaError

__all__ = [
    "TIME_SCRIPT",
    "arun",
    "atargets",
    "check",
    "load_everywhere",
    "read_catalog",
    "run",
    "shard_probe",
    "targets",
]

R = TypeVar("R")

#: One server's commands out, their replies in, a result at the end.
Commands = Generator[tuple[Any, ...], Any, R]
#: A probe and what performs its commands (``execute_command`` of its server).
Job = tuple[Callable[..., Any], Commands[Any]]
#: Rounds of jobs out, each round's results (a job's result or its exception) in.
Rounds = Generator[list[Job], list[Any], R]

#: The script the check runs to prove ``TIME`` may be called from Lua.
TIME_SCRIPT = "return redis.call('TIME')"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def shard_probe(
    name: str, groups: Sequence[str], keyspace: KeySpace, holds_catalog: bool
) -> Commands[ShardFacts]:
    """Ask one shard everything, as a generator of commands (both clients drive it).

    Each ``yield`` is one command for this shard; the driver sends back its reply or
    throws its exception in. ``groups`` are the groups this shard serves.
    """
    started = time.perf_counter()
    try:
        yield ("PING",)
    except Exception as exc:  # any failure means unreachable; reported, never raised
        return ShardFacts(
            name,
            error=_error(exc),
            groups=tuple(GroupFacts(g) for g in groups),
            holds_catalog=holds_catalog,
        )
    latency = time.perf_counter() - started

    info: dict[str, Any] = {}
    info_error = None
    try:
        for section in ("server", "memory", "persistence"):
            info.update((yield ("INFO", section)))
    except Exception as exc:  # INFO may be renamed or refused; not fatal
        info_error = _error(exc)

    save_points: str | None = None
    try:  # often refused (ACL, managed services): persistence is then partly unknown
        reply = yield ("CONFIG GET", "save")
        if not isinstance(reply, dict):  # a flat [name, value] list
            reply = dict(zip(reply[::2], reply[1::2], strict=True))
        save_points = as_text(next(iter(reply.values()), ""))
    except Exception:
        save_points = None

    scripts: dict[str, bool] = {}
    reloaded: list[str] = []
    script_error = None
    try:  # missing scripts are loaded, as the client would after NOSCRIPT
        scripts, reloaded = yield from reload_missing()
    except Exception as exc:
        script_error = _error(exc)

    time_reply, time_error = None, None
    try:
        time_reply = yield ("EVAL", TIME_SCRIPT, 0)
    except Exception as exc:
        time_error = _error(exc)

    facts: list[GroupFacts] = []
    for group in groups:
        try:
            reply = yield ("HMGET", keyspace.group(group).policy, "schema", "version")
        except Exception as exc:
            facts.append(GroupFacts(group, error=_error(exc)))
        else:
            facts.append(GroupFacts(group, reply[0], reply[1]))
    return ShardFacts(
        name,
        None,
        latency,
        info,
        info_error,
        scripts,
        tuple(reloaded),
        script_error,
        time_reply,
        time_error,
        tuple(facts),
        holds_catalog,
        save_points,
    )


def read_catalog(keyspace: KeySpace) -> Commands[tuple[Any, str | None]]:
    """(published policy or None, error text or None), from the catalog's shard."""
    try:
        raw = yield ("GET", keyspace.catalog)
        return parse_catalog(raw), None
    except RateQuotaError as exc:
        return None, str(exc)
    except Exception as exc:  # unreachable, refused by ACL, ...: reported, never raised
        return None, _error(exc)


def _groups_by_node(
    names: Sequence[str], node_of: Callable[[str], str], groups: Sequence[str]
) -> dict[str, list[str]]:
    by_node: dict[str, list[str]] = {name: [] for name in names}
    for group in groups:
        by_node.setdefault(node_of(group), []).append(group)
    return by_node


def check(
    nodes: Sequence[tuple[str, Callable[..., Any]]],
    node_of: Callable[[str], str],
    catalog_call: Callable[..., Any],
    keyspace: KeySpace,
    groups: Iterable[str] | None,
    *,
    socket_timeout: float,
    allow_degraded: bool,
) -> Rounds[ReadinessReport]:
    """A client's ``check()``: the catalog, then every shard at once, then the verdict.

    ``nodes`` are (name, call) per shard; ``catalog_call`` performs a command
    on the catalog's shard.
    """
    ((catalog, error),) = yield [(catalog_call, read_catalog(keyspace))]
    served = served_groups(catalog, groups)
    catalog_node = node_of(keyspace.catalog_route)
    by_node = _groups_by_node([name for name, _ in nodes], node_of, served)
    facts = yield [
        (call, shard_probe(name, by_node[name], keyspace, name == catalog_node))
        for name, call in nodes
    ]
    return conclude(
        facts, catalog, error, socket_timeout=socket_timeout, allow_degraded=allow_degraded
    )


def load_everywhere(connections: Sequence[Any], where: str, *, strict: bool) -> Rounds[None]:
    """Load every script on every server; ``strict=False`` tolerates one that is down.

    At start-up a server that is down is not fatal: the first call after it
    comes back loads the scripts through the NOSCRIPT path.
    """
    results = yield [(conn.execute_command, load_all()) for conn in connections]
    for result in results:
        if isinstance(result, REDIS_ERRORS):
            if strict:
                raise translate_error(result, where) from result
        elif isinstance(result, BaseException):
            raise result  # not Redis's doing: a bug


def targets(backend: Any) -> tuple[list[tuple[str, Callable[..., Any]]], Callable[[str], str]]:
    """(name, call) for every shard (cluster primary) of a backend, and its ``node_of``."""
    if hasattr(backend, "nodes") and hasattr(backend, "node_of"):
        nodes = [(name, conn.execute_command) for name, conn in backend.nodes()]
        return nodes, backend.node_of
    # A custom backend knowing only its connections: one "shard" per connection.
    conns = list(backend.connections())
    names = {id(c): f"redis-{i}" for i, c in enumerate(conns)}
    return (
        [(names[id(c)], c.execute_command) for c in conns],
        lambda route: names[id(backend.connection(route))],
    )


async def atargets(
    backend: Any,
) -> tuple[list[tuple[str, Callable[..., Any]]], Callable[[str], str]]:
    """``targets`` for the async client: a cluster's topology is discovered first."""
    cluster = getattr(backend, "cluster", None)
    if cluster is None:
        return targets(backend)
    await cluster.initialize()

    def aimed(node: Any) -> Callable[..., Any]:
        return lambda *args: cluster.execute_command(*args, target_nodes=node)

    return [(node.name, aimed(node)) for node in cluster.get_primaries()], backend.node_of


async def _drive(call: Callable[..., Awaitable[Any]], commands: Commands[Any]) -> Any:
    """Run one probe: its result, or the exception it raised (the round's owner decides).

    Written once, as a coroutine: the async client awaits it; the sync client
    runs it with ``_complete`` on a blocking ``call`` that never suspends.
    """
    reply: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                args = commands.send(reply) if error is None else commands.throw(error)
            except StopIteration as stop:
                return stop.value
            try:
                reply, error = await call(*args), None
            except Exception as exc:  # handed to the probe, which reports it (or raises)
                reply, error = None, exc
    except Exception as exc:
        return exc


def _blocking(call: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``call`` as a coroutine function that completes without ever suspending."""

    async def done_at_once(*args: Any) -> Any:
        return call(*args)

    return done_at_once


def _complete(job: Job) -> Any:
    """Run ``_drive`` for a blocking job to its end, in this thread, with no event loop."""
    call, commands = job
    coroutine = _drive(_blocking(call), commands)
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("a blocking probe suspended")  # pragma: no cover - a bug


def _next_round(rounds: Rounds[Any], results: Any) -> tuple[list[Job] | None, Any]:
    """(the next round, None), or (None, the result) once ``rounds`` is done."""
    try:
        return rounds.send(results), None
    except StopIteration as stop:
        return None, stop.value


def run(rounds: Rounds[R]) -> R:
    """Run every round with threads (one slow shard costs one timeout, not one each)."""
    jobs, result = _next_round(rounds, None)
    while jobs is not None:
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            jobs, result = _next_round(rounds, list(pool.map(_complete, jobs)))
    return cast(R, result)


async def arun(rounds: Rounds[R]) -> R:
    """Run every round with tasks (shards concurrently)."""
    jobs, result = _next_round(rounds, None)
    while jobs is not None:
        jobs, result = _next_round(rounds, list(await asyncio.gather(*(_drive(*j) for j in jobs))))
    return cast(R, result)
