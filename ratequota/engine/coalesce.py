"""Several calls of one group in one script run: ``acquire`` into ``acquire_many``, ``release``
into ``release_many``.

A ``_many`` script decides its entries in order, exactly as the single calls
would one after another, while paying the clock, policy, purge and demand
reads once. ``merged_args`` is the one encoding of a ``_many`` call's
arguments: the protocol's ``acquire_many_call`` / ``release_many_call`` are
built on it, and so is ``coalesce``, which the async client's batcher applies to the calls it
queued for one round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import attrs

from ratequota.engine.ops import Arg, ScriptCall, script_call

__all__ = ["MERGES", "Merge", "coalesce", "merge_calls", "merged_args"]


@attrs.frozen
class Merge:
    """How calls of one script merge into its ``_many`` sibling.

    ``shared`` arguments must be equal for calls to merge and lead the merged
    call's ARGV; ``each`` are the per-call arguments that follow, call by call.
    The names are ARGV names of the single script's header.
    """

    single: str
    many: str
    shared: tuple[str, ...]
    each: tuple[str, ...]


MERGES = (
    Merge(
        "acquire",
        "acquire_many",
        ("now_ms", "schema", "pending_ms", "purge"),
        ("tenant", "units", "lease_id", "ttl_ms", "wait", "shadow", "meters"),
    ),
    Merge(
        "release", "release_many", ("now_ms", "schema", "purge"), ("lease_id", "tenant", "token")
    ),
)
_BY_SINGLE = {m.single: m for m in MERGES}


def _positions(call: ScriptCall, names: tuple[str, ...]) -> tuple[int, ...]:
    return _indices(call.script.argv, names)


@functools.cache
def _indices(argv: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    """Where ``names`` sit in a header's ARGV; asked for every call the batcher queues."""
    return tuple(argv.index(name) for name in names)


def merged_args(calls: Sequence[ScriptCall]) -> list[Arg]:
    """The ARGV of the ``_many`` call doing what ``calls`` (one script, one group, equal
    shared arguments) do one after another: the shared ones, then each call's own."""
    if not calls:
        raise ValueError("nothing to merge: a _many call needs at least one call")
    first = calls[0]
    merge = _BY_SINGLE[first.script.name]
    shared = [first.args[i] for i in _positions(first, merge.shared)]
    each_at = _positions(first, merge.each)
    return [*shared, *(call.args[i] for call in calls for i in each_at)]


def merge_calls(calls: Sequence[ScriptCall]) -> ScriptCall:
    """The ``_many`` call of ``calls`` (see ``merged_args``); its reply lists theirs, in order."""
    first = calls[0] if calls else None
    if first is None:
        raise ValueError("nothing to merge: a _many call needs at least one call")
    many = _BY_SINGLE[first.script.name].many
    return script_call(many, first.route, first.keys, merged_args(calls))


def _bucket(op: object) -> tuple[Any, ...] | None:
    """What calls must share to merge, or None for an op that never merges."""
    if not isinstance(op, ScriptCall) or op.script.name not in _BY_SINGLE:
        return None
    merge = _BY_SINGLE[op.script.name]
    return (op.script.name, op.keys, *(op.args[i] for i in _positions(op, merge.shared)))


def coalesce(ops: Sequence[Any]) -> tuple[list[Any], list[tuple[int, int | None]]]:
    """Merge the acquires (and the releases) of one group queued together into one call each.

    Returns the ops to send, in order, and for every input op where its reply
    is: ``(index of the op sent, index inside that op's list of replies)``,
    the second None when the op is sent unchanged. Calls merge only with calls
    of the same script, group and shared arguments, and only two or more.
    """
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for index, op in enumerate(ops):
        key = _bucket(op)
        if key is not None:
            buckets.setdefault(key, []).append(index)
    merged = {members[0]: members for members in buckets.values() if len(members) > 1}
    if not merged:
        return list(ops), [(i, None) for i in range(len(ops))]
    absorbed = {i for members in merged.values() for i in members[1:]}
    sent: list[Any] = []
    where: list[tuple[int, int | None]] = [(0, None)] * len(ops)
    for index, op in enumerate(ops):
        if index in absorbed:
            continue
        if index not in merged:
            sent.append(op)
            where[index] = (len(sent) - 1, None)
            continue
        members = merged[index]
        sent.append(merge_calls([ops[m] for m in members]))
        for position, member in enumerate(members):
            where[member] = (len(sent) - 1, position)
    return sent, where
