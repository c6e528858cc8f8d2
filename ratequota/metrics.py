"""Prometheus metrics for a ratequota client: ``PrometheusMetrics`` (the ``metrics`` extra).

::

    pip install 'ratequota[metrics]'

    metrics = ratequota.metrics.PrometheusMetrics()       # the default registry
    quota = ratequota.QuotaClient.from_url(url, observer=metrics)

Every name below is part of the API: documented in docs/metrics.md, queried
by docs/grafana-dashboard.json, and pinned by the tests. They follow the
Prometheus conventions (``_total`` counters, base units in the name) and take
their vocabulary from Kubernetes API Priority and Fairness (``current`` fair
limit vs. ``nominal`` guarantee), envoy's ratelimit (shadow-mode counts) and
ASP.NET Core's rate-limiting meters (leases held, wait time).

Cardinality: labels are groups, shards, and fixed small sets of results and
reasons. Tenants appear only with ``tenant_labels=True``: the per-tenant
gauges (fair limit, guarantee, borrowed) exist only then, and the decision
counter and the held gauges gain a ``tenant`` label.

Gauges fed by decisions (group used, fair limit, borrowed) are *this
client's view as of its last decision* for that group or tenant: each pod
reports what it last saw; take ``max`` across pods.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from ratequota.decision import LeaseInfo
from ratequota.errors import ConfigError
from ratequota.observe import (
    BreakerStateName,
    DecisionEvent,
    LostCause,
    Observer,
    RenewalResultName,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "CALL_BUCKETS",
    "FAMILIES",
    "METRIC_NAMES",
    "TENANT_ONLY",
    "WAIT_BUCKETS",
    "Family",
    "PrometheusMetrics",
]

#: Seconds an ``acquire`` waited: from an immediate answer to a long queue.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds of one Redis round trip (a script run is well under a millisecond in Redis).
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_BREAKER_STATES: tuple[BreakerStateName, ...] = ("closed", "half_open", "open")

#: Where the optional ``tenant`` label goes: appended with ``tenant_labels=True``.
_TENANT = "+tenant"


@attrs.frozen
class Family:
    """One metric family: the attribute holding it, its type, name, help and labels.

    ``labels`` ending in ``+tenant`` gain a ``tenant`` label with
    ``tenant_labels=True``; a ``tenant_only`` family exists only then.
    """

    attribute: str
    kind: str  # "counter", "gauge" or "histogram"
    name: str  # as registered (a counter with its ``_total`` suffix)
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    tenant_only: bool = False

    @property
    def family(self) -> str:
        """The name as Prometheus reports the family (a counter without ``_total``)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


#: Every metric family ``PrometheusMetrics`` exports, in the order it registers them.
FAMILIES = (
    Family(
        "decisions",
        "counter",
        "ratequota_decisions_total",
        "Final outcomes of try_acquire and acquire, by result and reason.",
        ("group", "result", "reason", _TENANT),
    ),
    Family(
        "wait",
        "histogram",
        "ratequota_acquire_wait_seconds",
        "Seconds acquire waited, from its call to its outcome.",
        ("group", "result"),
        WAIT_BUCKETS,
    ),
    Family(
        "call_duration",
        "histogram",
        "ratequota_redis_call_duration_seconds",
        "Seconds of one Redis round trip, by shard and script or command.",
        ("shard", "call"),
        CALL_BUCKETS,
    ),
    Family(
        "call_errors",
        "counter",
        "ratequota_redis_call_errors_total",
        "Redis round trips that raised (timeout, refused connection, error reply).",
        ("shard", "call"),
    ),
    Family(
        "leases_held",
        "gauge",
        "ratequota_leases_held",
        "Leases held now by acquire and limit on this client.",
        ("group", _TENANT),
    ),
    Family(
        "units_held",
        "gauge",
        "ratequota_units_held",
        "Units of the leases held now by acquire and limit on this client.",
        ("group", _TENANT),
    ),
    Family(
        "group_used",
        "gauge",
        "ratequota_group_used_units",
        "Units the whole group held, as of this client's last decision for it.",
        ("group",),
    ),
    Family(
        "group_capacity",
        "gauge",
        "ratequota_group_capacity_units",
        "The group's capacity, as of this client's last decision for it.",
        ("group",),
    ),
    Family(
        "breaker_state",
        "gauge",
        "ratequota_circuit_breaker_state",
        "1 for the current state of each shard's circuit breaker, 0 for the others.",
        ("shard", "state"),
    ),
    Family(
        "leases_lost",
        "counter",
        "ratequota_leases_lost_total",
        "Held leases found gone: expired, fenced, or not renewed within their lifetime.",
        ("group", "cause"),
    ),
    Family(
        "renewals",
        "counter",
        "ratequota_renewals_total",
        "Background lease renewals, by result.",
        ("group", "result"),
    ),
    Family(
        "current_limit",
        "gauge",
        "ratequota_tenant_current_limit_units",
        "The tenant's fair limit, as of this client's last decision for it.",
        ("group", "tenant"),
        tenant_only=True,
    ),
    Family(
        "nominal_limit",
        "gauge",
        "ratequota_tenant_nominal_limit_units",
        "The tenant's guarantee by the policy (what it always gets when it asks).",
        ("group", "tenant"),
        tenant_only=True,
    ),
    Family(
        "borrowed",
        "gauge",
        "ratequota_tenant_borrowed_units",
        "Units the tenant held above its guarantee, as of its last decision.",
        ("group", "tenant"),
        tenant_only=True,
    ),
)

#: Every metric family ``PrometheusMetrics`` exports, as Prometheus names it
#: (counters without their ``_total`` suffix, as in the exposition's TYPE line).
#: The per-tenant families exist only with ``tenant_labels=True``.
METRIC_NAMES = {f.family: f.kind for f in FAMILIES}
TENANT_ONLY = tuple(f.family for f in FAMILIES if f.tenant_only)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics",
            "PrometheusMetrics needs the prometheus_client package: "
            "pip install 'ratequota[metrics]'",
        ) from None
    return prometheus_client


class PrometheusMetrics(Observer):
    """An ``Observer`` exporting a client's events as Prometheus metrics.

    ``registry``: where the metrics are registered (default: prometheus_client's
    global ``REGISTRY``, which ``start_http_server`` and ``make_asgi_app``
    serve). One instance per registry: pass the same instance to every client
    of the process. ``tenant_labels``: add per-tenant series (see the module
    docstring); off by default because tenants are unbounded in number.
    """

    # One attribute per family of ``FAMILIES`` (prometheus_client objects, untyped).
    decisions: Any
    wait: Any
    call_duration: Any
    call_errors: Any
    leases_held: Any
    units_held: Any
    group_used: Any
    group_capacity: Any
    breaker_state: Any
    leases_lost: Any
    renewals: Any
    current_limit: Any
    nominal_limit: Any
    borrowed: Any

    def __init__(
        self, registry: CollectorRegistry | None = None, *, tenant_labels: bool = False
    ) -> None:
        prom = _prometheus()
        if not isinstance(tenant_labels, bool):
            raise ConfigError("tenant_labels", f"must be True or False, got {tenant_labels!r}")
        self.registry = prom.REGISTRY if registry is None else registry
        if not isinstance(self.registry, prom.CollectorRegistry):
            raise ConfigError(
                "registry", f"must be a prometheus_client CollectorRegistry, got {registry!r}"
            )
        self.tenant_labels = tenant_labels
        self.current_limit = self.nominal_limit = self.borrowed = None
        try:
            for family in FAMILIES:
                if family.tenant_only and not tenant_labels:
                    continue
                setattr(self, family.attribute, self._register(prom, family))
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ConfigError(
                "registry",
                "already holds ratequota metrics: share one PrometheusMetrics between clients, "
                f"or give each its own registry ({exc})",
            ) from None

    def _register(self, prom: Any, family: Family) -> Any:
        """Register ``family`` in this instance's registry."""
        labels = [n for n in family.labels if n != _TENANT]
        if _TENANT in family.labels and self.tenant_labels:
            labels.append("tenant")
        kind = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}
        extra = {} if family.buckets is None else {"buckets": family.buckets}
        return kind[family.kind](
            family.name, family.help, tuple(labels), registry=self.registry, **extra
        )

    def _who(self, group: str, tenant: str) -> tuple[str, ...]:
        return (group, tenant) if self.tenant_labels else (group,)

    # -- Observer --------------------------------------------------------------

    def decision(self, event: DecisionEvent) -> None:
        """Count the outcome; update the wait histogram and the gauges it carries."""
        e = event
        labels = (e.group, e.result, e.reason)
        self.decisions.labels(*labels, *((e.tenant,) if self.tenant_labels else ())).inc()
        if e.waited is not None:
            self.wait.labels(e.group, e.result).observe(e.waited)
        if e.group_used is not None and e.capacity > 0:
            self.group_used.labels(e.group).set(e.group_used)
            self.group_capacity.labels(e.group).set(e.capacity)
        if not self.tenant_labels:
            return
        if not math.isnan(e.limit) and e.capacity > 0:
            self.current_limit.labels(e.group, e.tenant).set(e.limit)
        if e.guarantee is not None:
            self.nominal_limit.labels(e.group, e.tenant).set(e.guarantee)
            if e.used is not None:
                self.borrowed.labels(e.group, e.tenant).set(max(0, e.used - e.guarantee))

    def redis_call(self, shard: str, call: str, seconds: float, ok: bool) -> None:
        """Time one round trip; count it as an error if it raised."""
        self.call_duration.labels(shard, call).observe(seconds)
        if not ok:
            self.call_errors.labels(shard, call).inc()

    def lease_held(self, lease: LeaseInfo) -> None:
        """One more lease (and its units) held."""
        who = self._who(lease.group, lease.tenant)
        self.leases_held.labels(*who).inc()
        self.units_held.labels(*who).inc(lease.units)

    def lease_ended(self, lease: LeaseInfo) -> None:
        """One lease (and its units) no longer held."""
        who = self._who(lease.group, lease.tenant)
        self.leases_held.labels(*who).dec()
        self.units_held.labels(*who).dec(lease.units)

    def lease_lost(self, lease: LeaseInfo, cause: LostCause) -> None:
        """Count a lost lease."""
        self.leases_lost.labels(lease.group, cause).inc()

    def renewal(self, lease: LeaseInfo, result: RenewalResultName) -> None:
        """Count a background renewal."""
        self.renewals.labels(lease.group, result).inc()

    def breaker(self, shard: str, state: BreakerStateName) -> None:
        """Mark ``state`` as the shard's current breaker state."""
        for name in _BREAKER_STATES:
            self.breaker_state.labels(shard, name).set(1 if name == state else 0)
