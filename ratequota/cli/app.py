"""The ``ratequota`` argument parser and entry point.

Each sub-command lives in a module of this package (``operator``, ``check``,
``demo``, ``top``, ``usage``, ``functions``) or, for ``simulate``, in the simulation
package; each registers its parser here through ``COMMANDS``. This module only dispatches
and turns a ``RateQuotaError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ratequota.cli import check, demo, functions, operator, top, usage
from ratequota.cli.backend import add_backend_options, client_from_args
from ratequota.errors import RateQuotaError

__all__ = ["COMMANDS", "build_parser", "main"]

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]


def _demo_command(sub: SubParsers) -> None:
    parser = sub.add_parser("demo", help="a short demonstration on the embedded default")
    add_backend_options(parser, embedded_default=True)
    # The demo publishes its own policy: on a real Redis it must never replace a deployment's.
    parser.set_defaults(prefix="rqdemo")
    demo.add_arguments(parser)
    parser.set_defaults(handler=demo.run)


def _simulate_command(sub: SubParsers) -> None:
    # Imported here: the simulation is a tool of its own, loaded only by this command.
    from ratequota import sim

    parser = sub.add_parser(
        "simulate", help="a fleet of pods sharing groups of tenants; prints fairness and safety"
    )
    add_backend_options(parser, embedded_default=True)
    sim.add_arguments(parser)
    parser.set_defaults(handler=lambda args: sim.run(args, client_from_args))


def _deployment_command(name: str, summary: str, module: Any) -> Callable[[SubParsers], None]:
    """A sub-command on a deployment's Redis; ``module`` has ``add_arguments`` and ``run``."""

    def add(sub: SubParsers) -> None:
        parser = sub.add_parser(name, help=summary)
        add_backend_options(parser)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)

    return add


def _operator_commands(sub: SubParsers) -> None:
    operator.add_commands(sub, add_backend_options)


#: Every sub-command: a function adding its parser (with ``handler`` set).
COMMANDS: list[Callable[[SubParsers], None]] = [
    _demo_command,
    _simulate_command,
    _operator_commands,
    _deployment_command(
        "top", "live view of groups: per tenant held, guarantee, limit, borrowed, waiting", top
    ),
    _deployment_command(
        "usage", "per tenant and hour: unit-seconds held, leases, refusals (the ledger)", usage
    ),
    _deployment_command(
        "check",
        "readiness of every shard; exits non-zero when the pod must not take traffic",
        check,
    ),
    _deployment_command(
        "functions",
        "the function libraries of ratequota releases on each server; other releases' "
        "deleted with --delete-others --yes",
        functions,
    ),
]


def version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    try:
        return metadata.version("ratequota")
    except metadata.PackageNotFoundError:
        from ratequota import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="ratequota", description="Fair, lease-based tenant quota enforced in Redis."
    )
    parser.add_argument("--version", action="version", version=f"ratequota {version()}")
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
