"""Rate meters on the wire: what the scripts are given and what they answer (pure, no Redis).

A group's meters are published once (``apply_policy.lua``) as the exact
integers of ``ratequota.rates.meter_limits`` and ``share_limits``, so the
scripts never redo the policy's arithmetic; a request names its amounts by
meter (``tokens=500``), checked here before anything is sent, so a bad amount
is a ``ratequota`` error that never reaches Redis. The layout of every field
is in ``lua/_metered.lua``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ratequota.decision import MeterResult, MeterSettlement
from ratequota.errors import InvalidRequest, InvalidType
from ratequota.policy import MAX_METER, MAX_METERS, GroupPolicy, TenantPolicy
from ratequota.rates import TICKS_PER_TOKEN, meter_limits, share_limits

__all__ = [
    "check_amounts",
    "decode_meter_rows",
    "decode_settle_rows",
    "encode_amounts",
    "meters_field",
    "shares_field",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def meters_field(group: GroupPolicy) -> str:
    """The policy hash's ``meters`` field: every meter's limits in slot order ("" for none)."""
    parts = []
    for spec in group.meters:
        m = meter_limits(group, spec.name)
        window = 1 if spec.per == "second" else 60
        parts.append(f"{spec.name}|{m.rate}|{m.cap}|{m.reserve}|{m.floor}|{m.quantum!r}|{window}")
    return ";".join(parts)


def shares_field(group: GroupPolicy, tenant: TenantPolicy) -> str:
    """A tenant's ``ms:<tenant>`` field: its share of every meter in slot order ("" for none)."""
    parts = []
    for spec in group.meters:
        s = share_limits(group, tenant, spec.name)
        parts.append(f"{s.rate}|{s.ceil}|{s.cap}|{s.ccap}|{s.weight!r}")
    return ";".join(parts)


def check_amounts(amounts: Mapping[str, object] | None) -> dict[str, int]:
    """The meter amounts of a request, validated: names as the policy spells them, integers.

    Raises ``InvalidType`` / ``InvalidRequest`` naming the meter, before any
    Redis call. Whether the group has that meter is the script's answer
    (``InvalidRequest`` too).
    """
    if not amounts:
        return {}
    if len(amounts) > MAX_METERS:
        raise InvalidRequest("meters", f"a group has at most {MAX_METERS} meters")
    out: dict[str, int] = {}
    for name, value in amounts.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest("meters", f"{name!r} is not a meter name")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidType(name, f"must be an integer amount, got {type(value).__name__}")
        if value < 0 or value > MAX_METER:
            raise InvalidRequest(name, f"must be between 0 and 2**36, got {value}")
        out[name] = value
    return out


def encode_amounts(amounts: Mapping[str, int]) -> str:
    """``tokens=500,requests=1``: the ARGV the scripts parse (checked amounts only)."""
    return ",".join(f"{name}={amount}" for name, amount in amounts.items())


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_meter_rows(rows: Sequence[Any], amounts: Mapping[str, int]) -> tuple[MeterResult, ...]:
    """The ``meters`` part of acquire.lua's reply: nine values per meter."""
    out = []
    for i in range(0, len(rows), 9):
        name = _text(rows[i])
        retry, path = int(rows[i + 3]), _text(rows[i + 6])
        out.append(
            MeterResult(
                name=name,
                amount=amounts.get(name, 0),
                admitted=int(rows[i + 1]) == 1,
                reason=_text(rows[i + 2]),
                retry_after=None if retry < 0 else retry / 1000.0,
                remaining=int(rows[i + 4]),
                reset=int(rows[i + 5]) / 1000.0,
                limit=int(rows[i + 7]),
                window=int(rows[i + 8]),
                path=path or None,
            )
        )
    return tuple(out)


_OUTCOMES = ("settled", "replay", "conflict", "closed", "mismatch", "unreserved")


def decode_settle_rows(rows: Sequence[Any]) -> tuple[MeterSettlement, ...]:
    """The rows of settle.lua's reply: six values per meter."""
    out = []
    for i in range(0, len(rows), 6):
        outcome = _text(rows[i + 1])
        if outcome not in _OUTCOMES:  # pragma: no cover - a script/client version skew
            raise AssertionError(f"unexpected settle outcome {outcome!r}")
        out.append(
            MeterSettlement(
                name=_text(rows[i]),
                outcome=outcome,  # type: ignore[arg-type]
                delta=int(rows[i + 2]),
                clipped=int(rows[i + 4]) / TICKS_PER_TOKEN,
            )
        )
    return tuple(out)
