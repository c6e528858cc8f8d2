"""``ratequota top``: a live view of groups — who holds what, against what they are due.

Every refresh reads the published policy and one snapshot per group (a
read-only script call each) and shows, per tenant: units held, guarantee,
limit (the most it may hold now if it asks, ``ratequota.clients.explain.entitlement``),
units borrowed above the guarantee, units waiting, and refusals per second.

Refusals come from the usage ledger (docs/usage.md), where the refusing
script counts them per tenant, hour and reason, whichever pod refused: each
refresh reads the last two hours of each group, and the rate is the growth
of those counters since the previous refresh over the Redis time between the
two snapshots (an hour boundary between refreshes loses nothing: each hour
is compared with itself). The first frame has no earlier one: it shows
``-``, and JSON gives ``null`` and, always, the counts of the current hour
so far by reason (``refused_this_hour``), so ``--once --json`` reports
cumulative counts and ``--count N`` rates between frames.

No curses: on a terminal each refresh clears the screen with two ANSI codes
and redraws (the tables drawn by ``rich`` when the ``cli`` extra is
installed), so it works over SSH and in any emulator; keys are read in
cbreak mode (``q`` quits, space or ``r`` refreshes now). Piped, it prints
one plain-text frame after another. ``--once`` prints one frame; with
``--json`` each frame is one JSON document on its own line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import select
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import attrs

from ratequota.cli.backend import client_from_args
from ratequota.cli.operator import limits_of
from ratequota.cli.output import (
    CommandError,
    add_groups_option,
    add_json_option,
    number,
    plural,
    rich_table,
    terminal_console,
)
from ratequota.clients.sync import QuotaClient
from ratequota.decision import GroupSnapshot, UsageRow
from ratequota.engine.ledger import HOUR_MS

__all__ = [
    "GroupView",
    "add_arguments",
    "frame_to_dict",
    "gather",
    "render",
    "render_rich",
    "run",
]

#: Clear the screen and move the cursor home.
CLEAR = "\x1b[H\x1b[2J"


@attrs.frozen
class GroupView:
    """One group at one refresh: its snapshot, each tenant's limit, and its refusals.

    ``refused`` holds each tenant's refusal counts per ledger hour (the last two
    hours), ``this_hour`` the current hour's by reason; ``rates`` the refusals
    per second since ``previous`` (None for the first frame).
    """

    snapshot: GroupSnapshot
    limits: dict[str, float]
    refused: dict[str, dict[int, int]] = attrs.field(factory=dict)
    this_hour: dict[str, dict[str, int]] = attrs.field(factory=dict)
    rates: dict[str, float | None] = attrs.field(factory=dict)
    group_rate: float | None = None


def _refusals(
    rows: Sequence[UsageRow], hour: int
) -> tuple[dict[str, dict[int, int]], dict[str, dict[str, int]]]:
    by_hour: dict[str, dict[int, int]] = {}
    current: dict[str, dict[str, int]] = {}
    for row in rows:
        by_hour.setdefault(row.tenant, {})[row.hour] = row.refused
        if row.hour == hour and row.refusals:
            current[row.tenant] = dict(sorted(row.refusals.items()))
    return by_hour, current


def _growth(now: dict[int, int], before: dict[int, int]) -> int:
    """Refusals counted since ``before``: each hour compared with itself."""
    return sum(max(0, n - before.get(hour, 0)) for hour, n in now.items())


def _rates(
    view: GroupView, previous: GroupView | None
) -> tuple[dict[str, float | None], float | None]:
    elapsed = 0.0 if previous is None else view.snapshot.now - previous.snapshot.now
    names = set(view.snapshot.tenants) | set(view.refused)
    if previous is None or elapsed <= 0:
        return dict.fromkeys(names), None
    grown = {t: _growth(view.refused.get(t, {}), previous.refused.get(t, {})) for t in names}
    return {t: n / elapsed for t, n in grown.items()}, sum(grown.values()) / elapsed


def gather(
    client: QuotaClient,
    groups: Sequence[str] | None,
    previous: Sequence[GroupView] = (),
) -> list[GroupView]:
    """One view per group (default: every published group), in the policy's order; refusal
    rates against ``previous`` (the last frame's views), when given."""
    policy = client.load_policy()
    if policy is None:
        raise CommandError(
            f"no policy is published under prefix {client.core.keyspace.prefix!r}; publish one "
            "with `ratequota policy apply FILE`"
        )
    names = list(groups) if groups else [g.name for g in policy.groups]
    before = {v.snapshot.group: v for v in previous}
    views = []
    for name in names:
        group = policy.group(name)
        if group is None:
            raise CommandError(f"group {name!r} is not in the published policy")
        snap = client.snapshot(name, [t.name for t in group.tenants])
        rows = client.usage(name, since=dt.timedelta(hours=1))
        refused, this_hour = _refusals(rows, int(snap.now * 1000) // HOUR_MS)
        view = GroupView(snap, limits_of(snap, group), refused, this_hour)
        rates, total = _rates(view, before.get(name))
        views.append(attrs.evolve(view, rates=rates, group_rate=total))
    return views


def _rows(view: GroupView) -> list[str]:
    snap = view.snapshot
    order = sorted(snap.tenants.values(), key=lambda t: (-t.used, -t.pending, t.name))
    return [t.name for t in order]


#: The columns of a group's table.
COLUMNS = ("tenant", "held", "guarantee", "limit", "borrowed", "waiting", "refused/s")


def _rate(value: float | None) -> str:
    """A rate for the table: ``-`` before there is one."""
    return "-" if value is None else number(value)


def _title(view: GroupView) -> str:
    snap = view.snapshot
    share = snap.used / snap.capacity if snap.capacity else 0.0
    waiting = sum(t.pending for t in snap.tenants.values())
    return (
        f"group {snap.group!r}: {snap.used}/{snap.capacity} units held ({share:.0%}), "
        f"{plural(waiting, 'unit')} waiting, {_rate(view.group_rate)} refused/s, "
        f"{plural(len(snap.tenants), 'tenant')}, policy v{snap.policy_version}"
    )


def _cells(view: GroupView) -> list[tuple[str, ...]]:
    """One row per tenant, busiest first: the ``COLUMNS`` as text (names cut to 24)."""
    snap = view.snapshot
    return [
        (
            name[:24],
            str(t.used),
            str(t.guarantee),
            number(view.limits[name]),
            str(t.borrowed),
            str(t.pending),
            _rate(view.rates.get(name)),
        )
        for name in _rows(view)
        for t in (snap.tenants[name],)
    ]


def _footer(views: Sequence[GroupView]) -> str:
    stamp = max((v.snapshot.now for v in views), default=time.time())
    return (
        f"at {time.strftime('%H:%M:%S', time.gmtime(stamp))} UTC (Redis time); limit: the most "
        "a tenant may hold now if it asks; refused/s: since the last refresh"
    )


def render(views: Sequence[GroupView], width: int = 100) -> str:
    """One frame as plain text, every line cut to ``width`` columns."""
    lines: list[str] = []
    header = (
        f"{'tenant':24} {'held':>6} {'guarantee':>9} {'limit':>8} {'borrowed':>8} {'waiting':>7}"
        f" {'refused/s':>9}"
    )
    for view in views:
        lines += [_title(view), header, "-" * len(header)]
        for name, held, guarantee, limit, borrowed, waiting, refused in _cells(view):
            lines.append(
                f"{name:24} {held:>6} {guarantee:>9} {limit:>8} {borrowed:>8} {waiting:>7}"
                f" {refused:>9}"
            )
        lines.append("")
    lines.append(_footer(views))
    return "\n".join(line[:width] for line in lines)


def render_rich(views: Sequence[GroupView]) -> list[Any]:
    """One frame as ``rich`` renderables (a terminal with the ``cli`` extra): the same
    titles, rows and footer as ``render``, each group's rows in a table."""
    from rich.text import Text

    parts: list[Any] = []
    for view in views:
        table = rich_table(COLUMNS, _cells(view), numeric=COLUMNS[1:])
        parts += [Text(_title(view)), table, Text("")]
    parts.append(Text(_footer(views)))
    return parts


def frame_to_dict(views: Sequence[GroupView]) -> dict[str, Any]:
    """One frame as JSON-ready data."""
    return {
        "groups": [
            {
                "group": v.snapshot.group,
                "now": v.snapshot.now,
                "capacity": v.snapshot.capacity,
                "held": v.snapshot.used,
                "policy_version": v.snapshot.policy_version,
                "refusals_per_s": v.group_rate,
                "tenants": {
                    name: {
                        "held": t.used,
                        "guarantee": t.guarantee,
                        "limit": v.limits[name],
                        "borrowed": t.borrowed,
                        "waiting": t.pending,
                        "refusals_per_s": v.rates.get(name),
                        "refused_this_hour": v.this_hour.get(name, {}),
                    }
                    for name, t in v.snapshot.tenants.items()
                },
            }
            for v in views
        ]
    }


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[int | None]:
    """The terminal in cbreak mode (keys arrive unbuffered); None when not a terminal."""
    if not stream.isatty():
        yield None
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(fd: int | None, seconds: float) -> bool:
    """Wait up to ``seconds`` for a key; False when the key was ``q`` (quit)."""
    if fd is None:
        threading.Event().wait(seconds)
        return True
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return True
        key = os.read(fd, 1)
        if key in (b"q", b"Q", b""):
            return False
        if key in (b" ", b"r", b"R"):
            return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota top`` (the backend options are added by the CLI)."""
    add_groups_option(parser, "a group to watch")
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period (default 2)"
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument(
        "--count", type=int, metavar="N", help="stop after N frames (default: until q or Ctrl-C)"
    )
    add_json_option(parser, "text (one document per line per frame)")


def run(args: argparse.Namespace) -> int:
    """Refresh until ``q``, Ctrl-C, or ``--count`` frames (one with ``--once``)."""
    if args.interval <= 0:
        raise CommandError(f"--interval must be > 0 seconds, got {args.interval:g}")
    frames = 1 if args.once else args.count
    if frames is not None and frames < 1:
        raise CommandError(f"--count must be at least 1, got {frames}")
    out = sys.stdout
    live = out.isatty() and not args.json and not args.once
    console = terminal_console(out) if live else None
    with client_from_args(args) as client, _keys(sys.stdin) as fd:
        shown = 0
        views: list[GroupView] = []
        while True:
            views = gather(client, args.groups, views)
            if args.json:
                out.write(json_line(views) + "\n")
            elif console is not None:  # a terminal, and the cli extra: rich tables
                out.write(CLEAR)
                out.flush()
                for part in render_rich(views):
                    console.print(part)
                out.write("q quits, space refreshes now\n")
            else:
                width = shutil.get_terminal_size((100, 40)).columns if live else 10_000
                out.write((CLEAR if live else "") + render(views, width) + "\n")
                if live:
                    out.write("q quits, space refreshes now\n")
                elif frames != 1:
                    out.write("\n")
            out.flush()
            shown += 1
            if frames is not None and shown >= frames:
                return 0
            if not _wait(fd, args.interval):
                return 0


def json_line(views: Sequence[GroupView]) -> str:
    """A frame as one line of JSON."""
    import json

    return json.dumps(frame_to_dict(views), ensure_ascii=False, allow_nan=False)
