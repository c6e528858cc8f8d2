"""One way to run a behavioural test on both clients: ``Quotas`` and the ``AsyncBridge``.

The test body is written once against the sync API (``try_acquire``, ``with
acquire(...) as lease``, ``lease.release()``, ...). ``Quotas`` (behind the
``make_quota`` fixture) makes the clients of one test, all on one Redis like
the pods of a deployment: ``QuotaClient``s, or ``AsyncQuotaClient``s behind an
``AsyncBridge``, which owns an event loop on a thread of its own and runs the
async client there, every call from the test blocking on the coroutine's
result. Whatever the sync client is tested for, the async one is tested for too.

The bridge adds no logic: it forwards arguments unchanged, so argument errors
are raised by the async client itself, synchronously where it raises them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import fakeredis
import redis

from ratequota import AsyncAcquisition, AsyncLease, AsyncQuotaClient, QuotaClient
from ratequota.clients.async_backends import async_embedded_backend, async_url_backend
from ratequota.clients.backends import embedded_backend, url_backend
from ratequota.decision import LeaseInfo
from ratequota.policy import Policy
from tests.servers import RedisServer

T = TypeVar("T")

#: Longest a bridged call may take before the test fails (a hang is a bug, not a wait).
CALL_DEADLINE = 60.0


class AsyncBridge:
    """An ``AsyncQuotaClient`` driven from synchronous test code."""

    def __init__(self, build: Callable[[], AsyncQuotaClient], raw: redis.Redis) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def construct() -> AsyncQuotaClient:
            return build()

        self.client = self.wait(construct())
        #: A plain sync connection to the same server, for tests that inspect keys.
        self.raw = raw

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_DEADLINE)

    def close(self) -> None:
        """Close the client, then stop the loop and its thread."""
        try:
            self.wait(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_DEADLINE)
            self._loop.close()
            self.raw.close()

    # -- the sync client's API ---------------------------------------------

    @property
    def core(self) -> Any:
        """The client's sans-I/O core (settings, clock, breakers)."""
        return self.client.core

    @property
    def _node_of(self) -> Any:
        """The client's route -> shard lookup (tests that step a renewal flow directly)."""
        return self.client._node_of

    def _run(self, flow: Any) -> Any:
        """Drive one core flow (tests that step the core directly)."""
        return self.wait(self.client._run(flow))

    @property
    def renewer(self) -> BridgedRenewer:
        """The client's renewer, with a blocking ``renew_due``."""
        return BridgedRenewer(self, self.client.renewer)

    def stats(self) -> Any:
        """``AsyncQuotaClient.stats`` (not a coroutine)."""
        return self.client.stats()

    def apply_policy(self, policy: Any) -> dict[str, int]:
        """``await apply_policy``."""
        return self.wait(self.client.apply_policy(policy))

    def load_policy(self) -> Any:
        """``await load_policy``."""
        return self.wait(self.client.load_policy())

    def try_acquire(self, tenant: Any, units: Any = 1, **options: Any) -> Any:
        """``await try_acquire``; an admitted lease stays a plain ``LeaseInfo``."""
        return self.wait(self.client.try_acquire(tenant, units, **options))

    def acquire(self, tenant: Any, units: Any = 1, **options: Any) -> BridgedAcquisition:
        """``acquire`` validates here, as the sync client does; waiting happens on entry."""
        return BridgedAcquisition(self, self.client.acquire(tenant, units, **options))

    def release(self, lease: Any, **actuals: Any) -> Any:
        """``await release``."""
        return self.wait(self.client.release(_unwrap(lease), **actuals))

    def settle(self, lease: Any, **actuals: Any) -> Any:
        """``await settle``."""
        return self.wait(self.client.settle(_unwrap(lease), **actuals))

    def renew(self, lease: Any, ttl: float | None = None) -> Any:
        """``await renew``."""
        return self.wait(self.client.renew(_unwrap(lease), ttl))

    def snapshot(self, group: str, tenants: Iterable[str] = ()) -> Any:
        """``await snapshot``."""
        return self.wait(self.client.snapshot(group, tenants))

    def usage(self, group: str, **options: Any) -> Any:
        """``await usage``."""
        return self.wait(self.client.usage(group, **options))

    def explain(self, tenant: Any, units: Any = None, **options: Any) -> Any:
        """``await explain``."""
        return self.wait(self.client.explain(tenant, units, **options))

    def check(self, groups: Any = None, **options: Any) -> Any:
        """``await check``."""
        return self.wait(self.client.check(groups, **options))

    def limit(self, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``AsyncQuotaClient.limit`` around a test's handler, called as the test wrote it.

        The handler runs on a worker thread (an ``async def`` one on a loop of
        its own there), so its body may call this bridge; the decorator's
        arguments are checked now, as the client checks them.
        """
        decorate = self.client.limit(**options)

        def bridged(handler: Callable[..., Any]) -> Callable[..., Any]:
            is_async = inspect.iscoroutinefunction(handler)

            @functools.wraps(handler)
            async def on_a_thread(*args: Any, **kwargs: Any) -> Any:
                if is_async:
                    return await asyncio.to_thread(asyncio.run, handler(*args, **kwargs))
                return await asyncio.to_thread(handler, *args, **kwargs)

            limited = decorate(on_a_thread)
            if is_async:

                @functools.wraps(handler)
                async def awaited(*args: Any, **kwargs: Any) -> Any:
                    future = asyncio.run_coroutine_threadsafe(limited(*args, **kwargs), self._loop)
                    return await asyncio.wrap_future(future)

                return awaited

            @functools.wraps(handler)
            def called(*args: Any, **kwargs: Any) -> Any:
                return self.wait(limited(*args, **kwargs))

            return called

        return bridged


class BridgedRenewer:
    """A ``TaskRenewer`` whose ``renew_due`` blocks; ``book`` is the renewer's own."""

    def __init__(self, bridge: AsyncBridge, renewer: Any) -> None:
        self._bridge = bridge
        self.book = renewer.book
        self._renewer = renewer

    def renew_due(self) -> int:
        """``await renewer.renew_due()``."""
        return self._bridge.wait(self._renewer.renew_due())  # type: ignore[no-any-return]


class BridgedAcquisition:
    """``with bridge.acquire(...) as lease`` over ``async with``."""

    def __init__(self, bridge: AsyncBridge, acquisition: AsyncAcquisition) -> None:
        self._bridge = bridge
        self._acquisition = acquisition

    def __enter__(self) -> BridgedLease:
        return BridgedLease(self._bridge, self._bridge.wait(self._acquisition.__aenter__()))

    def __exit__(self, *exc_info: Any) -> None:
        self._bridge.wait(self._acquisition.__aexit__(*exc_info))


class BridgedLease:
    """An ``AsyncLease`` whose ``renew``/``release`` block; every other attribute is the lease's."""

    def __init__(self, bridge: AsyncBridge, lease: AsyncLease) -> None:
        self._bridge = bridge
        self.lease = lease

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lease, name)

    def renew(self, ttl: float | None = None) -> Any:
        """``await lease.renew``."""
        return self._bridge.wait(self.lease.renew(ttl))

    def release(self, **actuals: Any) -> Any:
        """``await lease.release``."""
        return self._bridge.wait(self.lease.release(**actuals))

    def settle(self, **actuals: Any) -> Any:
        """``await lease.settle``."""
        return self._bridge.wait(self.lease.settle(**actuals))


def _unwrap(lease: Any) -> LeaseInfo | AsyncLease:
    return lease.lease if isinstance(lease, BridgedLease) else lease


def raw_connection(quota: Any) -> redis.Redis:
    """A sync connection to the server a test client (sync or bridged) talks to."""
    if isinstance(quota, AsyncBridge):
        return quota.raw
    return quota.backend.connection("x")  # type: ignore[no-any-return]


def hold(quota: Any, tenant: str, units: int, **options: Any) -> Any:
    """Enter ``acquire(...)`` and return the held lease (left for the test to release)."""
    return quota.acquire(tenant, units, **options).__enter__()


class Quotas:
    """Makes the clients of one test, of one kind, all on one Redis (like pods on one server).

    ``kind`` is ``"sync"`` (``QuotaClient``) or ``"async"`` (an ``AsyncQuotaClient``
    behind an ``AsyncBridge``); ``server`` is a real redis-server, or None for a
    fresh fakeredis server of this ``Quotas`` alone.
    """

    def __init__(self, kind: str, server: RedisServer | None = None) -> None:
        self.kind = kind
        self.server = server
        self._fake = fakeredis.FakeServer()
        self._clients: list[Any] = []

    def __call__(self, policy: Policy | None = None, **options: Any) -> Any:
        """A new client on the shared Redis, with ``policy`` published if given."""
        timeout = options.setdefault("socket_timeout", 5.0)
        client: Any
        if self.kind == "async":
            client = AsyncBridge(
                lambda: AsyncQuotaClient(backend=self._backend(timeout), **options), self.conn()
            )
        else:
            client = QuotaClient(backend=self._backend(timeout), **options)
        self._clients.append(client)
        if policy is not None:
            client.apply_policy(policy)
        return client

    def at(self, url: str, **options: Any) -> Any:
        """A client of this kind on ``url`` (say, one nothing listens on), closed at the end."""
        client: Any
        if self.kind == "async":
            client = AsyncBridge(lambda: AsyncQuotaClient(url, **options), self.conn())
        else:
            client = QuotaClient(url, **options)
        self._clients.append(client)
        return client

    def _backend(self, timeout: float) -> Any:
        url = None if self.server is None else self.server.url
        if self.kind == "async":
            if url is None:
                return async_embedded_backend(server=self._fake)
            return async_url_backend(url, socket_timeout=timeout)
        if url is None:
            return embedded_backend(server=self._fake)
        return url_backend(url, socket_timeout=timeout)

    def conn(self) -> redis.Redis:
        """A new plain connection to the shared Redis (to inspect or damage it); close it."""
        if self.server is None:
            return fakeredis.FakeRedis(server=self._fake)
        return redis.Redis.from_url(self.server.url)

    def close(self) -> None:
        """Close every client made."""
        for client in self._clients:
            client.close()
