"""Argument encoding for every script: pure, no Redis import.

A ``ScriptCall`` is everything a client needs to run one script on the right
shard: the script, the group it routes by, its KEYS and ARGV, checked
against the script's header as it is built. The replies are decoded by
``ratequota.engine.replies``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ratequota.decision import LeaseInfo
from ratequota.engine.coalesce import merged_args
from ratequota.engine.keys import KeySpace
from ratequota.engine.ledger import ledger_hours
from ratequota.engine.meterwire import encode_amounts, meters_field, shares_field
from ratequota.engine.ops import Arg, ScriptCall
from ratequota.engine.ops import script_call as _call
from ratequota.policy import GroupPolicy, TenantPolicy
from ratequota.rates import policy_horizon

__all__ = [
    "acquire_call",
    "acquire_many_call",
    "apply_policy_call",
    "release_call",
    "release_many_call",
    "renew_call",
    "settle_call",
    "snapshot_call",
    "tenant_spec",
]


def _clock(now_ms: int | None) -> Arg:
    return "" if now_ms is None else now_ms


def _lease_keys(
    keyspace: KeySpace, group: str, now_ms: int | None, metered: bool = False
) -> tuple[str, ...]:
    """The group's keys, the two ledger hours (see ``ratequota.engine.ledger``) and, for a
    call that names rate meters, their contention sets.

    The hours are named from the pinned clock, else this machine's wall clock:
    the script files under the hour of Redis time among the two, so a few
    seconds of skew at an hour boundary cost nothing. The tuple is built once
    per group, pair of hours and kind of call (every call of the hot path names them).
    """
    if not isinstance(group, str):
        keyspace.group(group)  # raises the ratequota error naming the field
    at_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return _lease_keys_of(keyspace, group, ledger_hours(at_ms), metered)


@functools.lru_cache(maxsize=16384)
def _lease_keys_of(
    keyspace: KeySpace, group: str, hours: tuple[int, int], metered: bool
) -> tuple[str, ...]:
    keys = keyspace.group(group)
    ledger = [keyspace.ledger(group, hour) for hour in hours]
    return (*keys.all, *ledger, *(keys.contention if metered else ()))


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
    metered = bool(group.meters)
    triples: list[Arg] = []
    for tenant in group.tenants:
        shares = shares_field(group, tenant) if metered else ""
        triples += [tenant.name, tenant_spec(tenant), shares]
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
        meters_field(group),
        shares_field(group, group.default_tenant) if metered else "",
        round(group.usage_retention * 1000),
        policy_horizon(group) if metered else 0,
        *triples,
    ]
    group_keys = keyspace.group(group.name)
    keys = [*group_keys.all, *keyspace.previous_layout(group.name), *group_keys.contention]
    return _call("apply_policy", group.name, keys, args)


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
    meters: Mapping[str, int] | None = None,
) -> ScriptCall:
    """Arguments of acquire.lua, in its header's order (``shadow``, ``meters``: see its header).

    ``meters`` are amounts already checked by ``meterwire.check_amounts``.
    """
    args = (
        "" if now_ms is None else now_ms,
        keyspace.schema,
        tenant,
        units,
        lease_id,
        ttl_ms,
        "1" if wait else "0",
        pending_ms,
        purge,
        "1" if shadow else "0",
        encode_amounts(meters) if meters else "",
    )
    return _call("acquire", group, _lease_keys(keyspace, group, now_ms, bool(meters)), args)


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
    args = ("" if now_ms is None else now_ms, keyspace.schema, lease_id, purge, tenant, str(token))
    return _call("release", group, _lease_keys(keyspace, group, now_ms), args)


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


def settle_call(
    keyspace: KeySpace,
    lease: LeaseInfo,
    actuals: Mapping[str, int],
    *,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of settle.lua: the lease (id, tenant, token) and the checked actual amounts."""
    args: list[Arg] = [
        _clock(now_ms),
        keyspace.schema,
        lease.tenant,
        lease.id,
        str(lease.token),
        encode_amounts(actuals),
    ]
    return _call("settle", lease.group, _lease_keys(keyspace, lease.group, now_ms, True), args)


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


# -- several calls of one group in one script call ----------------------------------


def acquire_many_call(
    keyspace: KeySpace,
    group: str,
    requests: Sequence[tuple[Any, ...]],
    *,
    pending_ms: int,
    purge: int,
    now_ms: int | None = None,
) -> ScriptCall:
    """Arguments of acquire_many.lua: ``(tenant, units, lease_id, ttl_ms, wait[, shadow[,
    meters]])`` per request (``shadow`` defaults to False, ``meters`` to none).

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
            meters=request[6] if len(request) > 6 else None,
        )
        for request in requests
    ]
    metered = any(len(call.keys) > call.script.required_keys for call in calls)
    return _call(
        "acquire_many", group, _lease_keys(keyspace, group, now_ms, metered), merged_args(calls)
    )


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
    return _call("release_many", group, _lease_keys(keyspace, group, now_ms), merged_args(calls))
