"""Argument encoding and reply decoding for every script: pure, no Redis import.

A ``ScriptCall`` is everything a client needs to run one script on the right
shard: the script, the group it routes by, its KEYS and ARGV. Decoders turn
the raw reply (bytes from redis-py, or str from a decoding connection) into
the types of ``ratequota.decision``, raising the matching ``ratequota`` error
for the error replies every script shares.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import attrs

from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    Reason,
    ReleaseResult,
    RenewResult,
    TenantSnapshot,
)
from ratequota.engine.keys import SCHEMA_VERSION, KeySpace
from ratequota.engine.ledger import ledger_keys
from ratequota.engine.ops import Arg, ScriptCall
from ratequota.engine.scripts import script
from ratequota.errors import InvalidRequest, LegacyLayout, PolicyMissing, SchemaMismatch
from ratequota.policy import GroupPolicy, TenantPolicy

__all__ = [
    "acquire_call",
    "acquire_many_call",
    "apply_policy_call",
    "coalesce",
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


def _call(name: str, route: str, keys: Sequence[str], args: Sequence[Arg]) -> ScriptCall:
    spec = script(name)
    spec.check_call(len(keys), len(args))
    return ScriptCall(spec, route, tuple(keys), tuple(args))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float:
    return float(_text(value))


def _clock(now_ms: int | None) -> Arg:
    return "" if now_ms is None else now_ms


def _lease_keys(keyspace: KeySpace, group: str, now_ms: int | None) -> list[str]:
    """The group's keys and the two ledger hours (see ``ratequota.engine.ledger``).

    The hours are named from the pinned clock, else this machine's wall clock:
    the script files under the hour of Redis time among the two, so a few
    seconds of skew at an hour boundary cost nothing.
    """
    at_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return [*keyspace.group(group).all, *ledger_keys(keyspace, group, at_ms)]


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
        round(group.usage_retention * 1000),
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
    return _call("acquire", group, _lease_keys(keyspace, group, now_ms), args)


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
    return _call("release", group, _lease_keys(keyspace, group, now_ms), args)


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
    return _call("renew", lease.group, _lease_keys(keyspace, lease.group, now_ms), args)


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


# -- coalescing: several calls of one group in one script call -------------------


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
    per request (``shadow`` defaults to False)."""
    flat: list[Arg] = []
    for request in requests:
        tenant, units, lease_id, ttl_ms, wait = request[:5]
        shadow = len(request) > 5 and bool(request[5])
        flat += [tenant, units, lease_id, ttl_ms, "1" if wait else "0", "1" if shadow else "0"]
    args: list[Arg] = [_clock(now_ms), keyspace.schema, pending_ms, purge, *flat]
    return _call("acquire_many", group, _lease_keys(keyspace, group, now_ms), args)


def release_many_call(
    keyspace: KeySpace,
    group: str,
    leases: Sequence[tuple[str, str, int]],
    *,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of release_many.lua: ``(lease_id, tenant, token)`` per release."""
    flat: list[Arg] = []
    for lease_id, tenant, token in leases:
        flat += [lease_id, tenant, str(token)]
    args: list[Arg] = [_clock(now_ms), keyspace.schema, purge, *flat]
    return _call("release_many", group, _lease_keys(keyspace, group, now_ms), args)


WireCall = tuple[str, tuple[Any, ...]]


@attrs.frozen
class _Merge:
    """How calls of one script merge into its ``_many`` sibling.

    ``shared`` arguments must be equal for calls to merge and lead the merged
    call's ARGV; ``each`` are the per-call arguments that follow, call by call.
    """

    single: str
    many: str
    shared: tuple[str, ...]
    each: tuple[str, ...]


#: Read against the scripts' headers: the names are ARGV names of the single script.
MERGES = (
    _Merge(
        "acquire",
        "acquire_many",
        ("now_ms", "schema", "pending_ms", "purge"),
        ("tenant", "units", "lease_id", "ttl_ms", "wait", "shadow"),
    ),
    _Merge(
        "release", "release_many", ("now_ms", "schema", "purge"), ("lease_id", "tenant", "token")
    ),
)


@attrs.frozen
class _Plan:
    """A merge resolved against the loaded scripts: SHAs and argument positions."""

    merge: _Merge
    single_sha: str
    keys_end: int  # wire arguments [2:keys_end] are the keys
    shared: tuple[int, ...]
    each: tuple[int, ...]


@functools.cache
def _plans() -> dict[str, _Plan]:
    plans = {}
    for merge in MERGES:
        spec = script(merge.single)
        first_arg = 2 + len(spec.keys)  # after the SHA and the key count
        plans[spec.sha] = _Plan(
            merge,
            spec.sha,
            first_arg,
            tuple(first_arg + spec.argv.index(n) for n in merge.shared),
            tuple(first_arg + spec.argv.index(n) for n in merge.each),
        )
    return plans


def coalesce(calls: Sequence[WireCall]) -> tuple[list[WireCall], list[tuple[int, int | None]]]:
    """Merge the acquires (and the releases) of one group queued together into one call each.

    Returns the wire calls to send, in order, and for every input call where
    its reply is: ``(index of the wire call, index inside that call's list of
    replies)``, the second None when the call is sent unchanged. Calls merge
    only with calls of the same script, group and shared arguments, and only
    two or more; the ``_many`` scripts decide them in order, exactly as if
    they had been sent one after another.
    """
    plans = _plans()
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for index, (method, args) in enumerate(calls):
        plan = plans.get(args[0]) if method == "evalsha" and args else None
        if plan is not None:
            # The first key names the group (all its keys derive from it).
            key = (plan.single_sha, args[2], *[args[i] for i in plan.shared])
            buckets.setdefault(key, []).append(index)
    merged = {members[0]: members for members in buckets.values() if len(members) > 1}
    if not merged:
        return list(calls), [(i, None) for i in range(len(calls))]
    absorbed = {i for members in merged.values() for i in members[1:]}
    wire: list[WireCall] = []
    where: list[tuple[int, int | None]] = [(0, None)] * len(calls)
    for index, call in enumerate(calls):
        if index in absorbed:
            continue
        if index not in merged:
            wire.append(call)
            where[index] = (len(wire) - 1, None)
            continue
        members = merged[index]
        args = call[1]
        plan = plans[args[0]]
        keys = args[2 : plan.keys_end]
        each = [calls[m][1][i] for m in members for i in plan.each]
        many = _call(plan.merge.many, "", keys, [*(args[i] for i in plan.shared), *each])
        wire.append(("evalsha", (many.script.sha, len(keys), *keys, *many.args)))
        for position, member in enumerate(members):
            where[member] = (len(wire) - 1, position)
    return wire, where
