"""Reply decoding for every script: pure, no Redis import.

Decoders turn a script's raw reply (bytes from redis-py, or str from a
decoding connection), laid out as its header's ``reply:`` block says, into
the named types of ``ratequota.decision``, raising the matching
``ratequota`` error for the error replies the scripts share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    MeterSettlement,
    Reason,
    ReleaseResult,
    RenewResult,
    TenantSnapshot,
)
from ratequota.engine.keys import SCHEMA_VERSION
from ratequota.engine.meterwire import decode_meter_rows, decode_settle_rows
from ratequota.engine.ops import ScriptCall
from ratequota.errors import InvalidRequest, LegacyLayout, PolicyMissing, SchemaMismatch

__all__ = [
    "decode_acquire",
    "decode_apply_policy",
    "decode_release",
    "decode_renew",
    "decode_settle",
    "decode_snapshot",
    "granted_lease",
]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float:
    return float(_text(value))


def _raise_error_reply(group: str, reason: str, detail: Any) -> None:
    if reason == "no_policy":
        raise PolicyMissing(group)
    if reason == "schema":
        raise SchemaMismatch(group, int(detail), SCHEMA_VERSION)
    if reason == "bad_ttl":
        raise InvalidRequest(
            "ttl", f"is above the max_lease_ttl of group {group!r} ({int(detail) / 1000:g}s)"
        )
    if reason == "bad_meter":
        raise InvalidRequest(_text(detail), f"group {group!r} has no rate meter of that name")
    raise AssertionError(f"unexpected script error reply {reason!r}")  # pragma: no cover


def decode_apply_policy(group: str, reply: Sequence[Any]) -> int:
    """The group's policy version after publishing."""
    status, value = int(reply[0]), int(reply[1])
    if status == -2:
        raise LegacyLayout(group, value, SCHEMA_VERSION)
    if status < 0:
        raise SchemaMismatch(group, value, SCHEMA_VERSION)
    return value


def decode_acquire(
    reply: Sequence[Any],
    *,
    group: str,
    tenant: str,
    units: int,
    lease_id: str,
    meters: Mapping[str, int] | None = None,
) -> Decision:
    """A ``Decision`` from acquire.lua's reply (see its header).

    The hot path of every decision: each field is read once, in place, the
    reason looked up as it came (bytes, or text from a decoding connection), and
    numbers converted straight from the reply (``int`` and ``float`` read bytes).
    """
    status, raw = int(reply[0]), reply[1]
    known = _REASONS.get(raw) if type(raw) is bytes or type(raw) is str else None
    if status < 0 or known is None:
        reason = raw.decode("utf-8") if type(raw) is bytes else _text(raw)
        if status < 0:
            _raise_error_reply(group, reason, reply[9] if reason == "schema" else reply[10])
        known = _REASONS.get(reason)
        if known is None:  # pragma: no cover - a script/client version skew
            raise AssertionError(f"unknown refusal reason {reason!r}")
    admitted = status == 1
    rates = decode_meter_rows(reply[11], meters or {}) if len(reply) > 11 else ()
    limit = float(reply[5])
    lease = None
    if admitted:
        replay = int(reply[10]) == 1
        lease = LeaseInfo(
            lease_id,
            tenant,
            group,
            units,
            int(reply[3]),
            int(reply[2]) / 1000.0,
            replay,
            False,
            rates,
        )
        if replay:
            limit = math.nan
    return Decision(
        admitted,
        known,
        tenant,
        group,
        units,
        int(reply[4]),  # used
        limit,
        int(reply[6]),  # group_used
        int(reply[7]),  # capacity
        # A request that can never fit has nothing to wait for: no retry hint (-1: a meter's
        # amount can never pass).
        0.0 if known == "too_large" else max(0, int(reply[8])) / 1000.0,  # retry_after
        int(reply[9]),  # policy_version
        lease,
        # Shadow mode: admitted, and the reason names the refusal enforcement would have made.
        admitted and known in _SHADOW_REFUSALS,  # shadow_refused
        rates,
    )


#: The reasons a shadow-mode admission carries: the refusal enforcement would have made.
_SHADOW_REFUSALS = frozenset(("tenant_limit", "group_full", "meter"))

#: The reasons a script answers: every ``Reason`` but the client's own (Redis unreachable).
_REASON_NAMES: tuple[Reason, ...] = tuple(r for r in get_args(Reason) if r != "backend_unavailable")
#: Each reason by its text and by its bytes (as a connection that does not decode reads it).
_REASONS: dict[str | bytes, Reason] = {
    **{name: name for name in _REASON_NAMES},
    **{name.encode(): name for name in _REASON_NAMES},
}


def granted_lease(call: ScriptCall, reply: Any) -> LeaseInfo | None:
    """The lease an acquire call's raw reply granted (a replay included), or None: not an
    acquire, not admitted, or an error. For a caller that is gone when its reply comes, so
    the lease can be given back at once rather than hold its units until its expiry."""
    if call.script.name != "acquire" or not isinstance(reply, Sequence) or len(reply) < 11:
        return None
    try:
        if int(reply[0]) != 1:
            return None
        names = call.script.argv
        tenant, units, lease_id = (
            call.args[names.index(n)] for n in ("tenant", "units", "lease_id")
        )
        return LeaseInfo(
            str(lease_id),
            str(tenant),
            call.route,
            int(units),
            int(reply[3]),
            int(reply[2]) / 1000.0,
        )
    except (TypeError, ValueError):
        return None


def refused_waiting(call: ScriptCall, reply: Any) -> tuple[str, str] | None:
    """``(lease_id, tenant)`` of an acquire call that asked to wait and was refused (its
    units may now be registered as waiting demand), else None. For a caller that is gone
    when its reply comes, so the registration can be withdrawn at once."""
    if call.script.name != "acquire" or not isinstance(reply, Sequence) or len(reply) < 11:
        return None
    names = call.script.argv
    try:
        if int(reply[0]) != 0 or str(call.args[names.index("wait")]) != "1":
            return None
        return str(call.args[names.index("lease_id")]), str(call.args[names.index("tenant")])
    except (TypeError, ValueError):
        return None


def decode_release(reply: Sequence[Any]) -> ReleaseResult:
    """A ``ReleaseResult`` from release.lua's reply."""
    raw = reply[0]
    state = _RELEASE_STATES.get(raw) if type(raw) is bytes or type(raw) is str else None
    if state is None:  # pragma: no cover - a script/client version skew
        raise AssertionError(f"unexpected release state {_text(raw)!r}")
    return ReleaseResult(state, int(reply[1]))


#: Each release state by its text and by its bytes.
_RELEASE_STATES: dict[str | bytes, Literal["released", "expired", "unknown", "fenced"]] = {
    **{state: state for state in ("released", "expired", "unknown", "fenced")},
    **{state.encode(): state for state in ("released", "expired", "unknown", "fenced")},
}


_RENEW_REASONS = ("renewed", "reasserted", "lost", "fenced")


def decode_renew(reply: Sequence[Any], *, group: str) -> RenewResult:
    """A ``RenewResult`` from renew.lua's reply."""
    status, reason = int(reply[0]), _text(reply[1])
    if status < 0:
        _raise_error_reply(group, reason, reply[7])
    if reason not in _RENEW_REASONS:  # pragma: no cover - a script/client version skew
        raise AssertionError(f"unexpected renew reason {reason!r}")
    return RenewResult(
        renewed=status == 1,
        reason=reason,  # type: ignore[arg-type]
        ttl=int(reply[8]) / 1000.0,
        expires_at=int(reply[2]) / 1000.0,
        over_limit=int(reply[3]) == 1,
        used=int(reply[4]),
        limit=_num(reply[5]),
        group_used=int(reply[6]),
        capacity=int(reply[7]),
    )


def decode_snapshot(reply: Sequence[Any], *, group: str) -> GroupSnapshot:
    """A ``GroupSnapshot`` from snapshot.lua's reply."""
    status, reason = int(reply[0]), _text(reply[1])
    if status < 0:
        _raise_error_reply(group, reason, reply[3])
    rows = list(reply[7])
    tenants: dict[str, TenantSnapshot] = {}
    for i in range(0, len(rows), 7):
        name = _text(rows[i])
        used, guarantee = int(rows[i + 1]), int(rows[i + 6])
        tenants[name] = TenantSnapshot(
            name=name,
            used=used,
            pending=int(rows[i + 2]),
            limit=_num(rows[i + 3]),
            lo=_num(rows[i + 4]),
            up=_num(rows[i + 5]),
            guarantee=guarantee,
            borrowed=max(0, used - guarantee),
        )
    flat = list(reply[8])
    leases = tuple(
        LeaseInfo(
            id=_text(flat[i]),
            tenant=_text(flat[i + 1]),
            group=group,
            units=int(flat[i + 2]),
            token=int(flat[i + 3]),
            expires_at=int(flat[i + 4]) / 1000.0,
        )
        for i in range(0, len(flat), 5)
    )
    return GroupSnapshot(
        group=group,
        now=int(reply[2]) / 1000.0,
        capacity=int(reply[3]),
        used=int(reply[4]),
        policy_version=int(reply[5]),
        level=_num(reply[6]),
        tenants=tenants,
        leases=leases,
        leases_truncated=int(reply[9]) == 1,
        recovering_until=int(reply[10]) / 1000.0,
    )


def decode_settle(reply: Sequence[Any], *, group: str) -> tuple[MeterSettlement, ...]:
    """One ``MeterSettlement`` per meter settled, from settle.lua's reply."""
    status, reason = int(reply[0]), _text(reply[1])
    if status < 0:
        _raise_error_reply(group, reason, reply[2])
    return decode_settle_rows(reply[2])
