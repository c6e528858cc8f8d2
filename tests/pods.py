"""Pods for lease tests: the sync or the async client behind one blocking interface.

Every lease behaviour (fencing, request ids, recovery, bounds) must hold for
both clients. A ``Pod`` wraps either one; ``pod.run(x)`` returns ``x`` as is
for the sync client and runs the coroutine on the pod's own event loop for the
async one, so one test body drives both. All pods made by one ``make_pod``
share one Redis (fakeredis server or the suite's real redis-server), like the
pods of a deployment.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.async_backends import async_embedded_backend, async_url_backend
from ratequota.clients.backends import embedded_backend, url_backend
from ratequota.clients.sync import QuotaClient
from ratequota.policy import Policy
from tests.servers import RedisServer


class Pod:
    """One client, sync or async, driven by blocking calls."""

    def __init__(self, client: QuotaClient | AsyncQuotaClient, loop: Any) -> None:
        self.client: Any = client
        self.loop: asyncio.AbstractEventLoop | None = loop
        self.kind = "async" if loop is not None else "sync"

    def run(self, value: Any) -> Any:
        """The value of a client call: awaited on the pod's loop when it is a coroutine."""
        if self.kind == "async":
            assert self.loop is not None and inspect.isawaitable(value)
            return self.loop.run_until_complete(value)  # type: ignore[arg-type]
        return value

    def hold(self, tenant: str, units: int, **options: Any) -> Any:
        """Enter ``acquire(...)`` and return the held lease (a ``Lease`` or ``AsyncLease``)."""
        acquisition = self.client.acquire(tenant, units, **options)
        if self.kind == "async":
            return self.run(acquisition.__aenter__())
        return acquisition.__enter__()

    def close(self) -> None:
        """Close the client (and the pod's loop)."""
        self.run(self.client.close())
        if self.loop is not None:
            self.loop.close()


class Pods:
    """Makes pods sharing one Redis; ``conn()`` is a plain connection to it for the test."""

    def __init__(self, kind: str, server: RedisServer | None) -> None:
        self.kind = kind
        self.server = server  # the real redis-server, None on fakeredis
        self.fake = fakeredis.FakeServer()
        self.pods: list[Pod] = []

    def __call__(self, policy: Policy | None = None, **options: Any) -> Pod:
        """A new pod (client) on the shared Redis, with ``policy`` published if given."""
        options.setdefault("auto_renew", False)  # tests renew by hand, on the ManualClock
        server = self.server
        if self.kind == "sync":
            backend: Any = (
                url_backend(server.url, socket_timeout=5.0)
                if server is not None
                else embedded_backend(server=self.fake)
            )
            pod = Pod(QuotaClient(backend=backend, **options), None)
        else:
            loop = asyncio.new_event_loop()

            async def build() -> AsyncQuotaClient:
                abackend = (
                    async_url_backend(server.url, socket_timeout=5.0)
                    if server is not None
                    else async_embedded_backend(server=self.fake)
                )
                return AsyncQuotaClient(backend=abackend, **options)

            pod = Pod(loop.run_until_complete(build()), loop)
        self.pods.append(pod)
        if policy is not None:
            pod.run(pod.client.apply_policy(policy))
        return pod

    def conn(self) -> Any:
        """A plain sync connection to the shared Redis (to inspect or damage its state)."""
        if self.server is not None:
            return self.server.client()
        return fakeredis.FakeRedis(server=self.fake)

    def close(self) -> None:
        """Close every pod made."""
        for pod in self.pods:
            pod.close()


@pytest.fixture(
    params=[
        "sync-fake",
        "async-fake",
        pytest.param("sync-real", marks=pytest.mark.real_redis),
        pytest.param("async-real", marks=pytest.mark.real_redis),
    ]
)
def make_pod(request: pytest.FixtureRequest) -> Iterator[Pods]:
    """Pods on a fresh Redis, for each client (sync, async) and backend (fake, real)."""
    kind, where = str(request.param).split("-")
    server = request.getfixturevalue("real_redis") if where == "real" else None
    pods = Pods(kind, server)
    yield pods
    pods.close()
