"""The backend options every command shares, and the client they describe.

The command line builds its clients here and nowhere else, so every command
reaches Redis the same way. The simulation calls ``client_from_args`` too
(one client per simulated pod).
"""

from __future__ import annotations

import argparse
from typing import Any

from ratequota.client import QuotaClient

__all__ = ["add_backend_options", "client_from_args"]


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
