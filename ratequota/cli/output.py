"""What every command prints the same way: plurals, JSON documents, and usage errors.

Kept apart from the commands so that wording rules (``1 tenant``, ``2
tenants``) and the JSON conventions (one document on stdout, UTF-8, no
``NaN``) are decided once.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ratequota.errors import RateQuotaError

__all__ = ["CommandError", "add_json_option", "finite", "number", "plural", "print_json"]


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


def print_json(data: Any) -> None:
    """One JSON document on stdout; refuses NaN and infinity (they are not JSON)."""
    print(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))
