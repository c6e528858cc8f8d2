"""Find the line of a TOML file that a validation error's field points at (pure, best effort).

``tomllib`` reports a line only for syntax errors; a file that parses but
holds a bad value (a negative weight, an unknown key) is rejected later by
the policy's validators, which name the *field*: ``groups[0].tenants[1].weight``
or ``tenant 'web': weight``. This module scans the file's table headers and
keys to map such a field back to a line number so operators see
``policy.toml:14``. It understands the subset of TOML policy files use
(``[table]``, ``[[array.of.tables]]``, ``key = value``, quoted names) and
returns None rather than guess when it cannot tell.

``load_toml`` is the one place that reads a TOML file, parses it and builds
an object from it, so policy and scenario files report errors alike.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ratequota.errors import ConfigError, PolicyFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["key_lines", "load_toml", "locate_field", "syntax_line"]

T = TypeVar("T")


def load_toml(source: str | Path, build: Callable[[dict[str, Any]], T]) -> T:
    """Read ``source``, parse it and ``build`` an object from its data.

    Every failure is a ``PolicyFileError`` naming the file, the line where it
    can be found, and the field: unreadable file, bytes that are not UTF-8,
    TOML syntax, invalid value.
    """
    path = Path(source)
    try:
        data_bytes = path.read_bytes()
    except OSError as exc:
        raise PolicyFileError(str(path), f"cannot read: {exc.strerror}") from exc
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        # TOML files are UTF-8 by definition; say where the first bad byte is.
        bad_line = data_bytes.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data_bytes.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyFileError(
            f"{path}:{bad_line}",
            f"not UTF-8: byte 0x{data_bytes[exc.start]:02x} at column {column} "
            "(TOML files must be UTF-8; re-save the file as UTF-8)",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = syntax_line(exc)
        raise PolicyFileError(
            f"{path}:{line}" if line else str(path), f"not valid TOML: {exc}"
        ) from exc
    try:
        return build(data)
    except ConfigError as exc:
        line = locate_field(text, exc.field)
        raise PolicyFileError(f"{path}:{line}" if line else str(path), str(exc)) from exc


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=\s*(.*)$""")
_NAME_VALUE = re.compile(r"""^("([^"\\]|\\.)*"|'[^']*')""")


def _unquote(token: str) -> str:
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    return token


def key_lines(text: str) -> tuple[dict[str, int], dict[str, str]]:
    """Canonical path of every table and key -> line, and ``"tenant 'x'"``/``"group 'x'"`` -> path.

    Paths look like ``groups[0].tenants[1].traffic.units``: arrays of tables
    get their index, as the validators spell them.
    """
    lines: dict[str, int] = {}
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = _HEADER.match(line)
        if header:
            parts = [_unquote(p) for p in header.group(2).split(".")]
            # Resolve each part against the arrays seen so far: "groups.tenants"
            # inside the third group is groups[2].tenants.
            path = ""
            for part in parts[:-1]:
                path = f"{path}.{part}" if path else part
                if path in counts:
                    path = f"{path}[{counts[path] - 1}]"
            path = f"{path}.{parts[-1]}" if path else parts[-1]
            if header.group(1) == "[[":
                counts[path] = counts.get(path, 0) + 1
                path = f"{path}[{counts[path] - 1}]"
            table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            name = _unquote(key.group(1))
            path = f"{table}.{name}" if table else name
            lines.setdefault(path, number)
            value = _NAME_VALUE.match(key.group(2).strip())
            if name == "name" and value:
                kind = "tenant" if table.rsplit(".", 1)[-1].startswith("tenants[") else "group"
                names[f"{kind} {_unquote(value.group(1))!r}"] = table
    return lines, names


def locate_field(text: str, field: str) -> int | None:
    """The line ``field`` (as a ``ConfigError`` names it) is written on, or None."""
    lines, names = key_lines(text)
    path = field.strip()
    if ": " in path:
        owner, _, rest = path.partition(": ")
        prefix = names.get(owner)
        if prefix is None:
            return None
        path = f"{prefix}.{rest}" if rest else prefix
    while path:
        if path in lines:
            return lines[path]
        if "." not in path:
            break
        path = path.rsplit(".", 1)[0]
    return None


def syntax_line(error: Exception) -> int | None:
    """The line of a ``tomllib.TOMLDecodeError`` (its ``lineno``, or parsed from its message)."""
    line = getattr(error, "lineno", None)
    if isinstance(line, int):
        return line
    found = re.search(r"at line (\d+)", str(error))
    return int(found.group(1)) if found else None
