"""``Runner``: steps one flow, the one place between a flow's ops and a client's I/O.

It applies the per-shard circuit breaker before each wire op, the NOSCRIPT
rule (load the script and retry exactly once: the script certainly did not
run), merges a pipelined batch's partial replies, and translates redis-py
errors into ``ratequota`` errors thrown back into the flow. The op types it
steps are in ``ratequota.engine.ops``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

import redis

from ratequota.clients.backends import is_noscript, translate_error
from ratequota.clients.failure import Breakers
from ratequota.engine.ops import LOCAL_OPS, Batch, LoadScript, ScriptCall, call_name
from ratequota.errors import BackendUnavailable, RateQuotaError
from ratequota.observe import Observer

__all__ = ["REDIS_ERRORS", "Runner"]

T = TypeVar("T")

#: redis-py's own errors (cluster errors do not all derive from RedisError).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)


class Runner(Generic[T]):
    """Steps one flow; the shell performs ``op`` and reports with ``send`` or ``throw``.

    The shell's whole loop: ``while run.op is not None: run.step(perform)``
    (``await run.astep(perform)`` in the async client), then ``run.result()``.
    With an ``observer``, every perform but a sleep is timed on ``clock`` and
    reported as one Redis call (the one place both clients are measured).
    """

    def __init__(
        self,
        flow: Generator[Any, Any, T],
        breakers: Breakers,
        node_of: Callable[[str], object],
        where: str,
        *,
        observer: Observer | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._flow = flow
        self._breakers = breakers
        self._node_of = node_of
        self._where = where
        self._observer = observer
        self._clock = clock
        self.op: Any = None
        self._result: Any = None
        self._reloaded = False
        self._partial: list[Any] | None = None
        self._missing: list[int] = []
        self._advance(None, None)

    def step(self, perform: Callable[[Any], Any]) -> None:
        """Perform ``op`` with a blocking ``perform`` and feed the outcome to the flow."""
        op, began = self.op, self._began()
        try:
            value = perform(op)
        except Exception as exc:  # translated into a ratequota error, or re-raised if a bug
            self._timed(op, began, is_noscript(exc))
            self.throw(exc)
        else:
            self._timed(op, began, True)
            self.send(value)

    async def astep(self, perform: Callable[[Any], Awaitable[Any]]) -> None:
        """``step`` for an awaitable ``perform``."""
        op, began = self.op, self._began()
        try:
            value = await perform(op)
        except Exception as exc:
            self._timed(op, began, is_noscript(exc))
            self.throw(exc)
        else:
            self._timed(op, began, True)
            self.send(value)

    def _began(self) -> float | None:
        if self._observer is None or self._clock is None or isinstance(self.op, LOCAL_OPS):
            return None
        return self._clock()

    def _timed(self, op: Any, began: float | None, ok: bool) -> None:
        """Report one round trip; a NOSCRIPT reply is not an error (the script loads, once)."""
        if began is None:
            return
        assert self._observer is not None and self._clock is not None
        seconds = max(0.0, self._clock() - began)
        self._observer.redis_call(str(self._node_of(op.route)), call_name(op), seconds, ok)

    def result(self) -> T:
        """The flow's return value, once ``op`` is None."""
        assert self.op is None
        return self._result  # type: ignore[no-any-return]

    def _advance(self, value: Any, error: BaseException | None) -> None:
        while True:
            try:
                op = self._flow.send(value) if error is None else self._flow.throw(error)
            except StopIteration as stop:
                self.op, self._result = None, stop.value
                return
            value = error = None
            self._reloaded, self._partial = False, None
            if not isinstance(op, LOCAL_OPS):
                error = self._breakers.refuse(self._node_of(op.route), self._where)
            if error is None:
                self.op = op
                return

    def send(self, value: Any) -> None:
        """``op`` succeeded with ``value``."""
        op = self.op
        if isinstance(op, LOCAL_OPS):
            self._advance(value, None)
            return
        self._breakers.record(self._node_of(op.route), True)
        if isinstance(op, LoadScript):
            self.op = op.then
            return
        if isinstance(op, Batch):
            value = self._batch_reply(op, list(value))
            if value is None:
                return
        self._advance(value, None)

    def _batch_reply(self, op: Batch, replies: list[Any]) -> list[Any] | None:
        """Merge a batch's replies; on NOSCRIPT load once and re-send only those calls."""
        if self._partial is not None:
            merged = self._partial
            for index, reply in zip(self._missing, replies, strict=True):
                merged[index] = reply
            return merged
        missing = [i for i, r in enumerate(replies) if is_noscript(r)]
        if not missing:
            return replies
        self._partial, self._missing = replies, missing
        retry: Batch | LoadScript = Batch(op.route, tuple(op.calls[i] for i in missing))
        for source in {op.calls[i].script.source for i in missing}:
            retry = LoadScript(op.route, source, retry)
        self.op = retry
        return None

    def throw(self, exc: BaseException) -> None:
        """``op`` raised ``exc``; anything not from Redis is re-raised (a bug, not an outage)."""
        op = self.op
        if isinstance(op, ScriptCall) and is_noscript(exc) and not self._reloaded:
            # Restart, failover or SCRIPT FLUSH: load and retry exactly once.
            self._reloaded = True
            self.op = LoadScript(op.route, op.script.source, op)
            return
        if isinstance(exc, RateQuotaError):
            error: RateQuotaError = exc
        elif isinstance(exc, REDIS_ERRORS):
            error = translate_error(exc, self._where)
            error.__cause__ = exc
        else:
            self._flow.close()
            raise exc
        if not isinstance(op, LOCAL_OPS):
            ok = not isinstance(error, BackendUnavailable)
            self._breakers.record(self._node_of(op.route), ok)
        self._advance(None, error)
