"""Whether one server's script calls go as ``FCALL`` of the function library or as ``EVALSHA``.

An ``EVALSHA`` re-creates every library function a script reaches on every
call; the same scripts loaded once as a function library (``engine.scripts``)
do that at load, which takes 7–21 % off a call's cost inside Redis
(docs/benchmarks.md, "Scripts as functions"). The packed senders of the
clients made from URLs (``PackedScripts``, ``AsyncPackedScripts``,
``ScriptPipe``) each keep one ``Functions`` for their server and ask it how
to pack a call; everything else (a cluster, the embedded fakeredis, a
connection the user made) keeps ``EVALSHA``.

The library is loaded by the first write to the server and again after any
reply says a function is missing (the server restarted empty, an operator ran
``FUNCTION FLUSH``): ``FUNCTION LOAD`` goes in the same write, ahead of the
calls, so the calls behind it find it. The reply to the call that found its
function missing becomes ``NOSCRIPT``: the function certainly did not run, and
the one place that re-sends a call (``clients.scripting``) re-sends it once.

A server that cannot take functions says so once — Redis before 7 does not
know ``FCALL``, an ACL may not grant it or ``FUNCTION LOAD``, a proxy may
answer that it does not support it — and its calls then go as ``EVALSHA`` for
the life of the sender, so a deployment that worked before keeps working (its
first refused call is re-sent the same way). A proxy that drops the connection
instead of answering cannot be told from a failing server: set
``functions=False`` behind one. A passing refusal of ``FUNCTION LOAD`` (out of memory, loading a
dataset, a read-only replica) only puts the load off to the next write.

Plain state, no I/O, no lock: the flags are single assignments, and a race
between threads costs at most one load more or one call re-sent.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis

from ratequota.engine.ops import ScriptCall
from ratequota.engine.resp import pack_evalsha, pack_fcall, pack_function_load
from ratequota.engine.scripts import function_library

__all__ = ["Functions"]

log = logging.getLogger("ratequota")

#: How a server (or a proxy in front of one) says it will not run ``FCALL`` at all.
_REFUSALS = ("unknown command", "unsupported command", "not supported")

#: Refusals of ``FUNCTION LOAD`` that pass: the load is tried again by the next write.
_PASSING = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class Functions:
    """One server's way of calling scripts (module docstring).

    ``on``: calls go as ``FCALL`` (until the server shows it cannot take them).
    ``due``: the next write begins with ``FUNCTION LOAD``. ``where`` names the
    server in the warning logged when it turns out not to take functions (the
    calls work on, at the cost docs/benchmarks.md measures: an operator may
    want the rights back).
    """

    __slots__ = ("due", "on", "where")

    def __init__(self, enabled: bool = True, where: str = "redis") -> None:
        self.on = enabled
        self.due = enabled
        self.where = where

    def pack(self, call: ScriptCall) -> bytes | None:
        """``call`` as this server takes it, or None (``engine.resp``: leave it to redis-py).

        A script outside the library (a test's, say: no ``function``) goes as ``EVALSHA``.
        """
        if self.on and call.script.function:
            return pack_fcall(call.script.function, call.keys, call.args)
        return pack_evalsha(call.script.sha, call.keys, call.args)

    def take_load(self) -> bytes | None:
        """``FUNCTION LOAD``'s bytes if the next write must begin with it, else None.

        Taken once: the writer that takes it sends it and hands its reply to
        ``loaded``, which makes it due again if it did not take.
        """
        if not (self.due and self.on):
            return None
        self.due = False
        return _load_bytes()

    def loaded(self, reply: Any) -> None:
        """The reply to a ``FUNCTION LOAD`` (or the error that ended its connection)."""
        if not isinstance(reply, BaseException) or "already exists" in str(reply):
            return
        if isinstance(reply, _PASSING):
            self.due = True
        else:  # not known, not permitted, not loadable here: EVALSHA from now on
            self._off(reply)

    def answer(self, error: BaseException) -> BaseException:
        """An error reply of a script call as the caller hears it: ``NOSCRIPT`` when the
        function it called is missing or ``FCALL`` is refused (the call did not run), after
        noting what that says about the server; any other error as it is."""
        text = str(error)
        if text.startswith("Function not found"):
            self.due = self.on
            return redis.exceptions.NoScriptError(f"{text} (a ratequota function)")
        lowered = text.lower()
        if "fcall" in lowered and (
            isinstance(error, redis.exceptions.NoPermissionError)
            or any(refusal in lowered for refusal in _REFUSALS)
        ):
            self._off(error)
            return redis.exceptions.NoScriptError(f"{text} (EVALSHA from now on)")
        return error

    def _off(self, why: BaseException) -> None:
        if self.on:
            self.on = False
            log.warning(
                "ratequota: Redis at %s does not take the scripts as functions (%s: %s); "
                "they go by EVALSHA, which costs Redis more per call (docs/deployment.md: "
                "+fcall +function|load)",
                self.where,
                type(why).__name__,
                why,
            )


@functools.cache
def _load_bytes() -> bytes:
    """``FUNCTION LOAD`` of this process's library, packed once."""
    return pack_function_load(function_library().source)
