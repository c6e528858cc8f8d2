"""Metrics (docs/metrics.md): every series ``PrometheusMetrics`` exports, on both clients.

Each behavioural test runs through ``make_quota`` (sync and async client,
fakeredis and a real Redis) with a ``ManualClock``: waits advance it, and a
clock that ticks on every read gives Redis calls a known, non-zero duration.
Values are read back from a private ``CollectorRegistry``.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ratequota import AsyncQuotaClient, DecisionEvent, Observer, QuotaClient
from ratequota.clients.renewal import RenewalBook
from ratequota.clients.shell import LeaseBase
from ratequota.decision import LeaseInfo
from ratequota.errors import (
    AcquireTimeout,
    BackendUnavailable,
    ConfigError,
    RequestTooLarge,
    UnknownTenant,
)
from ratequota.metrics import METRIC_NAMES, TENANT_ONLY, PrometheusMetrics
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.bridge import AsyncBridge
from tests.conftest import MakeClient
from tests.servers import free_port

DOCS = Path(__file__).resolve().parents[1] / "docs"

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=10,
            tenants=[
                TenantPolicy("a", guarantee=4, borrow_limit=4),
                TenantPolicy("b", guarantee=4),
            ],
        )
    ]
)


def metrics(tenant_labels: bool = False) -> PrometheusMetrics:
    """Metrics in a registry of their own."""
    return PrometheusMetrics(CollectorRegistry(), tenant_labels=tenant_labels)


def value(m: PrometheusMetrics, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    found = m.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def total(m: PrometheusMetrics, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in m.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def decisions(m: PrometheusMetrics, result: str, reason: str, group: str = "g") -> float:
    """``ratequota_decisions_total`` for one group, result and reason."""
    return value(m, "ratequota_decisions_total", group=group, result=result, reason=reason)


class TickingClock(ManualClock):
    """A ManualClock that moves ``tick`` seconds on every monotonic read."""

    def __init__(self, tick: float) -> None:
        super().__init__()
        self.tick = tick

    def monotonic(self) -> float:
        """Advance by one tick, then read."""
        self.advance(self.tick)
        return super().monotonic()


# -- decisions -------------------------------------------------------------------


def test_try_acquire_outcomes_are_counted_by_result_and_reason(make_quota: MakeClient) -> None:
    """Admitted, tenant_limit, group_full, too_large: one count each, by group, on both clients."""
    m = metrics()
    quota = make_quota(POLICY, clock=ManualClock(), observer=m)
    assert quota.try_acquire("a", 8).admitted  # a borrows up to G + B = 8
    refused = quota.try_acquire("a", 1)
    assert refused.reason == "tenant_limit"
    assert quota.try_acquire("b", 2).admitted
    assert quota.try_acquire("b", 1).reason == "group_full"  # 8 + 2 = 10 held
    assert quota.try_acquire("b", 11).reason == "too_large"
    assert decisions(m, "admitted", "admitted") == 2
    assert decisions(m, "refused", "tenant_limit") == 1
    assert decisions(m, "refused", "group_full") == 1
    assert decisions(m, "refused", "too_large") == 1
    assert total(m, "ratequota_decisions_total") == 5
    # try_acquire never waits: no wait observed.
    assert total(m, "ratequota_acquire_wait_seconds_count") == 0
    # The group's gauges carry the last decision's numbers.
    assert value(m, "ratequota_group_used_units", group="g") == 10
    assert value(m, "ratequota_group_capacity_units", group="g") == 10


def test_acquire_outcomes_and_wait_times(make_quota: MakeClient) -> None:
    """acquire: admitted at once (waited 0), timed out after its timeout, too large at once."""
    m = metrics()
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock, observer=m)
    with quota.acquire("a", 8, timeout=0):
        with pytest.raises(AcquireTimeout), quota.acquire("a", 1, timeout=1.5):
            pass
        with pytest.raises(RequestTooLarge), quota.acquire("a", 9):
            pass
    assert decisions(m, "admitted", "admitted") == 1
    assert decisions(m, "timed_out", "tenant_limit") == 1
    assert decisions(m, "refused", "too_large") == 1
    wait = "ratequota_acquire_wait_seconds"
    assert value(m, f"{wait}_count", group="g", result="admitted") == 1
    assert value(m, f"{wait}_sum", group="g", result="admitted") == 0
    assert value(m, f"{wait}_count", group="g", result="timed_out") == 1
    assert value(m, f"{wait}_sum", group="g", result="timed_out") >= 1.5
    # The 1.5 s wait lands in the (1, 2.5] bucket, not below.
    assert value(m, f"{wait}_bucket", group="g", result="timed_out", le="1.0") == 0
    assert value(m, f"{wait}_bucket", group="g", result="timed_out", le="2.5") == 1


def test_unknown_tenant_is_counted_as_refused(make_quota: MakeClient) -> None:
    """A tenant the policy refuses raises UnknownTenant, and is counted (group unknown: "")."""
    m = metrics()
    quota = make_quota(POLICY, clock=ManualClock(), observer=m)
    with pytest.raises(UnknownTenant):
        quota.try_acquire("stranger", 1)
    with pytest.raises(UnknownTenant), quota.acquire("stranger", 1):
        pass
    assert total(m, "ratequota_decisions_total", result="refused", reason="unknown_tenant") == 2


def test_tenant_gauges_only_with_tenant_labels(make_quota: MakeClient) -> None:
    """current limit, nominal limit (guarantee) and borrowed units per tenant, opt-in."""
    m = metrics(tenant_labels=True)
    quota = make_quota(POLICY, clock=ManualClock(), observer=m)
    first = quota.try_acquire("a", 6)
    assert first.admitted
    assert value(m, "ratequota_tenant_current_limit_units", group="g", tenant="a") == first.limit
    assert value(m, "ratequota_tenant_nominal_limit_units", group="g", tenant="a") == 4
    assert value(m, "ratequota_tenant_borrowed_units", group="g", tenant="a") == 2
    refused = quota.try_acquire("a", 3)  # 6 + 3 > G + B = 8
    assert not refused.admitted
    assert value(m, "ratequota_tenant_current_limit_units", group="g", tenant="a") == refused.limit
    assert quota.try_acquire("b", 1).admitted
    assert value(m, "ratequota_tenant_borrowed_units", group="g", tenant="b") == 0
    labelled = {"group": "g", "result": "admitted", "reason": "admitted"}
    assert value(m, "ratequota_decisions_total", **labelled, tenant="a") == 1
    assert value(m, "ratequota_decisions_total", **labelled, tenant="b") == 1

    plain = metrics(tenant_labels=False)
    other = make_quota(POLICY, clock=ManualClock(), observer=plain)
    assert other.try_acquire("b", 1).admitted
    names = {family.name for family in plain.registry.collect()}
    assert names.isdisjoint(TENANT_ONLY)
    for family in plain.registry.collect():
        for sample in family.samples:
            assert "tenant" not in sample.labels


# -- Redis calls -------------------------------------------------------------------


def test_redis_calls_are_timed_by_shard_and_script(make_quota: MakeClient) -> None:
    """Every round trip is one observation, named by its script or command, timed on the clock."""
    m = metrics()
    clock = TickingClock(0.002)
    quota = make_quota(POLICY, clock=clock, observer=m)
    quota.load_policy()  # reads the catalog's header (GETRANGE), and the body if it changed
    name = "ratequota_redis_call_duration_seconds"
    assert total(m, f"{name}_count", call="getrange") >= 1
    # The first calls may meet NOSCRIPT (scripts load on first use): warm up, then count.
    decision = quota.try_acquire("a", 1)
    assert decision.lease is not None
    quota.release(decision.lease)
    before = {c: total(m, f"{name}_count", call=c) for c in ("acquire", "release")}
    acquire_sum = total(m, f"{name}_sum", call="acquire")
    for _ in range(3):
        decision = quota.try_acquire("a", 1)
        assert decision.lease is not None
        quota.release(decision.lease)
    assert total(m, f"{name}_count", call="acquire") == before["acquire"] + 3
    assert total(m, f"{name}_count", call="release") == before["release"] + 3
    # Each call spans one tick of the clock: read before and after the perform.
    spent = total(m, f"{name}_sum", call="acquire") - acquire_sum
    assert spent == pytest.approx(3 * 0.002)
    shards = {
        s.labels["shard"]
        for f in m.registry.collect()
        for s in f.samples
        if s.name == f"{name}_count"
    }
    assert len(shards) == 1 and "" not in shards
    assert total(m, "ratequota_redis_call_errors_total") == 0


def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


def dead_client(kind: str, **options: Any) -> Any:
    """A sync client, or a bridged async one, on a Redis that is not there."""
    if kind == "async":
        import fakeredis

        return AsyncBridge(lambda: AsyncQuotaClient(dead_url(), **options), fakeredis.FakeRedis())
    return QuotaClient(dead_url(), **options)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_outage_metrics(kind: str) -> None:
    """Failed calls, the breaker's state per shard, failed and fallback decisions."""
    m = metrics()
    closed = dead_client(kind, socket_timeout=0.2, breaker_failures=2, observer=m)
    try:
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                closed.try_acquire("a", 1, group="g")
    finally:
        closed.close()
    assert decisions(m, "failed", "backend_unavailable") == 3
    # Two calls failed on the wire; the third failed fast at the open breaker (no call).
    assert total(m, "ratequota_redis_call_errors_total", call="acquire") == 2
    assert total(m, "ratequota_redis_call_duration_seconds_count", call="acquire") == 2
    assert total(m, "ratequota_circuit_breaker_state", state="open") == 1
    assert total(m, "ratequota_circuit_breaker_state", state="closed") == 0

    opened = metrics()
    quota = dead_client(kind, socket_timeout=0.2, failure_mode="open", observer=opened)
    try:
        decision = quota.try_acquire("a", 2, group="g")
        assert decision.admitted and decision.lease is not None and decision.lease.synthetic
        with quota.acquire("a", 3, group="g"):
            assert value(opened, "ratequota_units_held", group="g") == 3
    finally:
        quota.close()
    assert decisions(opened, "fallback_admitted", "fail_open") == 2

    local = metrics()
    quota = dead_client(
        kind, socket_timeout=0.2, failure_mode="local", local_allowance=2, observer=local
    )
    try:
        assert quota.try_acquire("a", 2, group="g").admitted
        with pytest.raises(BackendUnavailable):
            quota.try_acquire("a", 1, group="g")
    finally:
        quota.close()
    assert decisions(local, "fallback_admitted", "local_allowance") == 1
    assert decisions(local, "failed", "backend_unavailable") == 1


def test_breaker_recovery_is_reported() -> None:
    """open -> half_open (the probe) -> closed when the shard answers again."""
    from ratequota.clients.failure import Breakers

    seen: list[tuple[str, str]] = []

    class Recorder(Observer):
        def breaker(self, shard: str, state: Any) -> None:
            seen.append((shard, state))

    now = [0.0]
    breakers = Breakers(1, 1.0, lambda: now[0], listener=Recorder().breaker)
    breakers.record("s1", False)
    assert breakers.refuse("s1", "x") is not None  # open: fails fast, no change
    now[0] = 2.0
    assert breakers.refuse("s1", "x") is None  # the probe goes: half open
    breakers.record("s1", True)
    assert seen == [("s1", "open"), ("s1", "half_open"), ("s1", "closed")]


# -- leases ----------------------------------------------------------------------


def test_leases_and_units_held(make_quota: MakeClient) -> None:
    """Held while inside acquire, by group; back to 0 on exit, also after an early release."""
    m = metrics()
    quota = make_quota(POLICY, clock=ManualClock(), observer=m)
    with quota.acquire("a", 3):
        with quota.acquire("b", 2) as inner:
            assert value(m, "ratequota_leases_held", group="g") == 2
            assert value(m, "ratequota_units_held", group="g") == 5
            inner.release()  # given back early: still counted until the block is left
        assert value(m, "ratequota_leases_held", group="g") == 1
        assert value(m, "ratequota_units_held", group="g") == 3
    assert value(m, "ratequota_leases_held", group="g") == 0
    assert value(m, "ratequota_units_held", group="g") == 0
    # try_acquire leases are the caller's to track: not counted as held.
    assert quota.try_acquire("a", 1).admitted
    assert value(m, "ratequota_units_held", group="g") == 0


def test_lost_leases_are_counted_once_by_cause(make_quota: MakeClient) -> None:
    """A lease that expired under its holder is lost once, whoever notices first."""
    m = metrics()
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock, observer=m, lease_ttl=5.0, renew_in_background=False)
    with quota.acquire("a", 1) as held:
        clock.advance(6.0)
        assert not held.renew().renewed  # the renewal finds it expired
        assert held.lost
    # Leaving released it too (state "unknown" or "expired"): still one loss.
    assert value(m, "ratequota_leases_lost_total", group="g", cause="expired") == 1

    with quota.acquire("a", 1) as held:
        clock.advance(6.0)  # expired; nobody notices until the release on exit
    assert value(m, "ratequota_leases_lost_total", group="g", cause="expired") == 2

    with quota.acquire("a", 1) as held:
        # The lease's id now names another holder's lease: its release is fenced.
        quota.release(held.info)
        assert quota.try_acquire("b", 1, request_id=held.id).admitted
    assert held.lost
    assert value(m, "ratequota_leases_lost_total", group="g", cause="fenced") == 1


def test_renewals_by_result(make_quota: MakeClient) -> None:
    """The client's renewer reports each renewal's result, and a lease found gone as lost."""
    m = metrics()
    clock = ManualClock()
    quota = make_quota(POLICY, clock=clock, observer=m, lease_ttl=6.0, renew_in_background=False)
    with quota.acquire("a", 1), quota.acquire("a", 1) as taken:
        clock.advance(2.5)  # both due (every third of 6 s)
        quota.release(taken.info)  # taken away behind the holder's back
        assert quota.renewer.renew_due() == 2
        assert taken.lost
    assert value(m, "ratequota_renewals_total", group="g", result="renewed") == 1
    assert value(m, "ratequota_renewals_total", group="g", result="lost") == 1
    assert value(m, "ratequota_leases_lost_total", group="g", cause="expired") == 1


def test_unrenewed_lease_is_lost_by_the_book() -> None:
    """Redis unreachable until the lease's lifetime is over: an ``error``, then a loss."""
    m = metrics()
    now = [0.0]
    book = RenewalBook(0.5, 5.0, lambda: now[0])
    held = LeaseBase(LeaseInfo("x", "a", "g", 1, 1, 0.0), 5.0, observer=m)
    book.hold(held)
    now[0] = 3.0
    assert book.next()[0] == [held]
    book.settle(held, BackendUnavailable("down"))  # retried soon
    assert not held.lost
    now[0] = 6.0
    assert book.next()[0] == [held]
    book.settle(held, BackendUnavailable("down"))
    assert held.lost and len(book) == 0
    assert value(m, "ratequota_renewals_total", group="g", result="error") == 2
    assert value(m, "ratequota_leases_lost_total", group="g", cause="unrenewed") == 1
    # A result arriving after the holder dropped the lease is not reported.
    book.settle(held, BackendUnavailable("down"))
    assert value(m, "ratequota_renewals_total", group="g", result="error") == 2


# -- the exporter itself ---------------------------------------------------------


def test_every_documented_family_is_exported_and_documented() -> None:
    """METRIC_NAMES is what a registry holds, and docs/metrics.md documents each name."""
    m = metrics(tenant_labels=True)
    exported = {family.name: family.type for family in m.registry.collect()}
    assert exported == METRIC_NAMES
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(ratequota_[a-z_]+)`", page))
    series = {n + "_total" if t == "counter" else n for n, t in METRIC_NAMES.items()}
    assert series <= documented
    assert documented - series <= {"ratequota_acquire_wait_seconds_bucket"}


def exported_series(m: PrometheusMetrics) -> set[str]:
    """Every series name the registry can expose (counters with _total, histograms split)."""
    names: set[str] = set()
    for family in m.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_only_exported_series() -> None:
    """docs/grafana-dashboard.json queries only series PrometheusMetrics exports."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 8
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {name for expr in exprs for name in re.findall(r"\bratequota_[a-z_]+", expr)}
    assert queried, "the dashboard queries nothing"
    missing = queried - exported_series(metrics(tenant_labels=True))
    assert missing == set()
    # Every family is on the dashboard somewhere.
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in queried}
    assert set(METRIC_NAMES) - families == set()


def test_exposition_after_a_workload(make_quota: MakeClient) -> None:
    """The text format a scrape reads carries the families with their HELP and TYPE."""
    m = metrics()
    quota = make_quota(POLICY, clock=ManualClock(), observer=m)
    with quota.acquire("a", 2):
        text = generate_latest(m.registry).decode()
    assert "# TYPE ratequota_decisions_total counter" in text
    assert 'ratequota_decisions_total{group="g",reason="admitted",result="admitted"} 1.0' in text
    assert 'ratequota_units_held{group="g"} 2.0' in text


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without prometheus_client the error says which extra to install."""
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "prometheus_client":
            raise ImportError("No module named 'prometheus_client'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "prometheus_client")
    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(ConfigError, match=r"ratequota\[metrics\]"):
        PrometheusMetrics(None)


def test_one_registry_holds_one_set_of_metrics() -> None:
    """A second PrometheusMetrics on the same registry is refused with a clear message."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    with pytest.raises(ConfigError, match="registry"):
        PrometheusMetrics(registry)
    with pytest.raises(ConfigError, match="tenant_labels"):
        PrometheusMetrics(CollectorRegistry(), tenant_labels="yes")  # type: ignore[arg-type]


def test_observer_must_be_an_observer() -> None:
    """A client refuses an observer that is not one, naming the field, before any I/O."""
    with pytest.raises(ConfigError, match="observer"):
        QuotaClient(dead_url(), observer=object())


def test_no_observer_means_no_events_and_no_timing() -> None:
    """Without an observer the Runner never reads the clock for timing (zero cost)."""
    from ratequota.clients.core import QuotaCore
    from ratequota.clients.runner import Runner

    reads = []

    def clock() -> float:
        reads.append(1)
        return 0.0

    core = QuotaCore()

    def flow() -> Any:
        yield core._release_call("g", "id", "a", 1)

    run = Runner(flow(), core.breakers, lambda route: "s", "x", observer=None, clock=clock)
    run.step(lambda op: ["unknown", 0])
    assert reads == [] and run.op is None


def test_decision_event_defaults() -> None:
    """An event without numbers says so: NaN limit, unknown guarantee and wait."""
    event = DecisionEvent("g", "a", 1, "failed", "backend_unavailable")
    assert math.isnan(event.limit) and event.guarantee is None and event.waited is None


# -- OpenTelemetry spans -----------------------------------------------------------


class FakeSpan:
    """What a recording span is told."""

    def __init__(self, name: str, start_time: int, attributes: dict[str, Any]) -> None:
        self.name, self.start, self.attributes = name, start_time, attributes
        self.end_time: int | None = None
        self.status: Any = None

    def set_status(self, status: Any) -> None:
        self.status = status

    def end(self, end_time: int | None = None) -> None:
        self.end_time = end_time


class FakeProvider:
    """A tracer provider whose tracer keeps every span it starts."""

    def __init__(self) -> None:
        self.spans: list[FakeSpan] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> FakeProvider:
        return self

    def start_span(self, name: str, **kwargs: Any) -> FakeSpan:
        span = FakeSpan(name, kwargs["start_time"], dict(kwargs["attributes"]))
        self.spans.append(span)
        return span


def test_decision_spans_alongside_metrics(make_quota: MakeClient) -> None:
    """One span per decision, as long as the acquire waited; Observers feeds metrics too."""
    from ratequota.observe import Observers
    from ratequota.tracing import DecisionSpans

    provider = FakeProvider()
    m = metrics()
    spans = DecisionSpans(provider)
    assert spans.enabled
    quota = make_quota(POLICY, clock=ManualClock(), observer=Observers(m, spans))
    assert quota.try_acquire("a", 8).admitted
    with pytest.raises(AcquireTimeout), quota.acquire("a", 1, timeout=1.5):
        pass
    first, second = provider.spans
    assert first.name == "ratequota.try_acquire" and first.end_time == first.start
    assert first.attributes["ratequota.result"] == "admitted"
    assert first.attributes["ratequota.used"] == 8 and first.attributes["ratequota.units"] == 8
    assert second.name == "ratequota.acquire"
    assert second.attributes["ratequota.result"] == "timed_out"
    assert second.attributes["ratequota.reason"] == "tenant_limit"
    assert second.end_time is not None and second.end_time - second.start >= 1.5e9 - 1e3
    assert first.status is None and second.status is None  # refusals are answers
    assert decisions(m, "timed_out", "tenant_limit") == 1


def test_decision_spans_mark_failures_and_need_nothing_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis unreachable: the span's status is an error. Without opentelemetry: a no-op."""
    from opentelemetry.trace import StatusCode

    from ratequota.tracing import DecisionSpans

    provider = FakeProvider()
    quota = QuotaClient(dead_url(), socket_timeout=0.2, observer=DecisionSpans(provider))
    try:
        with pytest.raises(BackendUnavailable):
            quota.try_acquire("a", 1, group="g")
    finally:
        quota.close()
    (span,) = provider.spans
    assert span.attributes["ratequota.result"] == "failed"
    assert span.status.status_code == StatusCode.ERROR

    real_import = builtins.__import__

    def no_opentelemetry(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opentelemetry)
    silent = DecisionSpans(FakeProvider())
    assert not silent.enabled
    silent.decision(DecisionEvent("g", "a", 1, "failed", "backend_unavailable"))


def test_observers_must_be_observers() -> None:
    """Observers refuses anything else, naming the field."""
    from ratequota.observe import Observers

    with pytest.raises(ConfigError, match="observers"):
        Observers(metrics(), object())  # type: ignore[arg-type]
