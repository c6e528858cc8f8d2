"""``ratequota check``: the readiness probe of a pod, as a command.

The checking itself is the library's (``QuotaClient.check``, built on
``ratequota.readiness``); this module only parses the options and prints.
"""

from __future__ import annotations

import argparse

from ratequota.cli.backend import client_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota check`` (the backend options are added by the CLI)."""
    parser.add_argument(
        "--group",
        action="append",
        dest="groups",
        metavar="NAME",
        help="a group this pod serves (repeatable; default: every published group)",
    )
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


def run(args: argparse.Namespace) -> int:
    """Print the report as a table; exit 0 when ready, 1 when the pod must not take traffic."""
    client = client_from_args(args)
    try:
        report = client.check(args.groups, allow_degraded=args.allow_degraded)
    finally:
        client.close()
    print(report.table())
    return 0 if report.ready else 1
