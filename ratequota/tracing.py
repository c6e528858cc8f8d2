"""OpenTelemetry spans for ratequota decisions: ``DecisionSpans`` (no-op without opentelemetry).

::

    from ratequota.observe import Observers
    from ratequota.metrics import PrometheusMetrics
    from ratequota.tracing import DecisionSpans

    quota = QuotaClient.from_url(url, observer=Observers(PrometheusMetrics(), DecisionSpans()))

Each ``try_acquire`` / ``acquire`` outcome becomes one span,
``ratequota.try_acquire`` or ``ratequota.acquire``, in the caller's current
trace (it is emitted on the caller's thread or task), lasting as long as the
acquire waited, with the outcome as attributes (``ratequota.group``,
``ratequota.tenant``, ``ratequota.units``, ``ratequota.result``,
``ratequota.reason``, and the numbers when known). A refusal is an answer,
not an error; only ``failed`` (Redis unreachable) sets the span's status to
error. Tenant names are attributes of a trace, not metric labels: they cost
no cardinality.

Only ``opentelemetry-api`` is needed (the application brings its SDK and
exporter). When it is not importable, ``DecisionSpans`` does nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ratequota.observe import DecisionEvent, Observer

__all__ = ["DecisionSpans"]


def _tracer(provider: Any) -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("ratequota", tracer_provider=provider)


class DecisionSpans(Observer):
    """An ``Observer`` emitting one OpenTelemetry span per decision.

    ``tracer_provider``: where spans go (default: OpenTelemetry's global one).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        self._tracer = _tracer(tracer_provider)

    @property
    def enabled(self) -> bool:
        """False when opentelemetry-api is not installed: every event is ignored."""
        return self._tracer is not None

    def decision(self, event: DecisionEvent) -> None:
        """Record the decision as a span ending now, started when the acquire was called."""
        if self._tracer is None:
            return
        e = event
        end = time.time_ns()
        start = end - round((e.waited or 0.0) * 1e9)
        attributes: dict[str, str | int | float] = {
            "ratequota.group": e.group,
            "ratequota.tenant": e.tenant,
            "ratequota.units": e.units,
            "ratequota.result": e.result,
            "ratequota.reason": e.reason,
        }
        if e.used is not None:
            attributes["ratequota.used"] = e.used
        if e.group_used is not None:
            attributes["ratequota.group_used"] = e.group_used
        if not math.isnan(e.limit):
            attributes["ratequota.limit"] = e.limit
        if e.capacity:
            attributes["ratequota.capacity"] = e.capacity
        name = "ratequota.try_acquire" if e.waited is None else "ratequota.acquire"
        span = self._tracer.start_span(name, start_time=start, attributes=attributes)
        if e.result == "failed":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, "quota backend unavailable"))
        span.end(end_time=end)
