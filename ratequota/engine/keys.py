"""Redis key names: one hash tag per group, a prefix, and the schema version.

Redis Cluster hashes only what stands between the first ``{`` and the next
``}`` of a key, so a group name holding braces would break out of its tag. The
name is therefore percent-escaped (``%`` first, then ``{`` and ``}``): the
escape is injective, so two distinct names never share keys, and the escaped
tag never contains a brace. Tenant names never appear in key names (they are
hash fields), so they need no escaping at all.

Layout for prefix ``rq`` and group ``g``::

    rq:v2:{g}:policy   hash  published policy (header, tenant specs) and fencing counter
                             (no expiry)
    rq:v2:{g}:demand   hash  "u:<tenant>" units held, "p:<tenant>" units waiting,
                             "g" the group's incremental fair state
    rq:v2:{g}:exp      zset  "L<lease id>"/"P<request id>" -> expiry (ms, Redis time)
    rq:v2:{g}:info     hash  "L<id>" -> "units:token:tenant", "P<id>" -> "units:seq:tenant"
    rq:v2:{g}:queue    zset  waiting requests per tenant in arrival order (lex-ordered members)
    rq:v2:{g}:fair     zset  breakpoints lo/w and up/w of the active tenants
                             (exp and fair also hold a sentinel and a member kept long on
                             purpose, so Redis encodes them as skiplists)
    rq:v2:{g}:led:<h>  hash  the usage ledger of hour h (ms // 3,600,000): "<tenant>|<counter>"
                             (expires its group's retention after the hour ends)
    rq:v2:{g}:contend1..4  zset  rate meters: borrowers contending for the spare, by tag
    rq:v2:{catalog}:catalog  string  the whole policy as JSON, for routing tenants

``lua/_codec.lua`` says how each value is written.

Every key but the policy is given an expiry on every write, longer than the
longest lease the policy allows: a group that goes idle leaves nothing behind.
"""

from __future__ import annotations

import functools

import attrs

from ratequota.errors import ConfigError, InvalidRequest, InvalidType

__all__ = ["PREVIOUS_SCHEMA", "SCHEMA_VERSION", "GroupKeys", "KeySpace", "escape_tag"]

#: Version of the key layout and script protocol. It is part of every key, and
#: written into each group's policy so older clients can refuse newer state.
#: 2: the incremental fair state ("g" in demand, the fair zset, the packed policy header).
SCHEMA_VERSION = 2

#: The key schema of the previous release, whose pods a rolling update meets.
PREVIOUS_SCHEMA = 1

#: The tag of the catalog key. Group tags escape '#', so none can equal it.
_CATALOG_TAG = "#catalog"


def escape_tag(name: str) -> str:
    """The hash-tag text for ``name``: injective, brace-free."""
    if not isinstance(name, str):
        raise InvalidType("group", f"must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidRequest("group", "must not be empty")
    escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    # '#' is escaped too so that no group tag can equal the catalog's tag.
    return escaped.replace("#", "%23")


@attrs.frozen
class GroupKeys:
    """The six keys of one group, in the order every script receives them."""

    policy: str
    demand: str
    exp: str
    info: str
    queue: str
    fair: str

    @property
    def all(self) -> list[str]:
        """KEYS[1..6] of every group script."""
        return [self.policy, self.demand, self.exp, self.info, self.queue, self.fair]

    @property
    def contention(self) -> list[str]:
        """One zset per rate-meter slot (``MAX_METERS``): the borrowers contending for the spare.

        Passed to every script that decides or settles meters (KEYS[9..12], after the
        ledger's two hours), used or not: Redis Cluster wants every key named up front, and
        they share the group's hash tag.
        """
        base = self.policy[: -len("policy")]
        return [f"{base}contend{i}" for i in range(1, 5)]

    @property
    def metered(self) -> list[str]:
        """KEYS[1..10] of the scripts that decide or settle rate meters."""
        return [*self.all, *self.contention]

    @property
    def expiring(self) -> list[str]:
        """The keys that carry an expiry (everything but the policy)."""
        return [self.demand, self.exp, self.info, self.queue, self.fair]


def _check_prefix(_instance: object, _attr: object, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError("prefix", "must be a non-empty string")
    if "{" in value or "}" in value:
        raise ConfigError("prefix", "must not contain '{' or '}' (it would change the hash slot)")


@functools.lru_cache(maxsize=16384)
def _group_keys(prefix: str, schema: int, group: str) -> GroupKeys:
    """Key names are built on every call of the hot path: remember the recent groups'."""
    base = f"{prefix}:v{schema}:{{{escape_tag(group)}}}:"
    return GroupKeys(
        base + "policy", base + "demand", base + "exp", base + "info", base + "queue", base + "fair"
    )


# The hash is remembered: every call of the hot path looks its keys up by (keyspace, group).
@attrs.frozen(cache_hash=True)
class KeySpace:
    """Builds key names for a prefix; one per client."""

    prefix: str = attrs.field(default="rq", validator=_check_prefix)
    schema: int = SCHEMA_VERSION

    def group(self, group: str) -> GroupKeys:
        """Keys of ``group``; all share its hash tag, so one script call is one slot."""
        if not isinstance(group, str):
            escape_tag(group)  # raises the ratequota error naming the field
        return _group_keys(self.prefix, self.schema, group)

    def previous_layout(self, group: str) -> list[str]:
        """The group's policy, demand, exp, info and queue keys in the layout of key schema 1.

        Same prefix and hash tag (so the same slot as the group's keys): ``apply_policy``
        tombstones that policy, and on request migrates the live leases out of it.
        """
        base = f"{self.prefix}:v{PREVIOUS_SCHEMA}:{{{escape_tag(group)}}}:"
        return [base + name for name in ("policy", "demand", "exp", "info", "queue")]

    def ledger(self, group: str, hour: int) -> str:
        """The group's usage ledger hash of ``hour`` (ms since the epoch // 3,600,000).

        Same hash tag as the group's other keys: the scripts that end leases write it.
        """
        return f"{self.group(group).policy[: -len('policy')]}led:{hour}"

    @property
    def catalog(self) -> str:
        """The key holding the whole published policy (tenant -> group routing)."""
        return f"{self.prefix}:v{self.schema}:{{{_CATALOG_TAG}}}:catalog"

    @property
    def catalog_route(self) -> str:
        """The name the catalog is routed by among shards (never a group's escaped name)."""
        return _CATALOG_TAG
