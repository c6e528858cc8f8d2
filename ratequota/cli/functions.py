"""``ratequota functions``: the function libraries of ratequota releases on each server.

Each release loads its own library (``ratequota_<hash>``, docs/design.md,
"Scripts as functions") and a library stays until deleted. This command
lists them per server, marking this release's, and deletes the other
releases' only when told twice (``--delete-others --yes``): a library a pod
still runs is loaded again by that pod's next call, so deleting one early
costs a reload, never a decision; this release's own is never deleted.

Libraries of anything but ratequota are neither listed nor touched.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import attrs
import redis

from ratequota.cli.backend import client_from_args
from ratequota.cli.output import add_json_option, plural, print_json
from ratequota.engine.scripts import function_library

__all__ = ["LibraryRow", "add_arguments", "render", "rows_of", "run"]

#: Every ratequota library's name begins with this (``engine.scripts``).
PREFIX = "ratequota_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota functions`` (the backend options are added by the CLI)."""
    parser.add_argument(
        "--delete-others",
        action="store_true",
        help="delete the libraries of other ratequota releases (with --yes only)",
    )
    parser.add_argument(
        "--yes", action="store_true", help="really delete (without it: show what would go)"
    )
    add_json_option(parser)


@attrs.frozen
class LibraryRow:
    """One library on one server, or one server that could not be asked (``error``)."""

    server: str
    library: str = ""
    functions: int = 0
    current: bool = False
    deleted: bool = False
    error: str = ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _libraries(conn: Any) -> list[tuple[str, int]]:
    """(name, how many functions) of each ratequota library on one server."""
    found = []
    for entry in conn.execute_command("FUNCTION", "LIST", "LIBRARYNAME", PREFIX + "*"):
        if not isinstance(entry, dict):  # RESP2: a flat list of names and values
            entry = dict(zip(entry[::2], entry[1::2], strict=True))
        fields = {_text(k): v for k, v in entry.items()}
        name = _text(fields["library_name"])
        if name.startswith(PREFIX):  # the pattern is Redis's; the prefix is ours
            found.append((name, len(fields.get("functions") or ())))
    return sorted(found)


def rows_of(nodes: Sequence[tuple[str, Any]], *, delete: bool) -> list[LibraryRow]:
    """The libraries of every server; with ``delete`` the other releases' are deleted."""
    current = function_library().name
    rows: list[LibraryRow] = []
    for server, conn in nodes:
        try:
            found = _libraries(conn)
        except redis.exceptions.RedisError as exc:
            rows.append(LibraryRow(server, error=f"{type(exc).__name__}: {exc}"))
            continue
        for name, count in found:
            gone = False
            if delete and name != current:
                try:
                    conn.execute_command("FUNCTION", "DELETE", name)
                    gone = True
                except redis.exceptions.RedisError as exc:
                    rows.append(LibraryRow(server, name, count, error=f"{exc}"))
                    continue
            rows.append(LibraryRow(server, name, count, name == current, gone))
    return rows


def render(rows: Sequence[LibraryRow], *, asked_delete: bool, confirmed: bool) -> str:
    """The rows as plain text, then what was (or would be) deleted."""
    table = [("server", "library", "functions", "release")]
    for row in rows:
        if row.library:
            status = "this one" if row.current else "deleted" if row.deleted else "other"
            if row.error:
                status = f"not deleted: {row.error}"
            table.append((row.server, row.library, str(row.functions), status))
        else:
            table.append((row.server, "-", "-", f"unreachable: {row.error}"))
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(widths[i]) for i, cell in enumerate(line[:3])), line[3]])
        for line in table
    ]
    others = [row for row in rows if row.library and not row.current and not row.error]
    if confirmed and asked_delete:
        lines.append(f"deleted {plural(len(others), 'library', 'libraries')} of other releases")
    elif others:
        advice = "add --yes to delete" if asked_delete else "--delete-others --yes deletes"
        lines.append(
            f"{plural(len(others), 'library', 'libraries')} of other releases ({advice}; a pod "
            "still running one loads it again with its next call)"
        )
    if not any(row.library for row in rows):
        lines.append("no ratequota library is loaded (clients load theirs with their first call)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """List (and with ``--delete-others --yes`` delete); exit 1 when a server could not be
    asked or a library could not be deleted."""
    client = client_from_args(args)
    try:
        nodes = client.backend.nodes()  # type: ignore[attr-defined]
        rows = rows_of(nodes, delete=args.delete_others and args.yes)
    finally:
        client.close()
    if args.json:
        print_json(
            {
                "release": function_library().name,
                "libraries": [attrs.asdict(row) for row in rows],
            }
        )
    else:
        print(render(rows, asked_delete=args.delete_others, confirmed=args.yes))
    return 1 if any(row.error for row in rows) else 0
