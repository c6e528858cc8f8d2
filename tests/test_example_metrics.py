"""The example service's ``GET /metrics``, read under uvicorn while a workload runs.

The service runs as in ``tests/test_example_service.py`` (the ASGI app under
uvicorn on a free loopback port, an ``AsyncQuotaClient`` on the embedded
backend under a prefix of its own), with a ``PrometheusMetrics`` observer.
Batches are sent from a few threads; ``/metrics`` is scraped while they run
and once after, and the counters must match the answers the service gave:
one admission per 200, one ``too_large`` refusal per 413, one timeout per 429.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.sync import QuotaClient
from ratequota.metrics import PrometheusMetrics

uvicorn = pytest.importorskip("uvicorn")

from examples.inference_service.app import create_app  # noqa: E402
from tests.test_example_service import serve  # noqa: E402

POLICY = Path(__file__).resolve().parent.parent / "examples" / "inference_service" / "policy.toml"


class Service:
    """A running service: its port and the quota prefix it uses."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, str, str]:
        """One HTTP request: status, content type, body text."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, response.getheader("content-type", ""), response.read().decode()
        finally:
            conn.close()

    def batch(self, tenant: str, items: int) -> int:
        """POST a batch of ``items`` items; the status."""
        return self.request("POST", "/v1/batches", {"tenant": tenant, "items": ["w"] * items})[0]

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics, parsed: (sample name, sorted labels) -> value."""
        status, content_type, text = self.request("GET", "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def sample(scraped: dict[Any, float], name: str, **labels: str) -> float:
    """The value of one series of a scrape (0 when absent)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """The example app under uvicorn, its client observed by PrometheusMetrics."""
    prefix = f"example-metrics-{uuid.uuid4().hex[:8]}"
    metrics = PrometheusMetrics(CollectorRegistry())
    quota = AsyncQuotaClient(prefix=prefix, observer=metrics)
    app = create_app(quota, timeout=0.5, policy_file=str(POLICY), metrics=metrics.registry)
    with serve(app) as port:
        yield Service(port, prefix)


def test_metrics_count_the_answers_given(service: Service) -> None:
    """Scraped during and after a workload: decisions match the statuses, nothing left held."""
    work = (
        [("acme", 2)] * 12
        + [("globex", 3)] * 8
        + [("initech", 2)] * 4  # a stranger: the default tenant, borrowing
        + [("globex", 9)] * 2  # above globex's G + B = 8: 413
        + [("initech", 5)] * 2  # above the default borrow limit 4: 413
    )
    statuses: Counter[int] = Counter()
    scrapes = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(service.batch, tenant, items) for tenant, items in work]
        while not all(f.done() for f in futures):
            scrapes.append(service.scrape())  # a scrape while batches are served
        for future in futures:
            statuses[future.result(timeout=30)] += 1

    # One refusal at the deadline: globex's whole share is held by another pod.
    peer = QuotaClient(prefix=service.prefix)
    try:
        with peer.acquire("globex", 8, ttl=30):
            statuses[service.batch("globex", 1)] += 1
    finally:
        peer.close()

    assert statuses[413] == 4 and statuses[429] >= 1
    assert sum(statuses.values()) == len(work) + 1
    final = service.scrape()
    decided = "ratequota_decisions_total"
    group = "inference"
    assert (
        sample(final, decided, group=group, result="admitted", reason="admitted") == statuses[200]
    )
    assert sample(final, decided, group=group, result="refused", reason="too_large") == 4
    timed_out = sum(
        value
        for (name, labels), value in final.items()
        if name == decided and ("result", "timed_out") in labels
    )
    assert timed_out == statuses[429]
    every = sum(value for (name, _), value in final.items() if name == decided)
    assert every == len(work) + 1
    # The wait histogram saw every acquire; the leases are all given back.
    waits = sum(
        value
        for (name, _), value in final.items()
        if name == "ratequota_acquire_wait_seconds_count"
    )
    assert waits == every
    assert sample(final, "ratequota_leases_held", group=group) == 0
    assert sample(final, "ratequota_units_held", group=group) == 0
    acquire_calls = sum(
        value
        for (name, labels), value in final.items()
        if name == "ratequota_redis_call_duration_seconds_count" and ("call", "acquire") in labels
    )
    assert acquire_calls >= statuses[200]
    # Scrapes taken during the run never ran ahead of the final one, nor above the capacity.
    for scraped in scrapes:
        seen = sum(value for (name, _), value in scraped.items() if name == decided)
        assert seen <= every
        assert sample(scraped, "ratequota_units_held", group=group) <= 16


def test_metrics_route_is_get_only(service: Service) -> None:
    """POST /metrics is not a route (the JSON 404 of unknown routes)."""
    status, content_type, _ = service.request("POST", "/metrics")
    assert status == 404 and content_type == "application/json"
