"""Helpers for testing code that uses ratequota: a private fake backend and a hand-driven clock.

``fake_client()`` gives a ``QuotaClient`` on its own in-process fakeredis, so
tests never share state; ``ManualClock`` pins the Redis time the scripts see
and makes the client's sleeps advance it, so expiry and waiting can be tested
without waiting.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ratequota.clients.backends import embedded_backend
from ratequota.clients.sync import QuotaClient
from ratequota.policy import Policy

__all__ = ["ManualClock", "fake_client"]


class ManualClock:
    """A clock that only moves when told to (or when the client sleeps).

    Redis time seen by the scripts is ``start_ms`` plus the time advanced, so
    leases expire exactly when a test says so.
    """

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self._start_ms = start_ms
        self._elapsed = 0.0
        self._lock = threading.Lock()  # guards a float; never held across I/O

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._elapsed += seconds

    def monotonic(self) -> float:
        """Seconds advanced so far."""
        with self._lock:
            return self._elapsed

    def redis_ms(self) -> int:
        """The pinned Redis time in ms."""
        with self._lock:
            return self._start_ms + round(self._elapsed * 1000)

    def sleep(self, seconds: float) -> None:
        """Advance instead of sleeping."""
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        """Advance instead of sleeping, yielding to other tasks once."""
        self.advance(seconds)
        await asyncio.sleep(0)


def fake_client(
    policy: Policy | None = None, *, clock: ManualClock | None = None, **settings: Any
) -> QuotaClient:
    """A ``QuotaClient`` on a private fakeredis, with ``policy`` already published."""
    client = QuotaClient(backend=embedded_backend(shared=False), clock=clock, **settings)
    if policy is not None:
        client.apply_policy(policy)
    return client
