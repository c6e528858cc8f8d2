"""The usage ledger's hours, keys and fields: pure, no Redis import (docs/usage.md).

The scripts that end or refuse leases write one hash per group and hour,
``{g}:led:<hour>``, with fields ``<tenant>|<counter>`` (``lua/_ledger.lua``).
A script may only touch the keys it is given, and the client cannot know
Redis' clock, so every such call names *two* hours: the one of the caller's
clock and the neighbouring hour nearest to it. The script files under the
hour of its own time; a caller less than half an hour off names it at every
hour boundary.

Reading is the reverse: the hours between ``since`` and ``until`` are read
whole and their fields decoded into one ``UsageRow`` per tenant and hour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ratequota.decision import UsageRow
from ratequota.engine.keys import KeySpace

__all__ = [
    "HOUR_MS",
    "hours_between",
    "ledger_hours",
    "ledger_keys",
    "parse_hour",
    "usage_rows",
]

#: One ledger hash per hour of epoch ms.
HOUR_MS = 3_600_000


def ledger_hours(at_ms: int) -> tuple[int, int]:
    """The hour of ``at_ms`` and the neighbouring hour nearest to it."""
    hour, into = divmod(at_ms, HOUR_MS)
    return hour, (hour - 1 if into < HOUR_MS // 2 else hour + 1)


def ledger_keys(keyspace: KeySpace, group: str, at_ms: int) -> list[str]:
    """The two ledger keys a lease-ending script is given, for a caller whose clock reads
    ``at_ms``."""
    return [keyspace.ledger(group, hour) for hour in ledger_hours(at_ms)]


def hours_between(since_ms: int, until_ms: int) -> list[int]:
    """The hours that hold some of ``[since_ms, until_ms)``, oldest first."""
    if until_ms <= since_ms:
        return []
    return list(range(since_ms // HOUR_MS, (until_ms - 1) // HOUR_MS + 1))


def parse_hour(key: str) -> int:
    """The hour a ledger key names."""
    return int(key.rsplit(":", 1)[1])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rows_of_hour(group: str, hour: int, fields: Mapping[Any, Any]) -> list[UsageRow]:
    counters: dict[str, dict[str, int]] = {}
    for raw_field, raw_value in fields.items():
        tenant, bar, counter = _text(raw_field).rpartition("|")
        if not bar:  # "~": the placeholder that keeps the hour's key in existence
            continue
        counters.setdefault(tenant, {})[counter] = int(_text(raw_value))
    rows = []
    for tenant in sorted(counters):
        c = counters[tenant]
        rows.append(
            UsageRow(
                group=group,
                tenant=tenant,
                hour=hour,
                unit_seconds=c.get("us", 0) / 1000.0,
                leases=c.get("rq", 0),
                tokens_reserved=c.get("tr", 0),
                tokens_settled=c.get("ts", 0),
                refusals={k[3:]: v for k, v in c.items() if k.startswith("rf:") and v},
                shadow_refusals={k[3:]: v for k, v in c.items() if k.startswith("sh:") and v},
            )
        )
    return rows


def usage_rows(
    group: str, hours: Sequence[int], hashes: Iterable[Mapping[Any, Any]]
) -> list[UsageRow]:
    """Rows, by hour then tenant, from the ledger hashes of ``hours`` (as HGETALL answers)."""
    rows: list[UsageRow] = []
    for hour, fields in zip(hours, hashes, strict=True):
        rows.extend(_rows_of_hour(group, hour, fields or {}))
    return rows
