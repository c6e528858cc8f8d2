"""Argument encoding and reply decoding for every script: pure, no Redis import.

A ``ScriptCall`` is everything a client needs to run one script on the right
shard: the script, the group it routes by, its KEYS and ARGV. Decoders turn
the raw reply (bytes from redis-py, or str from a decoding connection) into
the types of ``ratequota.decision``, raising the matching ``ratequota`` error
for the error replies every script shares.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    Reason,
    ReleaseResult,
    RenewResult,
    TenantSnapshot,
)
from ratequota.engine.coalesce import merged_args
from ratequota.engine.keys import SCHEMA_VERSION, KeySpace
from ratequota.engine.ops import Arg, ScriptCall
from ratequota.engine.ops import script_call as _call
from ratequota.errors import InvalidRequest, LegacyLayout, PolicyMissing, SchemaMismatch
from ratequota.policy import GroupPolicy, TenantPolicy

__all__ = [
    "acquire_call",
    "acquire_many_call",
    "apply_policy_call",
    "decode_acquire",
    "decode_apply_policy",
    "decode_release",
    "decode_renew",
    "decode_snapshot",
    "release_call",
    "release_many_call",
    "renew_call",
    "snapshot_call",
    "tenant_spec",
]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float:
    return float(_text(value))


def _clock(now_ms: int | None) -> Arg:
    return "" if now_ms is None else now_ms


def tenant_spec(tenant: TenantPolicy) -> str:
    """The ``G|lendable|B|weight|max_units`` text the scripts parse.

    ``repr`` of a float is the shortest text that reads back to the same
    double, so Lua's ``tonumber`` sees exactly the value Python validated.
    """
    borrow = "" if tenant.borrow_limit is None else str(tenant.borrow_limit)
    largest = "" if tenant.max_units is None else str(tenant.max_units)
    return (
        f"{tenant.guarantee}|{float(tenant.lendable)!r}|{borrow}|{float(tenant.weight)!r}|{largest}"
    )


def _raise_error_reply(group: str, reason: str, detail: Any) -> None:
    if reason == "no_policy":
        raise PolicyMissing(group)
    if reason == "schema":
        raise SchemaMismatch(group, int(detail), SCHEMA_VERSION)
    if reason == "bad_ttl":
        raise InvalidRequest(
            "ttl", f"is above the max_lease_ttl of group {group!r} ({int(detail) / 1000:g}s)"
        )
    raise AssertionError(f"unexpected script error reply {reason!r}")  # pragma: no cover


# -- apply_policy ------------------------------------------------------------


def apply_policy_call(
    keyspace: KeySpace,
    group: GroupPolicy,
    *,
    recover_ms: int = 0,
    now_ms: int | None = None,
    migrate: bool = False,
) -> ScriptCall:
    """Publish one group's policy; the digest skips a rewrite when nothing changed.

    ``recover_ms`` > 0 restores a policy Redis lost: leases granted before the
    loss may still live that long, so the group enters its recovery window.
    ``migrate`` takes the group over from pods of the previous release (key
    schema 1) still serving it; without it such a group is refused (``LegacyLayout``).
    """
    pairs: list[Arg] = []
    for tenant in group.tenants:
        pairs += [tenant.name, tenant_spec(tenant)]
    content = json.dumps(group.to_dict(), sort_keys=True).encode("utf-8")
    digest = hashlib.sha256(content).hexdigest()[:32]
    args: list[Arg] = [
        keyspace.schema,
        group.capacity,
        repr(group.reserve),
        group.unknown_tenants,
        tenant_spec(group.default_tenant),
        int(group.max_lease_ttl * 1000),
        digest,
        _clock(now_ms),
        recover_ms,
        "1" if migrate else "0",
        *pairs,
    ]
    keys = [*keyspace.group(group.name).all, *keyspace.previous_layout(group.name)]
    return _call("apply_policy", group.name, keys, args)


def decode_apply_policy(group: str, reply: Sequence[Any]) -> int:
    """The group's policy version after publishing."""
    status, value = int(reply[0]), int(reply[1])
    if status == -2:
        raise LegacyLayout(group, value, SCHEMA_VERSION)
    if status < 0:
        raise SchemaMismatch(group, value, SCHEMA_VERSION)
    return value


# -- acquire -----------------------------------------------------------------


def acquire_call(
    keyspace: KeySpace,
    group: str,
    tenant: str,
    units: int,
    lease_id: str,
    ttl_ms: int,
    *,
    wait: bool,
    pending_ms: int,
    purge: int,
    now_ms: int | None = None,
    shadow: bool = False,
) -> ScriptCall:
    """Arguments of acquire.lua, in its header's order (``shadow``: see its header)."""
    args: list[Arg] = [
        _clock(now_ms),
        keyspace.schema,
        tenant,
        units,
        lease_id,
        ttl_ms,
        "1" if wait else "0",
        pending_ms,
        purge,
        "1" if shadow else "0",
    ]
    return _call("acquire", group, keyspace.group(group).all, args)


def decode_acquire(
    reply: Sequence[Any], *, group: str, tenant: str, units: int, lease_id: str
) -> Decision:
    """A ``Decision`` from acquire.lua's reply (see its header)."""
    status, reason = int(reply[0]), _text(reply[1])
    if status < 0:
        _raise_error_reply(group, reason, reply[9] if reason == "schema" else reply[10])
    admitted = status == 1
    # Shadow mode: admitted, and the reason names the refusal enforcement would have made.
    shadow_refused = admitted and reason in ("tenant_limit", "group_full")
    capacity = int(reply[7])
    lease = None
    if admitted:
        lease = LeaseInfo(
            id=lease_id,
            tenant=tenant,
            group=group,
            units=units,
            token=int(reply[3]),
            expires_at=int(reply[2]) / 1000.0,
            replay=int(reply[10]) == 1,
        )
    limit = _num(reply[5])
    return Decision(
        admitted=admitted,
        reason=_reason(reason),
        tenant=tenant,
        group=group,
        units=units,
        used=int(reply[4]),
        limit=limit if not (lease and lease.replay) else math.nan,
        group_used=int(reply[6]),
        capacity=capacity,
        # A request that can never fit has nothing to wait for: no retry hint.
        retry_after=0.0 if reason == "too_large" else int(reply[8]) / 1000.0,
        policy_version=int(reply[9]),
        lease=lease,
        shadow_refused=shadow_refused,
    )


_REASONS: dict[str, Reason] = {
    "admitted": "admitted",
    "too_large": "too_large",
    "tenant_limit": "tenant_limit",
    "group_full": "group_full",
    "unknown_tenant": "unknown_tenant",
    "id_mismatch": "id_mismatch",
    "recovering": "recovering",
}


def _reason(text: str) -> Reason:
    try:
        return _REASONS[text]
    except KeyError:  # pragma: no cover - a script/client version skew
        raise AssertionError(f"unknown refusal reason {text!r}") from None


# -- release / renew ---------------------------------------------------------


def release_call(
    keyspace: KeySpace,
    group: str,
    lease_id: str,
    *,
    tenant: str,
    token: int,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of release.lua: the lease is named by id, tenant and fencing token.

    ``token`` 0 withdraws a waiting request (which has no token yet).
    """
    args: list[Arg] = [_clock(now_ms), keyspace.schema, lease_id, purge, tenant, str(token)]
    return _call("release", group, keyspace.group(group).all, args)


def decode_release(reply: Sequence[Any]) -> ReleaseResult:
    """A ``ReleaseResult`` from release.lua's reply."""
    state = _text(reply[0])
    if state not in ("released", "expired", "unknown", "fenced"):  # pragma: no cover
        raise AssertionError(f"unexpected release state {state!r}")
    return ReleaseResult(state=state, units=int(reply[1]))  # type: ignore[arg-type]


def renew_call(
    keyspace: KeySpace,
    lease: LeaseInfo,
    ttl_ms: int,
    *,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of renew.lua: the whole lease, so a recovering group can re-assert it."""
    args: list[Arg] = [
        _clock(now_ms),
        keyspace.schema,
        lease.id,
        ttl_ms,
        purge,
        lease.tenant,
        lease.units,
        str(lease.token),
        round(lease.expires_at * 1000),
    ]
    return _call("renew", lease.group, keyspace.group(lease.group).all, args)


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


# -- snapshot ----------------------------------------------------------------


def snapshot_call(
    keyspace: KeySpace,
    group: str,
    *,
    tenants: Sequence[str] = (),
    max_leases: int = 1000,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of snapshot.lua; ``tenants`` are reported even when idle."""
    args: list[Arg] = [_clock(now_ms), keyspace.schema, max_leases, *tenants]
    return _call("snapshot", group, keyspace.group(group).all, args)


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


# -- several calls of one group in one script call ----------------------------------


def acquire_many_call(
    keyspace: KeySpace,
    group: str,
    requests: Sequence[tuple[str, int, str, int, bool] | tuple[str, int, str, int, bool, bool]],
    *,
    pending_ms: int,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of acquire_many.lua: ``(tenant, units, lease_id, ttl_ms, wait[, shadow])``
    per request (``shadow`` defaults to False).

    Built from one ``acquire_call`` per request, merged as the async client's
    coalescing merges concurrent acquires (``ratequota.engine.coalesce``).
    """
    calls = [
        acquire_call(
            keyspace,
            group,
            *request[:4],
            wait=bool(request[4]),
            pending_ms=pending_ms,
            purge=purge,
            now_ms=now_ms,
            shadow=len(request) > 5 and bool(request[5]),
        )
        for request in requests
    ]
    return _call("acquire_many", group, keyspace.group(group).all, merged_args(calls))


def release_many_call(
    keyspace: KeySpace,
    group: str,
    leases: Sequence[tuple[str, str, int]],
    *,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of release_many.lua: ``(lease_id, tenant, token)`` per release."""
    calls = [
        release_call(
            keyspace, group, lease_id, tenant=tenant, token=token, purge=purge, now_ms=now_ms
        )
        for lease_id, tenant, token in leases
    ]
    return _call("release_many", group, keyspace.group(group).all, merged_args(calls))
