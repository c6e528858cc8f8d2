"""The usage flow: what each tenant of a group used, hour by hour, read from the ledger.

The ledger is written by the lease scripts (``lua/_ledger.lua``): one hash
per group and hour. Reading it needs no script: each hour between ``since``
and ``until`` is one ``HGETALL`` of one key (the group's hash tag routes it,
on a shard or in a cluster, and puts every hour in one slot), pipelined
``HOURS_PER_TRIP`` hours to a round trip, sent by both clients through the
same flow.
Times are resolved on the client: ``until`` defaults to now (the pinned
Redis time of a test clock, else this machine's wall clock) and ``since``
to a day before it.
"""

from __future__ import annotations

import datetime as dt
import math
import time

from ratequota.clients.core import QuotaCore
from ratequota.clients.requests import validate_tenant
from ratequota.decision import UsageRow
from ratequota.engine.ledger import hours_between, usage_rows
from ratequota.engine.ops import Command, Commands, Flow
from ratequota.errors import InvalidRequest, InvalidType

__all__ = ["DEFAULT_SPAN", "HOURS_PER_TRIP", "When", "resolve_span", "usage_flow"]

#: A moment: epoch seconds, a datetime (naive ones are UTC), or a timedelta before now.
When = float | int | dt.datetime | dt.timedelta

#: How far back ``usage`` reads when ``since`` is not given.
DEFAULT_SPAN = dt.timedelta(hours=24)

#: Most hours one call reads (366 days, the longest retention).
MAX_HOURS = 366 * 24

#: Hours read in one round trip: a week's ledger in one, a year's in 53, each reply bounded.
HOURS_PER_TRIP = 168


def _epoch_ms(name: str, value: When, now_ms: int) -> int:
    if isinstance(value, dt.timedelta):
        return now_ms - round(value.total_seconds() * 1000)
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return round(moment.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(
            name, f"must be epoch seconds, a datetime or a timedelta, got {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise InvalidRequest(name, f"must be a finite number of epoch seconds, got {value!r}")
    return round(value * 1000)


def resolve_span(since: When | None, until: When | None, now_ms: int) -> tuple[int, int]:
    """``[since, until)`` in epoch ms; raises ``InvalidRequest`` naming the field at fault."""
    end = now_ms if until is None else _epoch_ms("until", until, now_ms)
    start = end - round(DEFAULT_SPAN.total_seconds() * 1000)
    if since is not None:
        start = _epoch_ms("since", since, now_ms)
    if start >= end:
        raise InvalidRequest("since", "must be before until")
    if len(hours_between(start, end)) > MAX_HOURS:
        raise InvalidRequest("since", f"spans more than {MAX_HOURS} hours (the longest retention)")
    return start, end


def usage_flow(
    core: QuotaCore,
    group: str,
    since: When | None = None,
    until: When | None = None,
) -> Flow[list[UsageRow]]:
    """Rows for every tenant and hour of ``group`` that hold some of ``[since, until)``, oldest
    hour first, tenants by name; hours with nothing recorded give no rows."""
    group = validate_tenant(group, "group")
    pinned = core.clock.redis_ms()
    now_ms = round(time.time() * 1000) if pinned is None else pinned
    start, end = resolve_span(since, until, now_ms)
    hours = hours_between(start, end)
    hashes: list[object] = []
    for first in range(0, len(hours), HOURS_PER_TRIP):
        reads = tuple(
            Command(group, ("HGETALL", core.keyspace.ledger(group, hour)))
            for hour in hours[first : first + HOURS_PER_TRIP]
        )
        hashes += yield Commands(group, reads)
    return usage_rows(group, hours, [_as_mapping(h) for h in hashes])


def _as_mapping(reply: object) -> dict[object, object]:
    """HGETALL's reply as a dict (redis-py parses it into one; a raw reply is a flat list)."""
    if isinstance(reply, dict):
        return reply
    if isinstance(reply, (list, tuple)):
        return dict(zip(reply[::2], reply[1::2], strict=True))
    return {}
