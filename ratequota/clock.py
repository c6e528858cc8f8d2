"""Time sources: the pod's monotonic clock for deadlines, Redis time for leases.

Lease expiry is always decided on Redis time inside the scripts, never on a
pod's clock. A clock may *pin* that Redis time (``redis_ms``) so tests and
simulations can expire leases without waiting; production clocks return
``None`` and the scripts call Redis ``TIME``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the clients need of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences matter."""

    def redis_ms(self) -> int | None:
        """Pinned Redis time in ms, or None to let the scripts read Redis TIME."""

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""


class SystemClock:
    """The real clocks: ``time.monotonic`` and Redis TIME."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def redis_ms(self) -> int | None:
        """None: scripts read Redis TIME."""
        return None

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)
