"""When the async client sends queued script calls to a shard: the batching policy, pure.

Concurrent tasks deciding on groups of one shard each need one script call.
Sent one by one they pay one round trip each and saturate the connection
pool; pipelined together they share one. The policy is Nagle-like without a
timer: a call goes out at once while fewer than ``max_in_flight`` pipelines
to its shard are outstanding, so a lone caller never waits for company; the
calls that arrive meanwhile queue and leave together, up to ``max_batch`` at
a time, as soon as a pipeline comes back. Batching therefore adds no latency
at low load and grows batches with load.
"""

from __future__ import annotations

import attrs

__all__ = ["BatchPolicy", "round_trip_bound"]


@attrs.frozen
class BatchPolicy:
    """How many queued calls to pipeline now, given how many pipelines are in flight."""

    max_batch: int = 64
    max_in_flight: int = 2

    def take(self, queued: int, in_flight: int) -> int:
        """Calls to send as one pipeline now (0: wait for a pipeline in flight to return)."""
        if queued <= 0 or in_flight >= self.max_in_flight:
            return 0
        return min(queued, self.max_batch)


def round_trip_bound(oldest_submitted: float, now: float, socket_timeout: float) -> float:
    """Seconds a round trip may still take so that no call in it exceeds one ``socket_timeout``.

    A call's timeout counts from when its caller submitted it, not from when
    its pipeline left: time queued behind round trips in flight (which, when
    the server is paused, each take a full socket timeout) is part of it. The
    oldest call of a batch sets the bound; 0 means it is already used up and
    the call fails as a timeout without being sent.
    """
    return max(0.0, oldest_submitted + socket_timeout - now)
