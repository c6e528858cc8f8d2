"""When the async client sends queued script calls to a shard: the batching policy, pure.

Concurrent tasks deciding on groups of one shard each need one script call.
Sent one by one they pay one round trip each and saturate the connection
pool; pipelined together they share one. The policy is Nagle-like without a
timer: a call goes out at once while fewer than ``max_in_flight`` pipelines
to its shard are outstanding, so a lone caller never waits for company; the
calls that arrive meanwhile queue and leave together, up to ``max_batch`` at
a time, as soon as a pipeline comes back. Batching therefore adds no latency
at low load and grows batches with load. A pipeline about to leave (its task
not begun yet) takes the calls that arrive meanwhile, up to its ``fill``.
"""

from __future__ import annotations

import attrs

__all__ = ["BatchPolicy"]


@attrs.frozen
class BatchPolicy:
    """How many queued calls to pipeline now, given how many pipelines are in flight."""

    max_batch: int = 64
    max_in_flight: int = 2

    def fill(self) -> int:
        """Calls a round trip not yet begun takes from callers arriving meanwhile.

        Its share of the batch size over the slots: the callers one reply
        wakes spread over the pipelines instead of all leaving in one, so the
        client prepares one batch while Redis runs another.
        """
        return max(1, self.max_batch // self.max_in_flight)

    def take(self, queued: int, in_flight: int) -> int:
        """Calls to send as one pipeline now (0: wait for a pipeline in flight to return)."""
        if queued <= 0 or in_flight >= self.max_in_flight:
            return 0
        return min(queued, self.max_batch)
