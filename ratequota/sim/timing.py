"""How time passes in a simulation run: the wall clock, or driven time that makes it repeatable.

A run on the wall clock (the default) is what a user watches: its shares
depend on how much CPU the process gets and how long a round trip takes. A
run in **driven time** (``simulate --driven``) is the same story told
deterministically: the pods' threads take turns, one at a time, in the order
of a virtual clock; a thread that pauses (a retry pause, a batch held, a slot
idle) gives the turn to the thread due next, and every script call takes a
fixed virtual round trip whatever the machine does meanwhile. Redis time is
pinned to the virtual clock (``Clock.redis_ms``), so leases and waiting
registrations expire on it too. Two runs with the same seed make the same
calls in the same order; a loaded machine makes a driven run slower, never
different.

Both timebases give the simulated pods a clock (``PodClock``) that notes
when a waiting acquire pauses between tries (``ratequota.sim.measure`` needs
those moments) and count each script call and its round trip
(``CountingBackend``).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["CountingBackend", "DrivenTime", "Pacing", "PodClock", "WallTime"]

T = TypeVar("T")

#: Redis time (ms) at the start of a driven run; any fixed value does.
_DRIVEN_EPOCH_MS = 1_800_000_000_000


class Pacing:
    """A running estimate of the script round trip, shared by every simulated pod.

    A waiting client that retries faster than the server answers only
    lengthens the queue in front of it: on a saturated backend each retry
    pause is stretched to at least ``factor`` round trips, as a client
    backing off from a slow server would. On a real Redis, where a round trip
    is well under a millisecond, this changes nothing.
    """

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor
        self.round_trip = 0.0  # exponentially weighted; updates race benignly under the GIL

    def observe(self, seconds: float) -> None:
        """Fold one call's duration into the estimate."""
        self.round_trip += 0.05 * (seconds - self.round_trip)

    def pause(self, seconds: float) -> float:
        """The pause to take instead of ``seconds``."""
        return max(seconds, self.factor * self.round_trip)


class WallTime:
    """The wall clock: threads run concurrently, pauses are real sleeps cut short by ``stop``."""

    driven = False

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.started = time.monotonic()
        self.pacing: Pacing | None = Pacing()

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def wait(self, seconds: float) -> None:
        """Pause the calling thread (returns early once the run is stopped)."""
        self.stop.wait(max(0.0, seconds))

    def enroll(self) -> int:
        """Nothing to enroll on the wall clock."""
        return 0

    def begin(self, token: int) -> None:
        """Nothing to wait for on the wall clock."""

    def leave(self) -> None:
        """Nothing to hand over on the wall clock."""

    def call(self, function: Callable[[], T]) -> T:
        """Make one round trip; it takes what it takes."""
        return function()


class DrivenTime:
    """Virtual time: enrolled threads run one at a time, in the order their pauses end.

    Each enrolled thread calls ``begin`` first and ``leave`` last; between
    the two, ``wait`` is its only way to let time pass, and hands the turn to
    the thread due next (ties go to whoever paused first, so the order is
    fixed). ``call`` spends ``latency`` of virtual time around a round trip,
    half before and half after. A thread that never enrolled (a client's
    background catalog refresh) takes no turn: time does not pass for it.
    """

    driven = True

    def __init__(self, stop: threading.Event, latency: float = 0.001) -> None:
        self.stop = stop
        self.latency = latency
        self.pacing: Pacing | None = None
        self._now = 0.0
        self._lock = threading.Lock()  # guards the queue and the turn; never held while waiting
        self._queue: list[tuple[float, int, int]] = []
        self._order = 0
        self._turns: list[threading.Event] = []
        self._running: int | None = None
        self._local = threading.local()

    def now(self) -> float:
        """Virtual seconds since the run started."""
        return self._now

    def enroll(self) -> int:
        """A turn for one more thread, due at the current time; returns its token."""
        with self._lock:
            token = len(self._turns)
            self._turns.append(threading.Event())
            self._push(self._now, token)
            return token

    def begin(self, token: int) -> None:
        """Start taking turns as ``token`` (in the thread that enrolled as it)."""
        self._local.token = token
        with self._lock:
            if self._running is None:
                self._dispatch()
        self._await(token)

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass for the calling thread."""
        token = getattr(self._local, "token", None)
        if token is None:
            return
        with self._lock:
            self._push(self._now + max(0.0, seconds), token)
            self._dispatch()
        self._await(token)

    def leave(self) -> None:
        """Stop taking turns; the next thread due runs."""
        token = getattr(self._local, "token", None)
        self._local.token = None
        with self._lock:
            if token is not None and self._running == token:
                self._dispatch()

    def call(self, function: Callable[[], T]) -> T:
        """One round trip: half the latency there, the call, half back."""
        self.wait(self.latency / 2)
        try:
            return function()
        finally:
            self.wait(self.latency / 2)

    def _push(self, at: float, token: int) -> None:
        heapq.heappush(self._queue, (at, self._order, token))
        self._order += 1

    def _dispatch(self) -> None:
        """Give the turn to the thread due first (called with the lock held)."""
        if not self._queue:
            self._running = None
            return
        at, _, token = heapq.heappop(self._queue)
        self._now = max(self._now, at)
        self._running = token
        self._turns[token].set()

    def _await(self, token: int) -> None:
        turn = self._turns[token]
        turn.wait()
        turn.clear()


class PodClock:
    """The simulated pods' clock: the run's time, noting when a watched thread pauses.

    The client pauses only after a refused try, and a refused waiting try
    registers (or refreshes) the request as pending demand in Redis: these
    moments tell the measure what demand Redis saw (``ratequota.sim.measure``).
    On the wall clock Redis time is Redis's own; in driven time it is pinned
    to the virtual clock.
    """

    def __init__(self, timebase: WallTime | DrivenTime) -> None:
        self._timebase = timebase
        self._local = threading.local()

    def watch(self, into: list[float] | None) -> None:
        """Append the run time of every pause of the calling thread to ``into`` (None: stop)."""
        self._local.into = into

    def monotonic(self) -> float:
        """The run's clock (the wall clock's monotonic time, or virtual time)."""
        return self._timebase.now() if self._timebase.driven else time.monotonic()

    def redis_ms(self) -> int | None:
        """None on the wall clock (scripts read Redis TIME); the virtual time when driven."""
        if self._timebase.driven:
            return _DRIVEN_EPOCH_MS + round(self._timebase.now() * 1000)
        return None

    def sleep(self, seconds: float) -> None:
        """Note the pause, then take it (at least a few round trips on the wall clock)."""
        into = getattr(self._local, "into", None)
        if into is not None:
            into.append(self._timebase.now())
        pacing = self._timebase.pacing
        if self._timebase.driven:
            self._timebase.wait(seconds)
        else:
            time.sleep(seconds if pacing is None else pacing.pause(seconds))

    async def asleep(self, seconds: float) -> None:  # pragma: no cover - the pods are sync
        """Not used: the simulated pods are blocking clients."""
        raise NotImplementedError


class CountingBackend:
    """Wraps a backend so every script call (EVALSHA) is counted and timed by the run's time.

    Everything else passes through.
    """

    def __init__(self, inner: Any, timebase: WallTime | DrivenTime) -> None:
        self._inner = inner
        self.timebase = timebase
        self.description = getattr(inner, "description", "redis")
        self.calls = 0  # += under the GIL from many threads; an estimate is all we need
        self.seconds = 0.0  # time spent in those calls, round trip included

    def connection(self, route: str) -> Any:
        """The inner connection, wrapped to count ``evalsha``."""
        return _CountingConnection(self._inner.connection(route), self)

    def connections(self) -> Sequence[Any]:
        """The inner backend's connections."""
        return self._inner.connections()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the inner backend."""
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingConnection:
    def __init__(self, conn: Any, owner: CountingBackend) -> None:
        self._conn = conn
        self._owner = owner

    def evalsha(self, *args: Any) -> Any:
        owner = self._owner
        owner.calls += 1
        timebase = owner.timebase
        began = timebase.now()
        try:
            return timebase.call(lambda: self._conn.evalsha(*args))
        finally:
            spent = timebase.now() - began
            owner.seconds += spent
            if timebase.pacing is not None:
                timebase.pacing.observe(spent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
