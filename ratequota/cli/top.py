"""``ratequota top``: a live view of groups — who holds what, against what they are due.

Every refresh reads the published policy and one snapshot per group (a
read-only script call each) and shows, per tenant: units held, guarantee,
limit (the most it may hold now if it asks, ``ratequota.clients.explain.entitlement``),
units borrowed above the guarantee, and units waiting. Refusals per second
are not shown: the engine keeps no refusal counter in Redis, so no pod can
see another pod's refusals (waiting units are the visible sign of refusals).

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
from ratequota.decision import GroupSnapshot

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
    """One group at one refresh: its snapshot and each tenant's limit."""

    snapshot: GroupSnapshot
    limits: dict[str, float]


def gather(client: QuotaClient, groups: Sequence[str] | None) -> list[GroupView]:
    """One view per group (default: every published group), in the policy's order."""
    policy = client.load_policy()
    if policy is None:
        raise CommandError(
            f"no policy is published under prefix {client.core.keyspace.prefix!r}; publish one "
            "with `ratequota policy apply FILE`"
        )
    names = list(groups) if groups else [g.name for g in policy.groups]
    views = []
    for name in names:
        group = policy.group(name)
        if group is None:
            raise CommandError(f"group {name!r} is not in the published policy")
        snap = client.snapshot(name, [t.name for t in group.tenants])
        views.append(GroupView(snap, limits_of(snap, group)))
    return views


def _rows(view: GroupView) -> list[str]:
    snap = view.snapshot
    order = sorted(snap.tenants.values(), key=lambda t: (-t.used, -t.pending, t.name))
    return [t.name for t in order]


#: The columns of a group's table.
COLUMNS = ("tenant", "held", "guarantee", "limit", "borrowed", "waiting")


def _title(snap: GroupSnapshot) -> str:
    share = snap.used / snap.capacity if snap.capacity else 0.0
    waiting = sum(t.pending for t in snap.tenants.values())
    return (
        f"group {snap.group!r}: {snap.used}/{snap.capacity} units held ({share:.0%}), "
        f"{plural(waiting, 'unit')} waiting, {plural(len(snap.tenants), 'tenant')}, "
        f"policy v{snap.policy_version}"
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
        )
        for name in _rows(view)
        for t in (snap.tenants[name],)
    ]


def _footer(views: Sequence[GroupView]) -> str:
    stamp = max((v.snapshot.now for v in views), default=time.time())
    return (
        f"at {time.strftime('%H:%M:%S', time.gmtime(stamp))} UTC (Redis time); limit: the most "
        "a tenant may hold now if it asks"
    )


def render(views: Sequence[GroupView], width: int = 100) -> str:
    """One frame as plain text, every line cut to ``width`` columns."""
    lines: list[str] = []
    header = (
        f"{'tenant':24} {'held':>6} {'guarantee':>9} {'limit':>8} {'borrowed':>8} {'waiting':>7}"
    )
    for view in views:
        lines += [_title(view.snapshot), header, "-" * len(header)]
        for name, held, guarantee, limit, borrowed, waiting in _cells(view):
            lines.append(
                f"{name:24} {held:>6} {guarantee:>9} {limit:>8} {borrowed:>8} {waiting:>7}"
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
        parts += [Text(_title(view.snapshot)), table, Text("")]
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
                "tenants": {
                    name: {
                        "held": t.used,
                        "guarantee": t.guarantee,
                        "limit": v.limits[name],
                        "borrowed": t.borrowed,
                        "waiting": t.pending,
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
        while True:
            views = gather(client, args.groups)
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
