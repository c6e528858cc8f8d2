"""The async client's per-shard batcher: concurrent calls of many tasks in one round trip.

When to send is ``ratequota.engine.batching``'s policy; which calls merge is
``ratequota.engine.coalesce``'s; NOSCRIPT is ``ratequota.clients.scripting``'s.
This module only queues, sends, bounds each round trip by the socket timeout
and hands every caller its reply.

Per round trip it costs one task (which awaits the call itself, bounded by a
timer) and one plain future per caller: about two event-loop iterations more
than the caller awaiting redis-py itself. A round trip takes its calls when its
task begins, so the callers one reply wakes leave together in the next.

On a shard with a ``ScriptPipe`` (the backends made from URLs) a round trip
of script calls needs no task at all while the pipe's connection is open: a
callback scheduled like the task's first step (so the same calls join it)
writes them, and the pipe's reading callback answers the callers, bounded by
the pipe's own deadline: no task or timer to make. With nothing in flight a
lone call is written at once (no reply is about to wake callers to join it):
a caller alone then costs two event-loop iterations per call. Anything else
(the first connection, a call the pipe cannot pack, a reload after NOSCRIPT)
takes the task.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import redis

from ratequota.clients.backends import is_noscript
from ratequota.clients.scripting import Load, exchange
from ratequota.engine.batching import BatchPolicy
from ratequota.engine.coalesce import coalesce
from ratequota.engine.ops import ScriptCall, wire_call

__all__ = ["SOLO_IN_FLIGHT", "NoReply", "ShardBatcher"]


#: The calls of one round trip: each wire op with its caller's future.
_Batch = list[tuple[Any, "asyncio.Future[Any]"]]

#: Calls in flight per node when a cluster client cannot pipeline; well under
#: redis-py's per-node connection limit (100), which fails rather than waits.
SOLO_IN_FLIGHT = 32


class ShardBatcher:
    """Pipelines the concurrent commands of many tasks to one shard (see ``BatchPolicy``).

    It also bounds the connections a client opens to a shard at
    ``max_in_flight``: hundreds of tasks never exhaust the pool.
    """

    def __init__(
        self,
        conn: Any,
        policy: BatchPolicy,
        *,
        pipelines: bool = True,
        bound: float = 60.0,
        send_script: Callable[[ScriptCall], Awaitable[Any]] | None = None,
        orphaned: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self._conn = conn
        #: Hears ``(op, reply)`` of a call whose caller was cancelled before its reply came
        #: (the client gives back a lease such a call was granted).
        self._orphaned = orphaned
        #: How a script call sent alone goes: pre-packed on the shard's pool
        #: (``AsyncPackedScripts``), or None for ``conn.evalsha``.
        self._send_script = send_script
        self._policy = policy
        self._fill = policy.fill()
        self._bound = bound  # each round trip's timeout, from its send (the socket timeout)
        self._pipelines = pipelines
        self._queue: _Batch = []
        #: The batch of a round trip whose task has not begun yet: calls submitted
        #: meanwhile (in the same loop iteration) join it, up to the policy's ``fill``.
        self._filling: _Batch | None = None
        self._in_flight = 0
        self._tasks: dict[asyncio.Task[None], _Batch] = {}  # round trips, with their calls
        #: The shard's pipe, when ``send_script`` is one: round trips then go without a task.
        self._pipe: Any = send_script if hasattr(send_script, "send_now") else None
        self._trips: set[_Trip] = set()  # the round trips on the pipe, not answered yet
        self._cleanups: set[asyncio.Future[Any]] = set()  # cancelled calls winding down

    def submit(self, op: Any) -> asyncio.Future[Any]:
        """Queue one wire op; the future gets its reply or its exception.

        A plain future, not a task: the caller's own task awaits it, and a
        cancelled caller only cancels its future (its call still goes out
        with the others; its reply goes to ``orphaned``).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        filling = self._filling
        if filling is not None and len(filling) < self._fill:
            filling.append((op, future))  # leaves with the round trip about to be sent
            return future
        self._queue.append((op, future))
        self._pump()
        return future

    def _pump(self) -> None:
        if self._pipelines:
            count = self._policy.take(len(self._queue), self._in_flight)
        else:  # a cluster client cannot pipeline EVALSHA: one call per send, a few at once
            count = 1 if self._queue and self._in_flight < SOLO_IN_FLIGHT else 0
        if count:
            batch, self._queue = self._queue[:count], self._queue[count:]
            idle = not self._in_flight
            self._in_flight += 1
            if self._pipelines:
                if self._pipe is not None:  # on the pipe: a callback, not a task
                    trip = _Trip(self, batch)
                    self._trips.add(trip)
                    if idle and len(batch) == 1:
                        # Nothing in flight: no reply is about to wake a crowd of callers,
                        # so a lone call goes now rather than one loop iteration later.
                        trip.launch()
                        return
                    self._filling = batch
                    trip.handle = asyncio.get_running_loop().call_soon(trip.launch)
                    return
                # Sent when its task begins, next loop iteration: until then the calls
                # of tasks woken in this one join it (all the callers a reply just
                # answered), instead of the first leaving alone and the rest queueing.
                self._filling = batch
            self._start(batch, self._send(batch))

    def _start(self, batch: _Batch, trip: Coroutine[Any, Any, None]) -> None:
        """Run ``trip``, the round trip of ``batch`` (``_send``, or a reload), as a task.

        ``trip`` answers every call of ``batch`` itself, however it ends, once it
        runs (``_finished`` answers those of a task cancelled before it ran).
        """
        task = asyncio.get_running_loop().create_task(trip)
        self._tasks[task] = batch
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A round trip's task is done; one cancelled before it began still answers its calls.

        ``_send`` answers every call itself, however its round trip ends, once
        it runs; a task cancelled before its first step (``aclose`` in the same
        loop iteration as the ``submit``) never runs a line of it, and its
        callers, awaiting plain futures, would wait forever.
        """
        batch = self._tasks.pop(task)
        if self._filling is batch:
            self._filling = None
        if task.cancelled():
            self._answer(batch, ((0, None),) * len(batch), [asyncio.CancelledError()])

    async def aclose(self) -> None:
        """Cancel the round trips still in flight and the clean-ups still winding down.

        Cancelling a round trip hands its Redis call over to the clean-ups, so
        this goes round until nothing is left (a few rounds at most), lest a
        task be destroyed pending when the loop closes. Calls still queued
        then fail as the cancelled round trips' calls do, never left waiting,
        and so do those of the round trips on the pipe (their replies, should
        they come, are dropped).
        """
        for trip in list(self._trips):
            trip.abandon()
        for _ in range(5):
            pending: list[asyncio.Future[Any]] = [
                t for t in (*self._tasks, *self._cleanups) if not t.done()
            ]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(_fresh(asyncio.CancelledError()))

    def _fail_queued(self) -> None:
        """A round trip to this shard got no reply in time: fail every call queued behind it.

        They were queued because round trips were in flight, so each has waited
        less than one socket timeout; sent now, each would wait a full one more
        on a server that is not answering. They fail at once, never sent (the
        caller's failure mode applies); new calls try the shard again.
        """
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(NoReply(f"{_NO_REPLY} (queued behind a round trip)"))

    async def _send(self, batch: _Batch, prepared: tuple[list[Any], Any] | None = None) -> None:
        """One round trip of ``batch``, awaited here, bounded by a timer; then every reply.

        The call is awaited in this task itself, not in a task of its own
        raced against the bound: that is a task, a future and about three
        event-loop iterations fewer per round trip. At the deadline the timer
        answers the callers (``NoReply``) and frees the slot at once, then
        cancels this task, whose clean-up (redis-py dropping a connection to
        a paused server can take another socket timeout) goes on in the
        background, as with ``_bounded``. Whichever comes first answers:
        the reply, or the timer.
        """
        if prepared is None:
            if self._filling is batch:
                self._filling = None  # complete: later calls queue for the next round trip
            wire, where = _wire_of(batch)
        else:  # a round trip the pipe could not send now (``_Trip.launch``)
            wire, where = prepared
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._answer(
                batch, where, [NoReply(f"{_NO_REPLY} within {self._bound:.3f}s")] * len(wire)
            )
            task.cancel()

        timer = loop.call_at(loop.time() + self._bound, expire)
        replies: list[Any]
        try:
            replies = await self._exchange(wire)
        except BaseException as exc:  # every waiter hears about it, cancellation included
            replies = [exc] * len(wire)
        finally:
            timer.cancel()
        if expired:  # the callers have their NoReply: this was the timer's cancellation
            return
        await self._reload_and_answer(batch, where, wire, replies)

    async def _reload_and_answer(
        self,
        batch: _Batch,
        where: Sequence[tuple[int, int | None]],
        wire: list[Any],
        replies: list[Any],
    ) -> None:
        """Answer the callers, once the calls NOSCRIPT refused are loaded and sent again."""
        if any(is_noscript(reply) for reply in replies):
            try:
                replies = await self._reload(wire, replies)
            except BaseException as exc:
                replies = [exc] * len(wire)
        self._answer(batch, where, replies)

    def _answer(
        self,
        batch: _Batch,
        where: Sequence[tuple[int, int | None]],
        replies: list[Any],
    ) -> None:
        """The round trip is over: free its slot, hand every caller its reply, send the next."""
        self._in_flight -= 1
        if any(isinstance(r, (NoReply, redis.exceptions.TimeoutError)) for r in replies):
            self._fail_queued()
        for (op, future), (index, part) in zip(batch, where, strict=True):
            reply = replies[index]
            if future.done():  # its caller was cancelled
                if self._orphaned is not None and not isinstance(reply, BaseException):
                    self._orphaned(op, reply if part is None else reply[part])
                continue
            if isinstance(reply, BaseException):
                future.set_exception(_fresh(reply))
            else:
                future.set_result(reply if part is None else reply[part])
        if self._queue:
            self._pump()

    async def _reload(self, wire: list[Any], replies: list[Any]) -> list[Any]:
        """NOSCRIPT in ``replies``: the script exchange loads and re-sends once.

        The merged calls' callers never sent the ``_many`` script themselves, so
        the reload happens here, for every call of the round trip alike. A load
        or re-send that fails is the reply of the calls that needed it only.
        The first send went out as it is (``_send``); the exchange only starts
        when a reply is NOSCRIPT, which is when it has work to do. Each of its
        round trips is bounded by ``_bounded``.
        """
        run = exchange(wire)
        next(run)  # the first send, already made
        step = functools.partial(run.send, replies)
        while True:
            try:
                request = step()
            except StopIteration as stop:
                return list(stop.value)
            try:
                if isinstance(request, Load):
                    reply = await self._bounded(self._conn.script_load(request.source))
                else:
                    reply = await self._bounded(self._exchange(list(request.calls)))
            except Exception as exc:
                step = functools.partial(run.throw, exc)
            else:
                step = functools.partial(run.send, reply)

    async def _exchange(self, ops: list[Any]) -> list[Any]:
        """One round trip of wire ops, bounded by its caller; a call's error is its reply, in place.

        A script call alone (or merged into one) goes through ``send_script`` when
        the shard has one; several calls keep redis-py's pipeline.
        """
        if len(ops) == 1:
            op = ops[0]
            try:
                if self._send_script is not None and type(op) is ScriptCall:
                    return [await self._send_script(op)]
                method, args = wire_call(op)
                return [await getattr(self._conn, method)(*args)]
            except Exception as exc:
                return [exc]
        pipe = self._conn.pipeline(transaction=False)
        for op in ops:
            method, args = wire_call(op)
            getattr(pipe, method)(*args)
        return list(await pipe.execute(raise_on_error=False))

    async def _bounded(self, awaitable: Any) -> Any:
        """``awaitable``'s result within one socket timeout, else ``NoReply`` at once.

        Unlike ``asyncio.wait_for`` this does not wait for the cancelled call
        to finish cleaning up: redis-py drops the connection on cancellation,
        which against a paused server takes another socket timeout. The
        clean-up goes on in the background. (``asyncio.wait`` of one task,
        without its sets and inner coroutine: this runs once per round trip.)
        """
        task = asyncio.ensure_future(awaitable)
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        task.add_done_callback(wake)
        timer = loop.call_later(self._bound, wake)
        try:
            await woken
        finally:
            timer.cancel()
            task.remove_done_callback(wake)
            if not task.done():
                task.cancel()
                self._cleanups.add(task)
                task.add_done_callback(_forget(self._cleanups))
        if not task.done():
            raise NoReply(f"{_NO_REPLY} within {self._bound:.3f}s")
        return task.result()


_NO_REPLY = "no reply from Redis"
#: Where the reply of a call sent alone is: the first reply, as it is.
_ALONE = ((0, None),)


def _wire_of(batch: _Batch) -> tuple[list[Any], Sequence[tuple[int, int | None]]]:
    """The calls a round trip of ``batch`` sends, and where each caller's reply is in theirs.

    Concurrent acquires (releases) of one group become one acquire_many (release_many)
    call: one script run pays the clock, policy, purge and demand reads once for all.
    """
    ops = [op for op, _ in batch]
    return coalesce(ops) if len(ops) > 1 else (ops, _ALONE)


class _Trip:
    """A round trip on the shard's pipe: launched by a callback, answered by the pipe's.

    ``launch`` runs where ``_send`` would begin (next loop iteration, the
    calls of that iteration joined); ``deliver`` hears each reply from the
    pipe's reading callback, and the last one answers the callers. If the
    pipe has no open connection, or a call cannot be packed, the round trip
    becomes a task as any other (``ShardBatcher._start``).
    """

    __slots__ = ("batch", "batcher", "handle", "missing", "over", "replies", "where", "wire")

    def __init__(self, batcher: ShardBatcher, batch: _Batch) -> None:
        self.batcher = batcher
        self.batch = batch
        self.handle: asyncio.Handle | None = None
        self.where: Sequence[tuple[int, int | None]] = _ALONE
        self.wire: list[Any] = []
        self.replies: list[Any] = []
        self.missing = 0
        self.over = False  # answered (or abandoned): a late reply is dropped

    def launch(self) -> None:
        batcher = self.batcher
        if batcher._filling is self.batch:
            batcher._filling = None  # complete: later calls queue for the next round trip
        self.wire, self.where = wire, _ = _wire_of(self.batch)
        pipe = batcher._pipe
        packs = [pipe.pack(op) if type(op) is ScriptCall else None for op in wire]
        self.replies = [None] * len(wire)
        self.missing = len(wire)
        delivers = [functools.partial(self.deliver, index) for index in range(len(wire))]
        sendable = [pack for pack in packs if pack is not None]
        if len(sendable) < len(packs) or not pipe.send_now(
            b"".join(sendable), delivers, batcher._bound
        ):
            batcher._trips.discard(self)
            batcher._start(self.batch, batcher._send(self.batch, (wire, self.where)))

    def deliver(self, index: int, reply: Any) -> None:
        if self.over:
            return
        if isinstance(reply, redis.exceptions.TimeoutError):  # the pipe's deadline: the bound
            reply = NoReply(f"{_NO_REPLY} within {self.batcher._bound:.3f}s")
        self.replies[index] = reply
        self.missing -= 1
        if self.missing:
            return
        self.over = True
        batcher = self.batcher
        batcher._trips.discard(self)
        if any(is_noscript(r) for r in self.replies):  # rare: the reload needs a task
            reload = batcher._reload_and_answer(self.batch, self.where, self.wire, self.replies)
            batcher._start(self.batch, reload)
        else:
            batcher._answer(self.batch, self.where, self.replies)

    def abandon(self) -> None:
        """The client is closing: the callers fail as a cancelled round trip's do."""
        if self.over:
            return
        self.over = True
        if self.handle is not None:
            self.handle.cancel()
        self.batcher._trips.discard(self)
        if self.batcher._filling is self.batch:
            self.batcher._filling = None
        self.batcher._answer(self.batch, ((0, None),) * len(self.batch), [asyncio.CancelledError()])


class NoReply(TimeoutError):
    """A round trip (or the one a call queued behind) got no reply within the socket timeout.

    A ``TimeoutError``, hence an ``OSError``: callers see ``BackendUnavailable``.
    """


def _forget(cleanups: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback dropping a cancelled call, its outcome retrieved (never logged)."""

    def done(task: asyncio.Future[Any]) -> None:
        cleanups.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _fresh(exc: BaseException) -> BaseException:
    """A cancellation of the batch task is an outage for the callers, not their cancellation."""
    if isinstance(exc, asyncio.CancelledError):
        return ConnectionError("the batch was cancelled (client closing)")
    return exc
