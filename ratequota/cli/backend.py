"""The backend options every command shares, and the client they describe.

Safe by default: a command that reads or writes a deployment's keys needs to
be told where they are — ``--redis``, ``--shards``, ``--cluster`` or the
``RATEQUOTA_URL`` environment variable. Without one it stops with an error
instead of quietly using the embedded in-process store, where ``policy
apply`` would "publish" to a store that vanishes when the command exits.
Only commands that live within one process (``simulate``, ``demo``) default
to the embedded store, and they ignore ``RATEQUOTA_URL``: simulated traffic
never lands on a real Redis unless a flag names it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ratequota.cli.output import CommandError
from ratequota.clients.sync import QuotaClient

__all__ = ["URL_VARIABLE", "add_backend_options", "client_from_args", "has_backend"]

#: The environment variable naming the Redis of a deployment: one URL, or shard URLs
#: separated by commas.
URL_VARIABLE = "RATEQUOTA_URL"


def add_backend_options(parser: argparse.ArgumentParser, *, embedded_default: bool = False) -> None:
    """--redis / --shards / --cluster and --prefix, the same for every command.

    ``embedded_default`` marks a command that may run on the embedded store
    when no backend option is given (and that ignores ``RATEQUOTA_URL``).
    """
    where = parser.add_mutually_exclusive_group()
    fallback = (
        "default: the embedded in-process store"
        if embedded_default
        else f"default: ${URL_VARIABLE}"
    )
    where.add_argument(
        "--redis", metavar="URL", help=f"one Redis server, redis://host:port/db ({fallback})"
    )
    where.add_argument("--shards", metavar="URL", nargs="+", help="independent Redis shards")
    where.add_argument("--cluster", metavar="URL", help="any node of a Redis Cluster")
    parser.add_argument("--prefix", default="rq", help="key prefix (default: %(default)s)")
    parser.set_defaults(embedded_default=embedded_default)


def _from_environment() -> list[str]:
    raw = os.environ.get(URL_VARIABLE, "")
    return [url.strip() for url in raw.split(",") if url.strip()]


def has_backend(args: argparse.Namespace) -> bool:
    """Whether the options (or ``RATEQUOTA_URL``) name a Redis to talk to."""
    named = getattr(args, "redis", None) or getattr(args, "shards", None)
    if named or getattr(args, "cluster", None):
        return True
    return not getattr(args, "embedded_default", False) and bool(_from_environment())


def client_from_args(args: argparse.Namespace) -> QuotaClient:
    """The client the backend options describe.

    Raises ``CommandError`` (before connecting anywhere) when no backend is
    named and the command has no embedded default.
    """
    options: dict[str, Any] = {"prefix": args.prefix}
    if getattr(args, "socket_timeout", None) is not None:
        options["socket_timeout"] = args.socket_timeout
    if getattr(args, "shards", None):
        return QuotaClient.sharded(args.shards, **options)
    if getattr(args, "cluster", None):
        return QuotaClient.cluster(args.cluster, **options)
    if getattr(args, "redis", None):
        return QuotaClient(args.redis, **options)
    if getattr(args, "embedded_default", False):
        return QuotaClient(**options)
    urls = _from_environment()
    if len(urls) > 1:
        return QuotaClient.sharded(urls, **options)
    if urls:
        return QuotaClient(urls[0], **options)
    raise CommandError(
        f"no Redis named: pass --redis URL, --shards URL..., or --cluster URL, or set "
        f"{URL_VARIABLE} (this command will not use a throw-away in-process store)"
    )
