"""The ``ratequota`` command line: shared backend options and the sub-commands.

Each sub-command lives in the module that holds its logic and registers
itself here through ``COMMANDS``; this module only parses arguments and
builds the client every command talks through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ratequota.clients.sync import QuotaClient
from ratequota.errors import RateQuotaError

__all__ = ["add_backend_options", "client_from_args", "main"]


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """--redis / --shards / --cluster and --prefix, the same for every command."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis", metavar="URL", help="one Redis server (redis://host:port/db)")
    where.add_argument("--shards", metavar="URL", nargs="+", help="independent Redis shards")
    where.add_argument("--cluster", metavar="URL", help="any node of a Redis Cluster")
    parser.add_argument("--prefix", default="rq", help="key prefix (default: rq)")


def client_from_args(args: argparse.Namespace) -> QuotaClient:
    """The client the backend options describe (the embedded default when none is given)."""
    options: dict[str, Any] = {"prefix": args.prefix}
    if getattr(args, "socket_timeout", None) is not None:
        options["socket_timeout"] = args.socket_timeout
    if getattr(args, "shards", None):
        return QuotaClient.sharded(args.shards, **options)
    if getattr(args, "cluster", None):
        return QuotaClient.cluster(args.cluster, **options)
    return QuotaClient(getattr(args, "redis", None), **options)


Handler = Callable[[argparse.Namespace], int]


def _demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ratequota.demo import add_arguments, run

    parser = sub.add_parser("demo", help="a short demonstration on the embedded default")
    add_backend_options(parser)
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _simulate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ratequota.sim import add_arguments, run

    parser = sub.add_parser(
        "simulate", help="a fleet of pods sharing groups of tenants; prints fairness and safety"
    )
    add_backend_options(parser)
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _check_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ratequota.clients.readiness import add_arguments, run

    parser = sub.add_parser(
        "check", help="readiness of every shard; exits non-zero when the pod must not take traffic"
    )
    add_backend_options(parser)
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ratequota.operator import add_commands

    add_commands(sub, add_backend_options)


#: Every sub-command: a function adding its parser (with ``handler`` set).
COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _demo_command,
    _simulate_command,
    _operator_commands,
    _check_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="ratequota", description="Fair, lease-based tenant quota enforced in Redis."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ratequota`` and ``python -m ratequota``."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except RateQuotaError as exc:
        print(f"ratequota: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
