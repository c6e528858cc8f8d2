"""``ratequota usage``: what each tenant of a group used, hour by hour, from the usage ledger.

Reads ``quota.usage(group, since=..., until=...)`` and prints a table (one
line per tenant and hour, then a total per tenant), one JSON document
(``--json``) or CSV (``--csv``, one row per tenant and hour; a column per
refusal reason seen). ``--since`` and ``--until`` take a duration before now
(``90s``, ``30m``, ``24h``, ``7d``, ``1h30m``) or an ISO 8601 time (naive:
UTC). Like every command that reads a deployment, it needs ``--redis``,
``--shards``, ``--cluster`` or ``RATEQUOTA_URL``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from ratequota.cli.backend import client_from_args
from ratequota.cli.output import CommandError, add_json_option, plural, print_json
from ratequota.decision import UsageRow

__all__ = ["add_arguments", "parse_when", "render", "run", "to_csv"]

_DURATION = re.compile(
    r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
    r"(?:(\d+(?:\.\d+)?)s)?$"
)


def parse_when(option: str, text: str) -> dt.timedelta | dt.datetime:
    """A duration before now (``24h``, ``1h30m``) or an ISO 8601 time; CommandError if neither."""
    match = _DURATION.match(text.strip())
    if match and any(match.groups()):
        days, hours, minutes, seconds = (float(g or 0) for g in match.groups())
        return dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(
            f"{option} {text!r}: give a duration before now (90s, 30m, 24h, 7d, 1h30m) or an "
            "ISO 8601 time (2026-12-06T07:00, UTC unless it names its offset)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _hour_text(row: UsageRow) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.start))


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def render(group: str, rows: Sequence[UsageRow]) -> str:
    """The table: one line per tenant and hour, then each tenant's total."""
    if not rows:
        return f"group {group!r}: nothing recorded in this window"
    tokens = any(r.tokens_reserved or r.tokens_settled for r in rows)
    head = f"{'hour (UTC)':16} {'tenant':20} {'unit·s':>12} {'leases':>7} {'refused':>7}"
    if tokens:
        head += f" {'tok. res.':>10} {'tok. set.':>10}"
    lines = [f"group {group!r}: {plural(len({r.tenant for r in rows}), 'tenant')}", head]
    lines.append("-" * len(head))
    totals: dict[str, list[float]] = {}
    for r in rows:
        line = (
            f"{_hour_text(r):16} {r.tenant[:20]:20} {r.unit_seconds:12.1f} {r.leases:7d} "
            f"{r.refused:7d}"
        )
        if tokens:
            line += f" {r.tokens_reserved:10d} {r.tokens_settled:10d}"
        why = [_reasons(dict(r.refusals))] if r.refusals else []
        if r.shadow_refusals:
            why.append(f"shadow: {_reasons(dict(r.shadow_refusals))}")
        lines.append(line + ("  " + "; ".join(why) if why else ""))
        total = totals.setdefault(r.tenant, [0.0, 0, 0])
        total[0] += r.unit_seconds
        total[1] += r.leases
        total[2] += r.refused
    lines.append("")
    lines.append("total")
    for tenant, (held, leases, refused) in sorted(totals.items()):
        lines.append(
            f"  {tenant[:20]:20} {held:12.1f} unit·s, {plural(int(leases), 'lease')}, "
            f"{plural(int(refused), 'refusal')}"
        )
    return "\n".join(lines)


def to_csv(rows: Sequence[UsageRow]) -> str:
    """CSV: one row per tenant and hour; ``refused_<reason>`` and ``shadow_<reason>`` columns
    for every reason that occurs."""
    reasons = sorted({k for r in rows for k in r.refusals})
    shadows = sorted({k for r in rows for k in r.shadow_refusals})
    columns = ["hour_start", "group", "tenant", "unit_seconds", "leases", "tokens_reserved"]
    columns += ["tokens_settled", "refused"]
    columns += [f"refused_{k}" for k in reasons] + [f"shadow_{k}" for k in shadows]
    out = _Lines()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        start = dt.datetime.fromtimestamp(r.start, tz=dt.timezone.utc).isoformat()
        writer.writerow(
            [start, r.group, r.tenant, r.unit_seconds, r.leases, r.tokens_reserved]
            + [r.tokens_settled, r.refused]
            + [r.refusals.get(k, 0) for k in reasons]
            + [r.shadow_refusals.get(k, 0) for k in shadows]
        )
    return "".join(out.parts)


class _Lines:
    """A write-only text sink for ``csv.writer``."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota usage`` (the backend options are added by the CLI)."""
    parser.add_argument("--group", required=True, metavar="NAME", help="the group to report")
    parser.add_argument(
        "--since", default="24h", metavar="WHEN", help="start: 24h, 7d, 1h30m or ISO time (24h)"
    )
    parser.add_argument("--until", metavar="WHEN", help="end: a duration before now or ISO time")
    parser.add_argument("--tenant", action="append", metavar="NAME", help="only these tenants")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    """Print the group's usage in the window; exit 0 (an empty window is not an error)."""
    if args.json and args.csv:
        raise CommandError("--json and --csv: choose one")
    since = parse_when("--since", args.since)
    until = None if args.until is None else parse_when("--until", args.until)
    with client_from_args(args) as client:
        rows = client.usage(args.group, since=since, until=until)
    if args.tenant:
        rows = [r for r in rows if r.tenant in set(args.tenant)]
    if args.json:
        data: dict[str, Any] = {"group": args.group, "rows": [r.to_dict() for r in rows]}
        print_json(data)
    elif args.csv:
        sys.stdout.write(to_csv(rows))
    else:
        print(render(args.group, rows))
    return 0
