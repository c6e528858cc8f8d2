"""One pipelined connection per shard for the async client's script calls.

redis.asyncio spends more client CPU on one ``EVALSHA`` round trip than
ratequota spends deciding (a task for every write under ``wait_for``, a
timeout context and a stream read for every reply, the pool's checkout and
checkin): on a 2-core VM about 80 µs, where a protocol callback costs about
35. ``ScriptPipe`` sends the batcher's packed script calls over one
connection of its own and matches the replies to the calls in order, as
Redis answers them: a write is a plain ``transport.write``, a reply resolves
its call's future from ``data_received``, with no task and no per-call timer.

What it keeps from redis-py, so that nothing a user configured is lost: the
connection itself. It is made by the client's own connection class with the
pool's settings, which connects and runs the handshake (AUTH, HELLO,
CLIENT SETNAME, SELECT, TLS) exactly as for any pooled connection; the
pipe then takes its transport over. Error replies become the exceptions
redis-py's parser makes of them (``NoScriptError``, ``ResponseError``...).

How it fails, as redis-py would on the calls it carries:

- connection lost: every call in flight fails with ``ConnectionError``
  ("Connection closed by server."); the next call opens a new connection;
- no reply within the socket timeout: every call in flight fails with
  ``TimeoutError`` ("Timeout reading from host:port") and the connection is
  dropped (the replies behind the late one are not waited for);
- a caller cancelled: its reply is read and dropped when it comes; the
  connection and the other calls go on (redis-py must drop the connection).

One connection carries every call in flight: Redis runs commands one at a
time whatever the connection, so a reply never waits on another connection's
turn, and the batcher bounds how many calls are in flight.

Calls go as ``FCALL`` where the server takes them (``clients.functions``): a
write that must load the library begins with ``FUNCTION LOAD``, whose reply
the pipe reads itself, and an error reply saying a function is missing reaches
its caller as ``NOSCRIPT``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

import redis

from ratequota.clients.backends import async_no_retry, packed_bytes, pipelined, plain_pool
from ratequota.clients.functions import Functions
from ratequota.engine.ops import ScriptCall

__all__ = ["Deliver", "ScriptPipe"]

#: redis-py's own message when the server closes a connection.
_CLOSED = "Connection closed by server."


def _error_parser() -> Any:
    """redis-py's error-reply parser (the class it makes of ``NOSCRIPT``, ``ERR``...), or None."""
    try:
        from redis._parsers import BaseParser
    except ImportError:  # pragma: no cover - a redis-py without it keeps the pooled path
        return None
    return BaseParser.parse_error


def _connection_classes() -> tuple[type, ...]:
    """The connection classes whose transport the pipe may take over: redis.asyncio's own
    (TCP, TLS, Unix socket) and the hiredis-packing one ratequota gives its URL clients."""
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

    from ratequota.clients.backends import _hiredis_async_connection_class

    return (
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
        _hiredis_async_connection_class(),
    )


#: What a wire hands each call: its reply, or the exception that ended it (never raised).
Deliver = Callable[[Any], None]
#: hiredis's "no whole reply buffered yet" (a RESP3 ``false`` is a reply).
_MORE = object()


class _Wire(asyncio.Protocol):
    """One connection's protocol: writes calls, reads replies in order, fails them together.

    A new connection gets a new ``_Wire``, so a late callback of a dead one
    (its ``connection_lost``, its timer) can never touch the calls of the next.
    """

    def __init__(
        self,
        writer: Any,
        host: str,
        parse_error: Any,
        answer: Callable[[BaseException], BaseException],
    ) -> None:
        import hiredis

        #: The stream writer redis-py opened the connection with, kept while the wire
        #: lives: collected, it would close the transport.
        self._writer = writer
        self._transport = writer.transport
        self._host = host
        self._loop = asyncio.get_running_loop()
        self._push = getattr(hiredis, "PushNotification", None)
        self._reader = hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse,
            replyError=parse_error,
            notEnoughData=_MORE,
        )
        #: The calls in flight, oldest first: who hears each reply, and when it is due.
        self._waiting: collections.deque[tuple[Deliver, float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        #: What an error reply becomes for its caller (``Functions.answer``).
        self._answer = answer
        self.dead = False

    @property
    def usable(self) -> bool:
        """Can a call still go out on it? (A transport closing: its ``connection_lost`` is
        on its way, and a write now would be dropped.)"""
        return not self.dead and not self._transport.is_closing()

    def send(self, packed: bytes, delivers: Sequence[Deliver], timeout: float) -> None:
        """Write ``packed`` (one call per entry of ``delivers``, in order); each hears its reply
        from ``data_received``, or the error that ends the wire, within about ``timeout``."""
        self._transport.write(packed)
        due = self._loop.time() + timeout
        self._waiting.extend((deliver, due) for deliver in delivers)
        timer = self._timer
        if timer is None or due < timer.when():  # else the armed timer looks first
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._check)

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except redis.exceptions.InvalidResponse as exc:  # the stream is unreadable
                self.abort(redis.exceptions.ConnectionError(f"{exc}"))
                return
            if reply is _MORE:
                return
            if self._push is not None and isinstance(reply, self._push):
                continue  # an out-of-band RESP3 push (never asked for here): not a reply
            if not waiting:  # a reply to no call: the stream cannot be trusted
                self.abort(redis.exceptions.ConnectionError("a reply no call was waiting for"))
                return
            deliver, _ = waiting.popleft()
            if (
                type(reply) is list
                and reply
                and isinstance(reply[0], redis.exceptions.ConnectionError)
            ):
                reply = reply[0]  # as redis-py's hiredis parser raises it
            elif isinstance(reply, redis.exceptions.ResponseError):
                reply = self._answer(reply)
            deliver(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(redis.exceptions.ConnectionError(_CLOSED))

    def _check(self) -> None:
        """A call's reply was due: fail the wire, or look again when the soonest is due.

        A cancelled caller's call counts too: its reply still comes first, so a server
        that owes it past its time owes every later call as long. (Calls are mostly due in
        the order they went; the soonest is looked for only when the timer fires, about
        once per timeout while calls are in flight.)
        """
        self._timer = None
        if not self._waiting:
            return
        soonest = min(due for _, due in self._waiting)
        if self._loop.time() >= soonest:
            self.abort(redis.exceptions.TimeoutError(f"Timeout reading from {self._host}"))
        else:
            self._timer = self._loop.call_at(soonest, self._check)

    def abort(self, error: Exception) -> None:
        """End the wire: every call in flight hears ``error``; the transport is dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.dead = True
        waiting, self._waiting = self._waiting, collections.deque()
        self._transport.abort()
        for deliver, _ in waiting:
            deliver(error)


def _settle(future: asyncio.Future[Any]) -> Deliver:
    """A ``Deliver`` resolving ``future`` (left alone once its awaiting caller is cancelled)."""

    def deliver(reply: Any) -> None:
        if future.done():
            return
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    return deliver


class ScriptPipe:
    """The batcher's script calls to one shard, pipelined on one connection (module docstring).

    Awaited like ``AsyncPackedScripts``: ``await pipe(call)`` answers what
    ``await client.evalsha(*call.wire)`` would. A call ``packed_bytes``
    leaves to redis-py goes through ``evalsha``.
    """

    def __init__(
        self, client: Any, parse_error: Any, functions: bool = True, where: str = "redis"
    ) -> None:
        self._client = client
        self.functions = Functions(functions, where)
        pool = client.connection_pool
        self._make = pool.connection_class
        self._kwargs = dict(pool.connection_kwargs)
        self._timeout = float(self._kwargs["socket_timeout"])  # ``of`` requires one
        self._parse_error = parse_error
        self._wire: _Wire | None = None
        self._opening: asyncio.Future[_Wire] | None = None
        self._closed = False

    @classmethod
    def of(cls, client: Any, functions: bool = True, where: str = "redis") -> ScriptPipe | None:
        """A pipe for ``client``, or None: only a plain URL client (``backends.plain_pool``,
        as for ``AsyncPackedScripts``) on one of redis.asyncio's connection classes, with a
        socket timeout, replies as bytes, and hiredis and redis-py's error parser at hand."""
        from redis.asyncio import Redis

        pool = plain_pool(client, Redis, async_no_retry())
        if pool is None:
            return None
        kwargs = pool.connection_kwargs
        if pool.connection_class not in _connection_classes():
            return None
        if kwargs.get("decode_responses") or not kwargs.get("socket_timeout"):
            return None
        try:
            import hiredis  # noqa: F401
        except ImportError:
            return None
        parse_error = _error_parser()
        return None if parse_error is None else cls(client, parse_error, functions, where)

    def pack(self, call: ScriptCall) -> bytes | None:
        """``call`` as this pipe sends it (``FCALL`` or ``EVALSHA``), or None: leave it to
        redis-py (``backends.packed_bytes``)."""
        return packed_bytes(call, self.functions)

    async def __call__(self, call: ScriptCall) -> Any:
        """Send ``call`` and await its reply (see the module docstring for failures)."""
        packed = packed_bytes(call, self.functions)
        if packed is None:
            return await self._client.evalsha(*call.wire)
        wire = self._wire
        if wire is None or not wire.usable:
            wire = await self._open()
            if not wire.usable:  # lost as soon as opened
                raise redis.exceptions.ConnectionError(_CLOSED)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write(wire, packed, (_settle(future),), self._timeout)
        return await future

    async def call_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Several calls in one write, replies in order, as ``backends.pipelined`` answers
        them: an error reply in place of its call's reply; a lost connection or a late
        reply raised, as redis-py's pipeline raises them."""
        packs = [packed_bytes(call, self.functions) for call in calls]
        sendable = [pack for pack in packs if pack is not None]
        if len(sendable) < len(packs):
            return list(await pipelined(self._client, [call.wire for call in calls]))
        wire = self._wire
        if wire is None or not wire.usable:
            wire = await self._open()
            if not wire.usable:
                raise redis.exceptions.ConnectionError(_CLOSED)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in calls]
        self._write(wire, b"".join(sendable), [_settle(f) for f in futures], self._timeout)
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                raise reply
        return list(replies)

    def send_now(self, packed: bytes, delivers: Sequence[Deliver], timeout: float) -> bool:
        """Write ``packed`` now if a connection is open (False: none is, nothing was sent).

        The batcher's way: no task, no future; each of ``delivers`` is called
        from the wire's callback with its reply or error (see ``_Wire.send``).
        """
        wire = self._wire
        if wire is None or not wire.usable:
            return False
        self._write(wire, packed, delivers, timeout)
        return True

    def _write(
        self, wire: _Wire, packed: bytes, delivers: Sequence[Deliver], timeout: float
    ) -> None:
        """``wire.send``, behind ``FUNCTION LOAD`` when the library must be loaded first."""
        functions = self.functions
        load = functions.take_load() if functions.due else None
        if load is None:
            wire.send(packed, delivers, timeout)
        else:
            wire.send(load + packed, (functions.loaded, *delivers), timeout)

    async def _open(self) -> _Wire:
        """The live wire, opening one if none is: concurrent first calls share the opening,
        and a caller cancelled meanwhile does not cancel it for the others."""
        if self._closed:
            raise redis.exceptions.ConnectionError("the client is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, opening: asyncio.Future[_Wire]) -> None:
        self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._wire = opening.result()

    async def _connect(self) -> _Wire:
        """A connection made and greeted by redis-py, its transport then handed to a wire."""
        conn = self._make(**self._kwargs)
        await conn.connect()  # bounded by the connect and socket timeouts; redis-py's errors
        writer = getattr(conn, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is None or transport.is_closing():
            await conn.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError(_CLOSED)
        host_error = getattr(conn, "_host_error", None)
        host = host_error() if callable(host_error) else str(self._kwargs.get("host"))
        wire = _Wire(writer, host, self._parse_error, self.functions.answer)
        # From here the connection is the wire's alone: the stream reader redis-py read the
        # handshake with hears nothing more, and redis-py's connection object lets go of the
        # socket (collected, it would close it and warn; its disconnect would wait for that
        # reader to see the close). The wire keeps the writer and closes the transport.
        transport.set_protocol(wire)
        conn._writer = conn._reader = None
        if self._closed:
            wire.abort(redis.exceptions.ConnectionError("the client is closed"))
        return wire

    async def close(self) -> None:
        """Drop the connection; calls still in flight fail with ``ConnectionError``."""
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._wire is not None:
            self._wire.abort(redis.exceptions.ConnectionError("the client is closed"))
            self._wire = None
