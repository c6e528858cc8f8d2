"""The synchronous client: a thin shell that performs the core's flows with redis-py.

All decisions live in ``ratequota.core``; this module only sends, receives
and sleeps. It is safe to share one client between threads: the client keeps
no lock, and redis-py's pool hands each thread its own connection.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import attrs
import redis

from ratequota.backends import (
    Backend,
    embedded_backend,
    is_noscript,
    translate_error,
    url_backend,
)
from ratequota.clock import Clock
from ratequota.core import Command, Flow, QuotaCore, Settings, Sleep
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    ReleaseResult,
    RenewResult,
)
from ratequota.errors import InvalidType, RateQuotaError
from ratequota.policy import Policy
from ratequota.protocol import ScriptCall
from ratequota.scripts import load_scripts

__all__ = ["Acquisition", "Lease", "QuotaClient"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@attrs.define(eq=False)
class Lease:
    """A held lease: the granted facts plus renew/release through its client.

    ``over_limit`` is the last renewal's hint that a lender wants capacity
    back; ``lost`` becomes true when a renewal or release finds the lease had
    already expired (the holder overran its TTL and its units may be reused).
    """

    info: LeaseInfo
    _client: QuotaClient = attrs.field(repr=False)
    over_limit: bool = False
    lost: bool = False
    released: bool = False

    @property
    def id(self) -> str:
        """The lease id (the request id of the acquire)."""
        return self.info.id

    @property
    def tenant(self) -> str:
        """The tenant charged."""
        return self.info.tenant

    @property
    def group(self) -> str:
        """The group the units belong to."""
        return self.info.group

    @property
    def units(self) -> int:
        """Units held."""
        return self.info.units

    @property
    def token(self) -> int:
        """Fencing token: pass it downstream so stale holders can be rejected."""
        return self.info.token

    @property
    def expires_at(self) -> float:
        """Expiry in Redis time (seconds since the epoch), as of the last renewal."""
        return self.info.expires_at

    def renew(self, ttl: float | None = None) -> RenewResult:
        """Extend the lease by ``ttl`` seconds from now; marks it lost if it had expired."""
        result = self._client.renew(self.info, ttl)
        if result.renewed:
            self.info = attrs.evolve(self.info, expires_at=result.expires_at)
            self.over_limit = result.over_limit
        else:
            self.lost = True
        return result

    def release(self) -> ReleaseResult:
        """Give the units back; harmless when called twice."""
        result = self._client.release(self.info)
        self.released = True
        if result.state == "expired":
            self.lost = True
        return result


class Acquisition:
    """``with quota.acquire(...) as lease``: waits on entry, releases on exit, errors included."""

    def __init__(self, client: QuotaClient, flow: Callable[[], Flow[LeaseInfo]]) -> None:
        self._client = client
        self._flow = flow
        self._lease: Lease | None = None

    def __enter__(self) -> Lease:
        self._lease = Lease(self._client._run(self._flow()), self._client)
        return self._lease

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and not lease.released:
            lease.release()


def _argument_getter(spec: object, name: str, signature: inspect.Signature) -> Callable[..., Any]:
    """How the decorator reads tenant/units from a call: a callable, a parameter name, a constant."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and name == "tenant" and spec not in signature.parameters:
        return lambda *a, **k: spec  # a fixed tenant name
    if isinstance(spec, str):
        if spec not in signature.parameters:
            raise InvalidType(name, f"names no parameter of the handler: {spec!r}")

        def from_parameter(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return bound.arguments[spec]

        return from_parameter
    return lambda *a, **k: spec


class QuotaClient:
    """Tenant quota against Redis, for threads; see ``AsyncQuotaClient`` for asyncio.

    With no URL it runs on an embedded in-process fakeredis shared by every
    client of the process, so ``QuotaClient()`` works with nothing installed.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        backend: Backend | None = None,
        settings: Settings | None = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        """Connect to ``url`` (or the embedded default); ``options`` are ``Settings`` fields."""
        if settings is not None and options:
            raise InvalidType("settings", "pass either settings=... or its fields, not both")
        self.core = QuotaCore(settings or Settings(**options), clock)
        if backend is None:
            if url is None:
                backend = embedded_backend()
            else:
                backend = url_backend(url, socket_timeout=self.core.settings.socket_timeout)
        self.backend = backend
        self.load_scripts(strict=False)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> QuotaClient:
        """A client on one Redis server, e.g. ``redis://localhost:6379/0``."""
        return cls(url, **options)

    @classmethod
    def sharded(
        cls, urls: Iterable[str], *, shard_ids: Iterable[str] | None = None, **options: Any
    ) -> QuotaClient:
        """A client on independent Redis shards; each group lives on one (rendezvous hashing).

        ``shard_ids`` name the shards for placement (default: the URLs without
        passwords); keep them stable and every pod and release agrees on where
        each group lives.
        """
        from ratequota.backends import ShardedBackend

        settings = Settings(**options)
        backend = ShardedBackend(
            list(urls),
            socket_timeout=settings.socket_timeout,
            shard_ids=None if shard_ids is None else list(shard_ids),
        )
        return cls(backend=backend, settings=settings)

    @classmethod
    def cluster(cls, url: str, **options: Any) -> QuotaClient:
        """A client on a Redis Cluster, given any node's URL; the hash tag places each group."""
        from ratequota.backends import ClusterBackend

        settings = Settings(**options)
        backend = ClusterBackend(url, socket_timeout=settings.socket_timeout)
        return cls(backend=backend, settings=settings)

    def close(self) -> None:
        """Close connections; the client cannot be used afterwards."""
        self.backend.close()

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driving flows -----------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        value: Any = None
        error: RateQuotaError | None = None
        while True:
            try:
                op = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                return cast(T, stop.value)
            value, error = None, None
            try:
                value = self._perform(op)
            except RateQuotaError as exc:
                error = exc

    def _perform(self, op: ScriptCall | Command | Sleep) -> Any:
        if isinstance(op, Sleep):
            self.core.clock.sleep(op.seconds)
            return None
        conn = self.backend.connection(op.route)
        try:
            if isinstance(op, Command):
                return conn.execute_command(*op.args)
            return self._evalsha(conn, op)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise translate_error(exc, getattr(self.backend, "description", "redis")) from exc

    @staticmethod
    def _evalsha(conn: Any, call: ScriptCall) -> Any:
        spec = call.script
        try:
            return conn.evalsha(spec.sha, len(call.keys), *call.keys, *call.args)
        except redis.exceptions.ResponseError as exc:
            if not is_noscript(exc):
                raise
        # Restart, failover or SCRIPT FLUSH: load and retry exactly once.
        conn.script_load(spec.source)
        return conn.evalsha(spec.sha, len(call.keys), *call.keys, *call.args)

    def load_scripts(self, *, strict: bool = True) -> None:
        """Load every script on every server; ``strict=False`` tolerates an unreachable one.

        At start-up a server that is down is not fatal: the first call after
        it comes back loads the scripts through the NOSCRIPT path.
        """
        for conn in self.backend.connections():
            try:
                for spec in load_scripts().values():
                    conn.script_load(spec.source)
            except redis.exceptions.RedisError as exc:
                if strict:
                    raise translate_error(exc, "redis") from exc

    # -- policy ------------------------------------------------------------

    def apply_policy(self, policy: Policy | str | Path) -> dict[str, int]:
        """Publish a policy (or a TOML file of one) for every pod; returns versions per group."""
        if isinstance(policy, (str, Path)):
            policy = Policy.from_toml(policy)
        return self._run(self.core.apply_policy(policy))

    def load_policy(self) -> Policy | None:
        """The published policy, or None; also refreshes this client's routing."""
        return self._run(self.core.load_policy())

    # -- leases ------------------------------------------------------------

    def try_acquire(
        self,
        tenant: str,
        units: int = 1,
        *,
        group: str | None = None,
        ttl: float | None = None,
        request_id: str | None = None,
    ) -> Decision:
        """Decide now, never wait. Release an admitted ``decision.lease`` with ``release``."""
        request = self.core.request(tenant, units, group=group, ttl=ttl, request_id=request_id)
        return self._run(self.core.try_acquire(request))

    def acquire(
        self,
        tenant: str,
        units: int = 1,
        *,
        group: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Acquisition:
        """A context manager holding a lease; waits up to ``timeout`` on entry.

        Raises ``RequestTooLarge`` at once for a request that can never fit,
        ``AcquireTimeout`` when still refused at the deadline. Arguments are
        validated here, before anything touches Redis.
        """
        request = self.core.request(
            tenant, units, group=group, ttl=ttl, timeout=timeout, request_id=request_id
        )
        return Acquisition(self, lambda: self.core.acquire(request))

    def release(self, lease: LeaseInfo | Lease) -> ReleaseResult:
        """End a lease; idempotent, and says whether it was still live."""
        info = lease.info if isinstance(lease, Lease) else lease
        return self._run(self.core.release(info))

    def renew(self, lease: LeaseInfo | Lease, ttl: float | None = None) -> RenewResult:
        """Extend a live lease; reports whether its tenant is above its fair limit."""
        info = lease.info if isinstance(lease, Lease) else lease
        return self._run(self.core.renew(info, ttl))

    def snapshot(self, group: str, tenants: Iterable[str] = ()) -> GroupSnapshot:
        """Per-tenant used/limit/pending/borrowed and the group's totals, at one moment."""
        return self._run(self.core.snapshot(group, tenants))

    def limit(
        self,
        *,
        tenant: Callable[..., str] | str,
        units: Callable[..., int] | str | int = 1,
        group: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]:
        """Decorate a handler so each call holds a lease while it runs.

        ``tenant`` and ``units`` are callables receiving the handler's
        arguments, names of its parameters, or constants. ``async def``
        handlers are supported: the blocking acquire runs in a worker thread
        so the event loop never blocks.
        """

        def decorate(handler: F) -> F:
            signature = inspect.signature(handler)
            get_tenant = _argument_getter(tenant, "tenant", signature)
            get_units = _argument_getter(units, "units", signature)

            if inspect.iscoroutinefunction(handler):

                @functools.wraps(handler)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    acquisition = self.acquire(
                        get_tenant(*args, **kwargs),
                        get_units(*args, **kwargs),
                        group=group,
                        ttl=ttl,
                        timeout=timeout,
                    )
                    lease = await asyncio.to_thread(acquisition.__enter__)
                    try:
                        return await handler(*args, **kwargs)
                    finally:
                        await asyncio.to_thread(lease.release)

                return cast(F, async_wrapper)

            @functools.wraps(handler)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with self.acquire(
                    get_tenant(*args, **kwargs),
                    get_units(*args, **kwargs),
                    group=group,
                    ttl=ttl,
                    timeout=timeout,
                ):
                    return handler(*args, **kwargs)

            return cast(F, wrapper)

        return decorate

