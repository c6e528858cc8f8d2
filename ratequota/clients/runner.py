"""``Runner``: steps one flow, the one place between a flow's ops and a client's I/O.

It applies the per-shard circuit breaker before each wire op, runs script
calls and batches through the one script exchange (``clients.scripting``:
NOSCRIPT loads the script and retries exactly once), and translates redis-py
errors into ``ratequota`` errors thrown back into the flow. The op types it
steps are in ``ratequota.engine.ops``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar, cast

import redis
from redis.exceptions import NoScriptError

from ratequota.clients.backends import is_noscript, translate_error
from ratequota.clients.failure import Breakers
from ratequota.clients.scripting import Exchange, Load, Send, exchange
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
    (``await run.astep(perform)`` in the async client), then ``run.result()``;
    ``run.run(perform)`` is that loop for a blocking ``perform``.
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
        self._advance(None, None)

    # Until a flow sets them (most never do): the defaults, read from the class.
    _result: Any = None
    #: The script exchange of the flow's current ScriptCall or Batch (``clients.scripting``).
    _exchange: Exchange | None = None
    _single = False  # the exchange stands for one ScriptCall (not a Batch)
    _route = ""  # where the exchange's calls and loads go

    def run(self, perform: Callable[[Any], Any]) -> T:
        """The blocking shell's whole loop: ``step`` until the flow returns, then its result."""
        if self._observer is not None:
            while self.op is not None:
                self.step(perform)
            return self._result  # type: ignore[no-any-return]
        while (op := self.op) is not None:  # ``step`` without an observer, in line
            try:
                value = perform(op)
            except Exception as exc:  # translated into a ratequota error, or re-raised if a bug
                self.throw(exc)
            else:
                self.send(value)
        return self._result  # type: ignore[no-any-return]

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
            self._exchange = None
            if type(op) is ScriptCall or not isinstance(op, LOCAL_OPS):
                error = self._breakers.refuse(self._node_of(op.route), self._where)
            if error is None:
                if type(op) is Batch:
                    self._start(op)
                else:
                    self.op = op
                return

    def _start(self, op: Any) -> None:
        """Perform ``op`` next; a batch of script calls goes through an exchange.

        A single script call is sent as it is: its exchange (``clients.scripting``)
        is only started when the call meets NOSCRIPT, which is when it has work to do.
        """
        if type(op) is not Batch:
            self.op = op
            return
        self._single = False
        self._route = op.route
        self._exchange = exchange(op.calls)
        self._request(next(self._exchange))

    def _exchange_of(self, call: ScriptCall) -> None:
        """Start the exchange of ``call``, already sent once (its reply is fed next)."""
        self._single = True
        self._route = call.route
        self._exchange = exchange((call,))
        next(self._exchange)

    def _request(self, request: Send | Load) -> None:
        """The op performing the exchange's ``request``."""
        if isinstance(request, Load):
            self.op = LoadScript(self._route, request.source)
        elif self._single:
            self.op = request.calls[0]
        else:
            self.op = Batch(self._route, cast(tuple[ScriptCall, ...], request.calls))

    def _resume(self, reply: Any) -> None:
        """Feed the exchange; when it is done, hand its replies to the flow."""
        assert self._exchange is not None
        try:
            self._request(self._exchange.send(reply))
        except StopIteration as stop:
            replies: list[Any] = stop.value
            self._exchange = None
            if not self._single:
                self._advance(replies, None)
            elif isinstance(replies[0], BaseException):
                self._fail(replies[0])  # NOSCRIPT again after loading: an error like any other
            else:
                self._advance(replies[0], None)

    def send(self, value: Any) -> None:
        """``op`` succeeded with ``value``."""
        op = self.op
        if type(op) is ScriptCall and self._exchange is None:  # the hot path: one script call
            self._breakers.record(self._node_of(op.route), True)
            if isinstance(value, NoScriptError):  # an error reply handed back (``is_noscript``)
                self._exchange_of(op)
                self._resume([value])
            else:
                self._advance(value, None)
            return
        if isinstance(op, LOCAL_OPS):
            self._advance(value, None)
            return
        self._breakers.record(self._node_of(op.route), True)
        if self._exchange is None:
            if type(op) is ScriptCall and is_noscript(value):  # an error reply handed back
                self._exchange_of(op)
                self._resume([value])
                return
            self._advance(value, None)
        elif isinstance(op, ScriptCall):
            self._resume([value])
        elif isinstance(op, Batch):
            self._resume(list(value))
        else:
            self._resume(value)

    def throw(self, exc: BaseException) -> None:
        """``op`` raised ``exc``; anything not from Redis is re-raised (a bug, not an outage)."""
        if isinstance(self.op, ScriptCall) and is_noscript(exc):
            # Restart, failover or SCRIPT FLUSH: the exchange loads it and retries exactly once.
            if self._exchange is None:
                self._exchange_of(self.op)
            self._resume([exc])
            return
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        op = self.op
        self._exchange = None
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
