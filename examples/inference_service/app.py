"""A small batch-inference service whose handler is guarded by ratequota.

A plain ASGI application (no web framework) serving:

* ``POST /v1/batches`` — body ``{"tenant": "acme", "items": ["...", ...]}``.
  Each item is one inference unit; the handler holds a lease of
  ``len(items)`` units while the (simulated) model runs, with the group's
  rate meters decided in the same call: one request, and an *estimate* of
  ``TOKENS_PER_ITEM`` tokens per item, settled at the tokens really produced
  once the model ran (reserve, then settle: docs/rates.md). Answers 200 with
  the results and the rate headers (``RateLimit-Policy``, ``RateLimit``,
  ``x-ratelimit-*``), 429 with ``Retry-After`` (and the rate headers when a
  meter refused) when the tenant is over its fair share or its rate at the
  deadline, 413 when the batch can never fit, 404 for an unknown tenant, 503
  when the quota backend is down (fail-closed), 400 for a malformed body.
* ``GET /v1/quota/{group}`` — the group's live usage (what ``ratequota
  inspect`` shows), as JSON; each tenant's ``limit`` is the most it may hold
  now if it asks, never below its ``guarantee``.
* ``GET /healthz`` — 200 while the process runs.
* ``GET /metrics`` — the quota client's Prometheus metrics (docs/metrics.md).

Run it (with the embedded quota backend, or ``RATEQUOTA_URL`` naming a Redis)::

    pip install uvicorn 'ratequota[metrics]'
    RATEQUOTA_POLICY=examples/inference_service/policy.toml \\
        uvicorn examples.inference_service.app:app --port 8000
    curl -s localhost:8000/v1/batches -d '{"tenant": "acme", "items": ["a", "b"]}'

In production the operator publishes the policy (``ratequota policy apply``);
``RATEQUOTA_POLICY`` makes the service publish one at start-up, for trying it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ratequota import (
    AcquireTimeout,
    AsyncQuotaClient,
    BackendUnavailable,
    PolicyMissing,
    QuotaExceeded,
    RateQuotaError,
    RequestTooLarge,
    UnknownTenant,
    explain,
)
from ratequota.metrics import PrometheusMetrics
from ratequota.ratelimit_headers import decision_headers, meter_headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds of "GPU time" per item of a batch (the model is simulated).
SECONDS_PER_ITEM = 0.005
#: Tokens reserved per item at admission; the batch settles at what it produced.
TOKENS_PER_ITEM = 500
#: Largest body accepted, in bytes.
MAX_BODY = 1 << 20


class BadRequest(Exception):
    """The request body is not a batch."""


class Batch:
    """A parsed batch request: who pays, and the items to run."""

    def __init__(self, tenant: str, items: list[str]) -> None:
        self.tenant = tenant
        self.items = items

    @classmethod
    def parse(cls, body: bytes) -> Batch:
        """Parse and check a JSON body; ``BadRequest`` says what is wrong."""
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest('body must be an object {"tenant": ..., "items": [...]}')
        tenant, items = data.get("tenant"), data.get("items")
        if not isinstance(tenant, str) or not tenant:
            raise BadRequest("tenant: must be a non-empty string")
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise BadRequest("items: must be a non-empty list of strings")
        return cls(tenant, items)


async def run_model(items: list[str]) -> list[dict[str, Any]]:
    """Stand-in for the GPU: time proportional to the batch, one result per item."""
    await asyncio.sleep(SECONDS_PER_ITEM * len(items))
    return [{"input": item, "tokens": len(item.split())} for item in items]


def create_app(
    quota: AsyncQuotaClient,
    *,
    timeout: float = 2.0,
    policy_file: str | None = None,
    metrics: CollectorRegistry | None = None,
) -> ASGIApp:
    """The service, enforcing quota through ``quota``; ``policy_file`` is published at start-up.

    ``metrics``: the registry served at ``GET /metrics`` (the one the client's
    ``PrometheusMetrics`` observer writes to).
    """

    async def handle_batch(batch: Batch) -> tuple[dict[str, Any], dict[str, str]]:
        # Runs only while a lease of len(items) units is held; released on return or error.
        # The tokens are an estimate at admission, settled at what the model produced.
        estimate = TOKENS_PER_ITEM * len(batch.items)
        held = quota.acquire(
            batch.tenant, len(batch.items), timeout=timeout, tokens=estimate, requests=1
        )
        async with held as lease:
            results = await run_model(batch.items)
            await lease.settle(tokens=sum(r["tokens"] for r in results))
        return {"tenant": batch.tenant, "results": results}, meter_headers(lease.meters)

    async def batches(receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            batch = Batch.parse(await read_body(receive))
            return 200, *(await handle_batch(batch))
        except BadRequest as exc:
            return 400, {"error": str(exc)}, {}
        except RequestTooLarge as exc:
            return 413, refusal(exc), {}  # no Retry-After: trying again never helps
        except (AcquireTimeout, QuotaExceeded) as exc:
            # Retry-After from the refusal (a meter's from its bucket), and the rate headers.
            headers = decision_headers(exc.decision)
            headers.setdefault("Retry-After", "1")
            return 429, refusal(exc), headers
        except UnknownTenant as exc:
            return 404, {"error": str(exc)}, {}
        except BackendUnavailable as exc:
            return 503, {"error": f"quota backend unavailable: {exc}"}, {"retry-after": "1"}

    async def quota_of(group: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            policy = await quota.load_policy()
            listed = policy.group(group) if policy is not None else None
            if listed is None:
                raise PolicyMissing(group)
            snap = await quota.snapshot(group, [t.name for t in listed.tenants])
        except PolicyMissing as exc:
            return 404, {"error": str(exc)}, {}
        except BackendUnavailable as exc:
            return 503, {"error": str(exc)}, {}
        tenants = {}
        for name, t in snap.tenants.items():
            # "limit": the most the tenant may hold now if it asks; never below its guarantee.
            limit = explain(snap, listed, name).entitled
            tenants[name] = {
                "used": t.used,
                "limit": round(limit, 3),
                "guarantee": t.guarantee,
                "pending": t.pending,
                "borrowed": t.borrowed,
            }
        body = {"group": group, "capacity": snap.capacity, "used": snap.used, "tenants": tenants}
        return 200, body, {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/v1/batches":
            if method != "POST":
                await respond(send, 405, {"error": "use POST"}, {"allow": "POST"})
                return
            await respond(send, *(await batches(receive)))
        elif path.startswith("/v1/quota/") and method == "GET":
            await respond(send, *(await quota_of(path.removeprefix("/v1/quota/"))))
        elif path == "/metrics" and method == "GET" and metrics is not None:
            await respond_metrics(send, metrics)
        elif path == "/healthz":
            await respond(send, 200, {"ok": True})
        else:
            await respond(send, 404, {"error": f"no route {method} {path}"})

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await quota.load_scripts(strict=False)
                    if policy_file:
                        await quota.apply_policy(policy_file)
                except RateQuotaError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await quota.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def refusal(exc: QuotaExceeded) -> dict[str, Any]:
    """The body of a refused batch: why, and the numbers behind it.

    ``limit`` is given only for ``tenant_limit``, where it is the fair limit
    the request did not fit under (never below the tenant's guarantee);
    ``retry_after`` only when waiting can help (not for ``too_large``).
    """
    d = exc.decision
    body: dict[str, Any] = {
        "error": str(exc),
        "reason": d.reason,
        "used": d.used,
        "group_used": d.group_used,
        "capacity": d.capacity,
    }
    if d.reason == "tenant_limit":
        body["limit"] = round(d.limit, 3)
    if d.reason == "meter":
        body["meters"] = {m.name: m.reason for m in d.meters if not m.admitted}
    if d.reason != "too_large":
        body["retry_after"] = d.retry_after
    return body


async def read_body(receive: Receive) -> bytes:
    """The whole request body (bounded by ``MAX_BODY``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """Send a JSON response."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def respond_metrics(send: Send, registry: CollectorRegistry) -> None:
    """Send the registry's metrics in Prometheus' text format (what a scrape reads)."""
    payload = generate_latest(registry)
    raw = [
        (b"content-type", CONTENT_TYPE_LATEST.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


#: The metrics of the service's quota client, served at ``GET /metrics``.
METRICS = PrometheusMetrics(CollectorRegistry())

#: The application ``uvicorn examples.inference_service.app:app`` serves.
app = create_app(
    AsyncQuotaClient(
        os.environ.get("RATEQUOTA_URL") or os.environ.get("RATEQUOTA_REDIS_URL"), observer=METRICS
    ),
    policy_file=os.environ.get("RATEQUOTA_POLICY"),
    metrics=METRICS.registry,
)
