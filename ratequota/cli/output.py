"""What every command prints the same way: plurals, JSON documents, tables, usage errors.

Kept apart from the commands so that wording rules (``1 tenant``, ``2
tenants``), the JSON conventions (one document on stdout, UTF-8, no
``NaN``) and how tables look are decided once. Tables are drawn by ``rich``
(the ``cli`` extra) on a terminal; piped, or without ``rich``, every command
prints the same plain text as ever, which scripts and the tests read.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any, TextIO

from ratequota.errors import RateQuotaError

__all__ = [
    "CommandError",
    "add_groups_option",
    "add_json_option",
    "finite",
    "number",
    "plural",
    "print_json",
    "rich_table",
    "terminal_console",
]


class CommandError(RateQuotaError):
    """A command cannot run as asked (a missing option, an unsafe request); exit code 2."""


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 tenant``, ``2 tenants``, ``0 leases``: the count and the noun agreeing with it."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def number(value: float) -> str:
    """A limit for people: at most two decimals, no trailing zeros (``8``, ``8.04``)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def finite(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None (JSON has no NaN or infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return value


def add_json_option(parser: argparse.ArgumentParser, what: str = "a table") -> None:
    """``--json``: one JSON document on stdout instead of text, for scripts."""
    parser.add_argument(
        "--json", action="store_true", help=f"print one JSON document instead of {what}"
    )


def add_groups_option(parser: argparse.ArgumentParser, which: str) -> None:
    """``--group NAME`` (repeatable) into ``args.groups``; none means every published group."""
    parser.add_argument(
        "--group",
        action="append",
        dest="groups",
        metavar="NAME",
        help=f"{which} (repeatable; default: every published group)",
    )


def print_json(data: Any) -> None:
    """One JSON document on stdout; refuses NaN and infinity (they are not JSON)."""
    print(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))


def terminal_console(stream: TextIO) -> Any | None:
    """A ``rich`` console writing to ``stream`` when it is a terminal and ``rich`` is installed.

    None means plain text: ``stream`` is piped or a file (scripts, probes, CI
    logs), or the ``cli`` extra is not installed.
    """
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, highlight=False)


def rich_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Collection[str] = ()
) -> Any:
    """A borderless ``rich`` table, the ``numeric`` columns right-aligned, fitted to the terminal.

    Unstyled cells and headers: each line is as wide on screen as it is long,
    starts with its first cell, and splits on whitespace as the plain text does.
    """
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="")
    for header in headers:
        table.add_column(header, justify="right" if header in numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table
