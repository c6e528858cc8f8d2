"""Every operation a flow yields, in one place: data only, no I/O.

A client decision is a *flow* (a generator, see ``ratequota.clients.core``)
that yields these ops and is resumed with their result. The wire ops
(``ScriptCall``, ``Command``, ``LoadScript``, ``Batch``) go to the Redis shard
their ``route`` maps to; the local ops (``Sleep``, ``Compute``, ``Spawn``) are
performed by the client itself. They live in the engine because the engine's
encoders build ``ScriptCall``s; the one runner that steps a flow is
``ratequota.clients.runner``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import attrs

from ratequota.engine.resp import pack_evalsha
from ratequota.engine.scripts import ScriptSpec, load_scripts

__all__ = [
    "LOCAL_OPS",
    "Arg",
    "Batch",
    "Command",
    "Commands",
    "Compute",
    "Flow",
    "LoadScript",
    "Op",
    "ScriptCall",
    "Sleep",
    "Spawn",
    "call_name",
    "pipeline_args",
    "script_call",
    "wire_call",
]

T = TypeVar("T")

Arg = str | int | float


# Not slotted: a frozen class with a ``__dict__`` is built in a third less time, and one is
# built for every call of the hot path (it lives for one round trip).
@attrs.frozen(slots=False)
class ScriptCall:
    """One script invocation, routed by ``route`` (the group name)."""

    script: ScriptSpec
    route: str
    keys: tuple[str, ...]
    args: tuple[Arg, ...]

    @property
    def wire(self) -> tuple[Any, ...]:
        """The arguments of redis-py's ``evalsha`` performing this call, pre-encoded.

        redis-py encodes every argument in Python (a few ``isinstance`` each) and
        hands bytes through at once: the keys are encoded once per group, ints
        and ASCII text here, in place (the SHA stays text, as callers and
        fakes compare it). Only ASCII is
        pre-encoded, whose bytes are the same in any encoding a connection may
        be set to; other text (a tenant's name, say) is left to the connection.
        """
        return (
            self.script.sha,
            len(self.keys),
            *_wire_keys(self.keys),
            *[
                b"%d" % a if type(a) is int else a.encode() if type(a) is str and a.isascii() else a
                for a in self.args
            ],
        )

    @property
    def packed(self) -> bytes | None:
        """The whole ``EVALSHA`` command in RESP, or None to leave it to redis-py (``resp``)."""
        return pack_evalsha(self.script.sha, self.keys, self.args)


@functools.lru_cache(maxsize=16384)
def _ascii(text: str) -> str | bytes:
    return text.encode() if text.isascii() else text


@functools.lru_cache(maxsize=16384)
def _wire_keys(keys: tuple[str, ...]) -> tuple[str | bytes, ...]:
    """A call's keys as sent: one tuple per group and hour (``protocol._lease_keys``)."""
    return tuple(_ascii(key) for key in keys)


def script_call(name: str, route: str, keys: Sequence[str], args: Sequence[Arg]) -> ScriptCall:
    """A call of script ``name``, checked against its header (a mismatch is a bug: it asserts).

    A shape (script, number of keys, number of arguments) the header accepted
    is remembered with the spec that accepted it, so the hot path's calls skip
    the check's own bookkeeping; a script of variadic arguments is checked afresh.
    """
    spec = load_scripts()[name]
    shape = (name, len(keys), len(args))
    if _ACCEPTED.get(shape) is not spec:
        spec.check_call(shape[1], shape[2])
        if not spec.variadic:
            _ACCEPTED[shape] = spec
    return ScriptCall(spec, route, tuple(keys), tuple(args))


#: Shapes of fixed-argument scripts already checked, with the spec that accepted each.
_ACCEPTED: dict[tuple[str, int, int], ScriptSpec] = {}


@attrs.frozen
class Sleep:
    """Wait ``seconds`` before resuming the flow (always bounded by a deadline)."""

    seconds: float


@attrs.frozen
class Command:
    """A plain Redis command on the shard that ``route`` maps to."""

    route: str
    args: tuple[str | int, ...]


@attrs.frozen
class Commands:
    """Several plain commands to the shard of ``route``, pipelined in one round trip (the
    hours of the usage ledger). The reply is the list of their replies; an error raises."""

    route: str
    commands: tuple[Command, ...]


@attrs.frozen
class Compute:
    """Run ``function()`` (CPU work, no I/O) and resume with its result.

    The sync client calls it in place; the async client in a worker thread,
    so parsing a large catalog never stalls its event loop.
    """

    function: Callable[[], Any]


@attrs.frozen
class Spawn:
    """Start ``flow`` in the background (a thread, or a task) and resume at once with None.

    The spawned flow runs to its end on its own; its errors are its own
    business (it must handle them). Used to refresh the catalog without
    making any caller wait for it.
    """

    flow: Generator[Any, Any, None]


Op = ScriptCall | Command | Commands | Sleep | Compute | Spawn
Flow = Generator[Op, Any, T]

#: Ops performed by the client itself, not sent to Redis (no route, no circuit breaker).
LOCAL_OPS = (Sleep, Compute, Spawn)


@attrs.frozen
class LoadScript:
    """``SCRIPT LOAD source`` on the shard of ``route`` (NOSCRIPT: see ``clients.scripting``)."""

    route: str
    source: str


@attrs.frozen
class Batch:
    """Several script calls to the shard of ``route``, pipelined in one round trip.

    The reply is a list with one entry per call: its reply, or the exception
    it raised (the other calls are unaffected).
    """

    route: str
    calls: tuple[ScriptCall, ...]


def wire_call(op: ScriptCall | Command | LoadScript) -> tuple[str, tuple[Any, ...]]:
    """The redis-py method and arguments performing ``op``."""
    if isinstance(op, Command):
        return "execute_command", op.args
    if isinstance(op, LoadScript):
        return "script_load", (op.source,)
    return "evalsha", op.wire


def call_name(op: ScriptCall | Command | Commands | LoadScript | Batch) -> str:
    """How a Redis call is labelled in metrics: its script, its command, or ``script_load``.

    A pipelined ``Batch`` (``Commands``) is one round trip, named by the script (the
    command) of its calls.
    """
    if isinstance(op, ScriptCall):
        return op.script.name
    if isinstance(op, Command):
        return str(op.args[0]).lower()
    if isinstance(op, Commands):
        return call_name(op.commands[0]) if op.commands else "pipeline"
    if isinstance(op, LoadScript):
        return "script_load"
    return op.calls[0].script.name if op.calls else "pipeline"


def pipeline_args(batch: Batch) -> list[tuple[Any, ...]]:
    """The EVALSHA arguments of each call of a batch, in order."""
    return [wire_call(call)[1] for call in batch.calls]
