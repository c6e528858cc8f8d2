"""``ratequota check``: the readiness probe of a pod, as a command.

The checking itself is the library's (``QuotaClient.check``, built on
``ratequota.clients.readiness``); this module only parses the options and prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import attrs

from ratequota.cli.backend import client_from_args
from ratequota.cli.output import (
    add_groups_option,
    add_json_option,
    print_json,
    rich_table,
    terminal_console,
)
from ratequota.clients.readiness import ReadinessReport

__all__ = ["add_arguments", "run", "show"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota check`` (the backend options are added by the CLI)."""
    add_groups_option(parser, "a group this pod serves")
    parser.add_argument(
        "--socket-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="timeout of every Redis call (default: 1.0; keep it under the probe's timeout)",
    )
    parser.add_argument(
        "--allow-degraded",
        action="store_true",
        help="stay ready while some shards fail, if the catalog's shard and one other work",
    )
    add_json_option(parser)


#: The problem of a published policy without groups (every tenant would be refused).
EMPTY_POLICY = (
    "the published policy has no groups: every tenant is refused; publish one with "
    "`ratequota policy apply FILE`"
)


def judged(report: ReadinessReport, groups: list[str] | None) -> ReadinessReport:
    """The report, not ready when a policy is published but serves no group at all.

    Checking "every published group" of an empty policy checks nothing; that
    must not pass a readiness probe.
    """
    checked = sum(s.groups_checked for s in report.shards)
    catalog_missing = any("no policy is published" in p for p in report.problems)
    if groups or checked or catalog_missing or not report.shards:
        return report
    if any(not s.reachable for s in report.shards):
        return report
    return attrs.evolve(report, problems=(*report.problems, EMPTY_POLICY), ready=False)


def report_to_dict(report: ReadinessReport) -> dict[str, Any]:
    """The report as JSON-ready data (``ready``, per-shard facts, problems, warnings)."""
    return {
        "ready": report.ready,
        "shards": [{**attrs.asdict(s), "ready": s.ready} for s in report.shards],
        "problems": list(report.problems),
        "warnings": list(report.warnings),
    }


def run(args: argparse.Namespace) -> int:
    """Print the report (table or JSON); exit 0 when ready, 1 when the pod must not take traffic."""
    client = client_from_args(args)
    try:
        report = client.check(args.groups, allow_degraded=args.allow_degraded)
    finally:
        client.close()
    report = judged(report, args.groups)
    if args.json:
        print_json(report_to_dict(report))
    else:
        show(report, sys.stdout)
    return 0 if report.ready else 1


def show(report: ReadinessReport, stream: TextIO) -> None:
    """The report as a table: drawn by ``rich`` on a terminal (the ``cli`` extra), else plain."""
    console = terminal_console(stream)
    if console is None:
        stream.write(report.table() + "\n")
        return
    from rich.text import Text

    console.print(rich_table(report.COLUMNS, report.rows()))
    *notes, verdict = report.notes()
    for line in notes:
        console.print(Text(line))
    console.print(Text(verdict, style="bold green" if report.ready else "bold red"))
