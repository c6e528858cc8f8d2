"""Is this pod's quota backend usable? The check behind ``quota.check()`` and ``ratequota check``.

Two halves, kept apart on purpose:

- the probes (``ratequota.clients.probes``, written once without I/O, run
  by either client): ask every shard (every cluster primary) a few
  questions — PING and its round trip, ``INFO`` (server version,
  ``maxmemory_policy``), ``SCRIPT EXISTS`` for every script (loading any that
  are missing, as the client would on NOSCRIPT), a tiny script calling
  ``TIME``, and the ``schema``/``version`` of each served group's policy
  hash — plus the routing catalog from its shard. It records raw answers
  and errors in ``ShardFacts`` and judges nothing.
- ``evaluate`` (pure): turns those facts into a ``ReadinessReport`` — one
  ``ShardReport`` per shard with its problems (the pod must not take
  traffic) and warnings (it may, but an operator should look), and an
  overall ``ready`` flag. Being pure, every verdict is unit-tested without
  Redis.

What makes a shard not ready: unreachable; scripts that cannot be loaded
(an ACL without ``SCRIPT``/``EVALSHA``); ``TIME`` refused inside scripts; a
served group whose policy is missing or written by a newer schema. The
catalog missing (nothing published) or unreadable makes the whole pod not
ready. Warnings: ``maxmemory-policy`` ``allkeys-*`` (Redis may evict any
limiter key, the published policy included) or ``volatile-*`` (it may evict
live lease state, which carries an expiry), a server without persistence
(no AOF, no RDB save points: a restart forgets every lease, and its groups
wait out a recovery window), and a slow round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ratequota.engine.keys import SCHEMA_VERSION

__all__ = [
    "GroupFacts",
    "ReadinessReport",
    "ShardFacts",
    "ShardReport",
    "as_text",
    "conclude",
    "evaluate",
    "persistence_of",
    "served_groups",
]


@attrs.frozen
class GroupFacts:
    """Raw answer for one served group's policy hash (``HMGET schema version``)."""

    group: str
    schema: Any = None
    version: Any = None
    error: str | None = None


@attrs.frozen
class ShardFacts:
    """Raw answers from one shard; ``error`` set means PING failed and nothing else was asked."""

    name: str
    error: str | None = None
    latency: float | None = None
    info: Mapping[str, Any] = attrs.field(factory=dict)
    info_error: str | None = None
    scripts: Mapping[str, bool] = attrs.field(factory=dict)
    reloaded: tuple[str, ...] = ()
    script_error: str | None = None
    time_reply: Any = None
    time_error: str | None = None
    groups: tuple[GroupFacts, ...] = ()
    holds_catalog: bool = False
    #: ``CONFIG GET save`` (RDB save points, "" for none); None when it could not be asked.
    save_points: str | None = None


@attrs.frozen
class ShardReport:
    """The verdict on one shard; ``ready`` when it has no problems."""

    name: str
    reachable: bool
    latency_ms: float | None
    version: str
    scripts: str
    time_in_scripts: bool | None
    maxmemory_policy: str
    groups_checked: int
    groups_missing: tuple[str, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    #: ``aof``, ``rdb``, ``aof+rdb``, ``none`` or ``unknown`` (see ``persistence_of``).
    persistence: str = "unknown"

    @property
    def ready(self) -> bool:
        """No problem on this shard."""
        return not self.problems


@attrs.frozen
class ReadinessReport:
    """Per-shard reports and the verdict: ``ready`` means this pod may take traffic."""

    shards: tuple[ShardReport, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    ready: bool

    #: The columns of ``rows``.
    COLUMNS = (
        "shard",
        "ok",
        "latency",
        "version",
        "scripts",
        "TIME",
        "policies",
        "maxmemory",
        "persistence",
    )

    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per shard, in ``COLUMNS`` order."""
        rows: list[tuple[str, ...]] = []
        for s in self.shards:
            latency = "-" if s.latency_ms is None else f"{s.latency_ms:.1f}ms"
            time_ok = {True: "yes", False: "NO", None: "-"}[s.time_in_scripts]
            policies = (
                f"{s.groups_checked - len(s.groups_missing)}/{s.groups_checked}"
                if s.reachable
                else "-"
            )
            rows.append(
                (
                    s.name,
                    "yes" if s.ready else "NO",
                    latency,
                    s.version,
                    s.scripts,
                    time_ok,
                    policies,
                    s.maxmemory_policy,
                    s.persistence if s.reachable else "-",
                )
            )
        return rows

    def notes(self) -> list[str]:
        """The lines under the table: problems, warnings, then the verdict."""
        # Problems a ready report still has were tolerated (allow_degraded).
        label = "degraded" if self.ready else "problem"
        lines = [f"{label}: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("READY" if self.ready else "NOT READY")
        return lines

    def table(self) -> str:
        """The report as a fixed-width table, then the problems and warnings."""
        rows = [self.COLUMNS, *self.rows()]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(self.COLUMNS))]
        lines = [
            "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        return "\n".join(lines + self.notes())


def served_groups(catalog: Any, groups: Iterable[str] | None) -> list[str]:
    """The groups to check: those given, else every group of the published policy."""
    if groups is not None:
        return list(dict.fromkeys(groups))
    if catalog is None:
        return []
    return [g.name for g in catalog.groups]


def as_text(value: Any) -> str:
    """A reply value as text (bytes decoded, invalid UTF-8 replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def persistence_of(facts: ShardFacts) -> str:
    """What survives a restart of this server: ``aof``, ``rdb``, ``aof+rdb``, ``none``, ``unknown``.

    AOF comes from ``INFO persistence`` (``aof_enabled``); RDB save points
    from ``CONFIG GET save``, which managed services and tight ACLs often
    refuse: then RDB is unknown, and so is the answer unless AOF is on.
    """
    aof_flag = facts.info.get("aof_enabled")
    aof = None if aof_flag is None else as_text(aof_flag) == "1"
    rdb = None if facts.save_points is None else bool(facts.save_points.strip())
    if aof and rdb:
        return "aof+rdb"
    if aof:
        return "aof"
    if rdb:
        return "rdb"
    if aof is False and rdb is False:
        return "none"
    return "unknown"


#: Why a server without persistence is worth a warning (shown in the report).
NO_PERSISTENCE_COST = (
    "no persistence (appendonly no, no RDB save points): a restart comes back empty. "
    "Pods restore each group's policy on its first request, but Redis forgets every lease "
    "held at the crash, so each group on this shard then refuses new work for a recovery "
    "window of one max_lease_ttl while the holders re-assert their leases; enable "
    "appendonly yes (or replicas with failover) to avoid it"
)


#: Errors (by redis-py class name) that mean the server answered, and refused.
_ANSWERED = ("ResponseError", "AuthenticationError", "AuthorizationError", "NoPermissionError")


def _connection_problem(error: str) -> str:
    """``unreachable: ...`` unless the server answered; then what it answered.

    A server that answers "DB index is out of range" or refuses a password is
    reachable: saying otherwise sends the operator to the network instead of
    the URL.
    """
    if "DB index is out of range" in error:
        return f"the database number in the URL does not exist on this server: {error}"
    if error.split(":", 1)[0] in _ANSWERED:
        return f"refused the connection: {error}"
    return f"unreachable: {error}"


def _evaluate_shard(facts: ShardFacts, schema: int, slow_after: float) -> ShardReport:
    problems: list[str] = []
    warnings: list[str] = []
    name = facts.name
    if facts.error is not None:
        return ShardReport(
            name,
            False,
            None,
            "-",
            "-",
            None,
            "-",
            len(facts.groups),
            (),
            (
                f"{name}{' (holds the routing catalog)' if facts.holds_catalog else ''}: "
                f"{_connection_problem(facts.error)}",
            ),
            (),
        )
    latency_ms = None if facts.latency is None else facts.latency * 1000
    if facts.latency is not None and facts.latency > slow_after:
        warnings.append(f"{name}: round trip {latency_ms:.0f}ms is slow")

    version = as_text(facts.info.get("redis_version", "unknown"))
    policy = as_text(facts.info.get("maxmemory_policy", "unknown"))
    if policy.startswith("allkeys-"):
        warnings.append(
            f"{name}: maxmemory-policy {policy} may evict any limiter key, published policies "
            "included; use noeviction"
        )
    elif policy.startswith("volatile-"):
        warnings.append(
            f"{name}: maxmemory-policy {policy} may evict live lease state (it carries an "
            "expiry); use noeviction"
        )

    persistence = persistence_of(facts)
    if persistence == "none":
        warnings.append(f"{name}: {NO_PERSISTENCE_COST}")

    loaded = sum(1 for ok in facts.scripts.values() if ok)
    scripts = f"{loaded}/{len(facts.scripts)}"
    if facts.reloaded:
        scripts += f" ({len(facts.reloaded)} reloaded)"
    if facts.script_error is not None:
        problems.append(f"{name}: scripts cannot be checked or loaded: {facts.script_error}")
    elif loaded < len(facts.scripts):
        missing = sorted(k for k, ok in facts.scripts.items() if not ok)
        problems.append(f"{name}: scripts not loaded: {', '.join(missing)}")

    time_ok: bool | None = None
    if facts.time_error is not None:
        time_ok = False
        problems.append(f"{name}: TIME is not allowed in scripts: {facts.time_error}")
    elif facts.time_reply is not None:
        reply = facts.time_reply
        time_ok = isinstance(reply, (list, tuple)) and len(reply) == 2
        if not time_ok:
            problems.append(f"{name}: TIME in a script answered {reply!r}")

    missing_groups: list[str] = []
    for group in facts.groups:
        if group.error is not None:
            problems.append(f"{name}: group {group.group!r}: policy unreadable: {group.error}")
            missing_groups.append(group.group)
        elif group.schema is None:
            missing_groups.append(group.group)
        elif int(as_text(group.schema)) > schema:
            problems.append(
                f"{name}: group {group.group!r} was written by key schema {as_text(group.schema)}, "
                f"this ratequota supports {schema}: upgrade this pod"
            )
            missing_groups.append(group.group)
    unpublished = [g.group for g in facts.groups if g.error is None and g.schema is None]
    if unpublished:
        shown = ", ".join(repr(g) for g in unpublished[:5])
        more = f" and {len(unpublished) - 5} more" if len(unpublished) > 5 else ""
        problems.append(f"{name}: no policy published for {shown}{more}")
    return ShardReport(
        name,
        True,
        latency_ms,
        version,
        scripts,
        time_ok,
        policy,
        len(facts.groups),
        tuple(missing_groups),
        tuple(problems),
        tuple(warnings),
        persistence,
    )


def evaluate(
    shards: Sequence[ShardFacts],
    *,
    catalog_present: bool,
    catalog_error: str | None = None,
    schema: int = SCHEMA_VERSION,
    slow_after: float = 0.25,
    allow_degraded: bool = False,
) -> ReadinessReport:
    """The report for gathered facts: pure, so every verdict is testable without Redis.

    ``allow_degraded`` keeps the pod ready while some shards have problems,
    as long as the catalog's shard and at least one other are usable: with
    every pod sharing the same shards, failing all of them on one shard's
    outage would turn a partial outage into a total one.
    """
    reports = tuple(_evaluate_shard(f, schema, slow_after) for f in shards)
    problems = [p for r in reports for p in r.problems]
    warnings = [w for r in reports for w in r.warnings]
    general: list[str] = []
    # The catalog's shard failing to connect is one problem, reported once (on the shard).
    catalog_down = any(f.holds_catalog and f.error is not None for f in shards)
    if catalog_error is not None and not catalog_down:
        general.append(f"routing catalog unreadable: {catalog_error}")
    elif catalog_error is None and not catalog_present:
        general.append(
            "no policy is published (routing catalog missing): publish one with "
            "`ratequota policy apply FILE`"
        )
    if not shards:
        general.append("no shard configured")
    if allow_degraded:
        catalog_ok = all(r.ready for f, r in zip(shards, reports, strict=True) if f.holds_catalog)
        ready = not general and catalog_ok and any(r.ready for r in reports)
    else:
        ready = not general and not problems
    return ReadinessReport(reports, tuple(general + problems), tuple(warnings), ready)


def conclude(
    facts: Sequence[ShardFacts],
    catalog: Any,
    catalog_error: str | None,
    *,
    socket_timeout: float,
    allow_degraded: bool,
) -> ReadinessReport:
    """The report of a client's ``check()``: a shard is slow past a quarter of its timeout."""
    return evaluate(
        facts,
        catalog_present=catalog is not None,
        catalog_error=catalog_error,
        slow_after=socket_timeout / 4,
        allow_degraded=allow_degraded,
    )
