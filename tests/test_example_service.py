"""The example inference service, called through real HTTP on a loopback port.

The ASGI app of ``examples/inference_service`` runs under uvicorn (the
server it would be deployed with) on a socket bound to 127.0.0.1 with a
free port; requests go through ``http.client``. The quota client is an
``AsyncQuotaClient`` on the embedded backend under a prefix of this test
module, so a sync ``QuotaClient`` in the test sees the same state.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ratequota import AsyncQuotaClient, QuotaClient

uvicorn = pytest.importorskip("uvicorn")

from examples.inference_service.app import create_app  # noqa: E402

POLICY = Path(__file__).resolve().parent.parent / "examples" / "inference_service" / "policy.toml"


def _not_json(constant: str) -> Any:
    """NaN and Infinity are not JSON; the service must never send them."""
    raise AssertionError(f"the service sent {constant}, which is not JSON")


class Service:
    """A running service: its port and a sync client on the same quota state."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix

    def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One HTTP request; returns status, JSON body and lower-cased headers."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = raw if raw is not None else (None if body is None else json.dumps(body))
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            response = conn.getresponse()
            data = json.loads(response.read() or b"null", parse_constant=_not_json)
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, data, headers
        finally:
            conn.close()


@contextlib.contextmanager
def serve(app: Any) -> Iterator[int]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) until the block ends; the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # polls the server's own flag; the bound only stops a hang
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the example service did not start within 10 s")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """The example app under uvicorn on 127.0.0.1 (free port), stopped by flag afterwards."""
    prefix = f"example-{uuid.uuid4().hex[:8]}"
    app = create_app(AsyncQuotaClient(prefix=prefix), timeout=0.5, policy_file=str(POLICY))
    with serve(app) as port:
        yield Service(port, prefix)


def test_batch_is_served_under_a_lease(service: Service) -> None:
    """A batch within the tenant's share is served, and its units are back afterwards."""
    status, body, _ = service.call("POST", "/v1/batches", {"tenant": "acme", "items": ["a b", "c"]})
    assert status == 200
    assert [r["tokens"] for r in body["results"]] == [2, 1]
    status, quota, _ = service.call("GET", "/v1/quota/inference")
    assert status == 200
    assert quota["capacity"] == 16
    assert quota["used"] == 0
    assert set(quota["tenants"]) == {"acme", "globex"}


def test_units_are_held_while_the_handler_runs(service: Service) -> None:
    """While a large batch runs, another pod sees its units held by the tenant."""
    items = ["x"] * 12
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            service.call, "POST", "/v1/batches", {"tenant": "acme", "items": items}
        )
        peer = QuotaClient(prefix=service.prefix)
        try:
            seen = 0
            deadline = time.monotonic() + 5
            while not future.done() and time.monotonic() < deadline:
                seen = max(seen, peer.snapshot("inference", ["acme"]).tenants["acme"].used)
                time.sleep(0.005)
        finally:
            peer.close()
        status, _, _ = future.result(timeout=10)
    assert status == 200
    assert seen == 12  # 12 items, 12 units, held for ~60 ms of simulated GPU time


def test_over_share_is_refused_with_429_and_retry_after(service: Service) -> None:
    """globex may hold G + B = 8 units: while 8 are held, another batch gets 429."""
    peer = QuotaClient(prefix=service.prefix)
    try:
        with peer.acquire("globex", 8, ttl=30):
            status, body, headers = service.call(
                "POST", "/v1/batches", {"tenant": "globex", "items": ["q"]}
            )
    finally:
        peer.close()
    assert status == 429
    assert body["reason"] == "tenant_limit"
    assert body["used"] == 8
    assert int(headers["retry-after"]) >= 1


def test_admission_carries_the_rate_headers(service: Service) -> None:
    """A served batch answers with the IETF and OpenAI-style rate headers of its meters."""
    status, _, headers = service.call("POST", "/v1/batches", {"tenant": "acme", "items": ["a"]})
    assert status == 200
    assert headers["ratelimit-policy"] == '"tokens";q=60000;w=60, "requests";q=50;w=1'
    assert headers["ratelimit"].startswith('"tokens";r=')
    assert int(headers["x-ratelimit-remaining-tokens"]) > 0
    assert headers["x-ratelimit-limit-requests"] == "3000"  # per minute, as OpenAI's
    assert "retry-after" not in headers


def test_a_spent_meter_is_refused_with_429_and_retry_after(service: Service) -> None:
    """globex only borrows tokens: once another pod took the spare, its batch (an estimate of
    2,000 tokens) waits, then gets 429 naming the meter, with Retry-After from the bucket."""
    peer = QuotaClient(prefix=service.prefix)
    leases = []
    try:
        for _ in range(5):  # the borrowable 10,000 tokens, in three pieces
            decision = peer.try_acquire("globex", 1, tokens=3000)
            if decision.lease is not None:
                leases.append(decision.lease)
        assert len(leases) == 3
        status, body, headers = service.call(
            "POST", "/v1/batches", {"tenant": "globex", "items": ["a", "b", "c", "d"]}
        )
    finally:
        for lease in leases:
            peer.release(lease)
        peer.close()
    assert status == 429
    assert body["reason"] == "meter" and "tokens" in body["meters"]
    assert int(headers["retry-after"]) >= 1
    assert headers["ratelimit"].startswith('"tokens";r=')


def test_impossible_and_malformed_requests(service: Service) -> None:
    """Batches that can never fit get 413; malformed bodies 400; unknown routes 404."""
    status, body, headers = service.call(
        "POST", "/v1/batches", {"tenant": "globex", "items": ["i"] * 9}
    )
    assert status == 413
    assert body["reason"] == "too_large"
    # Trying again never helps: no Retry-After, no retry hint in the body or the message.
    assert "retry-after" not in headers
    assert "retry_after" not in body
    assert "retry" not in body["error"]
    assert service.call("POST", "/v1/batches", raw=b"{nope")[0] == 400
    assert service.call("POST", "/v1/batches", {"tenant": "acme", "items": []})[0] == 400
    assert service.call("GET", "/v1/batches")[0] == 405
    assert service.call("GET", "/elsewhere")[0] == 404
    assert service.call("GET", "/healthz")[0] == 200


def test_strangers_borrow_through_the_default_tenant(service: Service) -> None:
    """A tenant the policy does not list is served by the group's default (borrow only)."""
    status, body, _ = service.call("POST", "/v1/batches", {"tenant": "initech", "items": ["z"] * 4})
    assert status == 200
    assert len(body["results"]) == 4
    status, _, _ = service.call("POST", "/v1/batches", {"tenant": "initech", "items": ["z"] * 5})
    assert status == 413  # borrow_limit 4 for strangers


def test_quota_limits_are_never_below_guarantees(service: Service) -> None:
    """An idle tenant's ``limit`` is what it may hold if it asks: at least its guarantee.

    On main the endpoint showed the engine's limit at zero demand: ``0.0`` for
    an idle tenant guaranteed 8.
    """
    status, quota, _ = service.call("GET", "/v1/quota/inference")
    assert status == 200
    acme, globex = quota["tenants"]["acme"], quota["tenants"]["globex"]
    assert acme["guarantee"] == 8
    assert acme["limit"] >= 8
    assert globex["limit"] == 8  # G + B = 4 + 4: its ceiling, nobody else asking
    peer = QuotaClient(prefix=service.prefix)
    try:
        with peer.acquire("globex", 8, ttl=30):  # globex borrows 4 of acme's idle guarantee
            _, busy, _ = service.call("GET", "/v1/quota/inference")
    finally:
        peer.close()
    assert busy["tenants"]["globex"]["borrowed"] == 4
    assert busy["tenants"]["acme"]["limit"] >= 8  # borrowed units come back to acme


def test_unknown_group_names_the_command_that_publishes(service: Service) -> None:
    """The 404 of a group without a policy tells the operator what to run, not a Python call."""
    status, body, _ = service.call("GET", "/v1/quota/nowhere")
    assert status == 404
    assert "ratequota policy apply" in body["error"]
    assert "apply_policy" not in body["error"]
