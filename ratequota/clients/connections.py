"""The sync packed path's own connections to one server, beside redis-py's pool.

A sync decision is one round trip, and redis-py's ``BlockingConnectionPool``
costs 10-16 µs of it to check a connection out and back in (its queue's
condition variable, two process checks, a health poll, its metrics hooks):
on this machine about a twentieth of a ``try_acquire``'s wall time, for work
that a stack of idle connections does in a list ``pop`` and ``append``.

``ConnectionStack`` keeps what ratequota needs of the pool and no more:

* at most ``limit`` connections (the pool's ``max_connections``); a caller
  that finds all of them in use waits for one, at most ``timeout`` seconds
  (the pool's), then fails as the pool fails (``ConnectionError``,
  "No connection available.");
* a connection taken from the stack is polled first, as the pool polls it:
  one the server closed (a restart), or with bytes nobody asked for, is
  dropped and opened again, so an idle connection never fails a decision;
* after a fork the child starts with no connection: the parent's sockets
  are never used by two processes;
* ``close`` disconnects every idle connection, and one in use when it comes
  back.

Connections are made as the pool makes them (its ``connection_class`` with its
``connection_kwargs``), so TLS, unix sockets, credentials and timeouts are the
pool's. No lock is held across a network call: the lock guards only the count
and the wait for a free connection.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis

__all__ = ["ConnectionStack"]


class ConnectionStack:
    """Idle connections to one server, last in first out, at most ``limit`` in all."""

    def __init__(self, pool: Any, limit: int, timeout: float | None) -> None:
        self._make: Any = lambda: pool.connection_class(**pool.connection_kwargs)
        self.limit = max(1, int(limit))
        self.timeout = timeout
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._idle: list[Any] = []
        self._mine: set[Any] = set()  # made by this process's stack, not yet dropped
        self._count = 0  # connections made (or being made) and not dropped: idle + in use
        self._waiters = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    @property
    def in_use(self) -> int:
        """Connections taken and not yet given back."""
        return self._count - len(self._idle)

    def take(self) -> Any:
        """A connection ready for a command: an idle one polled first, else a new one (made
        when fewer than ``limit`` exist), else the first given back within ``timeout``."""
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's connections are not ours
        try:
            conn = self._idle.pop()  # atomic under the GIL: no lock on the common path
        except IndexError:
            conn = self._wait()
            if conn is None:
                return self._made()
        # The pool's health check: bytes waiting on an idle connection are either the
        # server's close (a restart) or a reply nobody waits for; either way, reconnect. A
        # connection that cannot connect goes back and the error is raised, as the pool does.
        try:
            conn.connect()  # nothing to do when connected
            try:
                stale = conn.can_read()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                stale = True  # the server closed it
            if stale:
                conn.disconnect()
                conn.connect()
        except BaseException:
            self.give(conn)
            raise
        return conn

    def _wait(self) -> Any:
        """An idle connection that turned up, or None once this caller may make one."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._cond:
            # Counted before the first look at the idle list: a connection given back after
            # that look is then always followed by a notify (``give``), never lost.
            self._waiters += 1
            try:
                while True:
                    if self._idle:
                        return self._idle.pop()
                    if self._count < self.limit:
                        self._count += 1
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise redis.exceptions.ConnectionError("No connection available.")
                    self._cond.wait(remaining)
            finally:
                self._waiters -= 1

    def _made(self) -> Any:
        """A new connection, its slot counted by ``_wait`` (and freed if making it fails)."""
        try:
            conn = self._make()
        except BaseException:
            self._drop_slot()
            raise
        self._mine.add(conn)
        return conn

    def give(self, conn: Any) -> None:
        """Give back a connection ``take`` handed out."""
        if self._pid != os.getpid() or conn not in self._mine:
            return  # taken before a fork: the child's stack never counted it
        if self._closed:
            self._mine.discard(conn)
            conn.disconnect()
            self._drop_slot()
            return
        self._idle.append(conn)
        if self._closed:  # closed while this append was on its way: drain again
            self.close()
            return
        # A waiter is counted (under the lock) before it looks at the idle list: one that
        # looked before this append is counted by now, and is woken.
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def _drop_slot(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        """Disconnect the idle connections; those in use are disconnected when given back."""
        idle = []
        with self._cond:
            self._closed = True
            # Popped one by one, as ``take`` pops without the lock: each idle connection goes
            # either to a caller still using the client or here, and is counted once.
            while True:
                try:
                    idle.append(self._idle.pop())
                except IndexError:
                    break
            self._count -= len(idle)
            self._mine.difference_update(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.disconnect()
