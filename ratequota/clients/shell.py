"""What the sync and async clients share beyond the core: leases, decorators, construction.

The clients are thin shells: each only *performs* wire operations (blocking
or awaited); ``ratequota.clients.runner`` steps their flows. Everything else
they have in common lives here, once:

- ``LeaseBase``: a held lease's bookkeeping (renewal results, loss, release).
- ``AcquisitionBase``: the bookkeeping of ``acquire``'s context manager.
- ``ClientBase``: construction and the topology constructors.

No lock is taken here; ``Breakers`` guard their few integers themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import attrs

from ratequota.clients import probes
from ratequota.clients.core import QuotaCore
from ratequota.clients.failure import FailureStats
from ratequota.clients.readiness import ReadinessReport
from ratequota.clients.requests import (
    AcquireRequest,
    TenantSpec,
    UnitsSpec,
    handler_arguments,
    meter_arguments,
)
from ratequota.clients.runner import Runner
from ratequota.clients.settings import Settings
from ratequota.clock import Clock
from ratequota.decision import LeaseInfo, MeterResult, ReleaseResult, RenewResult
from ratequota.engine.ops import Flow
from ratequota.errors import (
    BackendError,
    BackendUnavailable,
    InvalidType,
    RateQuotaError,
)
from ratequota.observe import LostCause, Observer
from ratequota.policy import Policy

__all__ = [
    "RELEASE_ERRORS",
    "AcquisitionBase",
    "ClientBase",
    "LeaseBase",
    "make_core",
    "node_lookup",
]

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")

#: Errors a release on leaving ``acquire`` absorbs: Redis could not do it (unreachable,
#: out of memory, an ACL or script error). Anything else is a bug and propagates.
RELEASE_ERRORS: tuple[type[RateQuotaError], ...] = (BackendUnavailable, BackendError)


def make_core(
    settings: Settings | None,
    clock: Clock | None,
    options: dict[str, Any],
    observer: Observer | None = None,
) -> QuotaCore:
    """The core of a new client, from ``settings`` or from ``Settings`` fields given as options."""
    if settings is not None and options:
        raise InvalidType("settings", "pass either settings=... or its fields, not both")
    return QuotaCore(settings or Settings(**options), clock, observer)


@attrs.define(eq=False)
class LeaseBase:
    """A held lease: the granted facts and what renewals and release learned.

    ``over_limit`` is the last renewal's hint that a lender wants capacity
    back (finish soon, start nothing more); ``lost`` becomes true when a
    renewal or release finds the lease had already expired (the holder overran
    its TTL and its units may be reused: stop trusting ``token``) or was
    fenced (its id now names a newer lease). Release and renew name the
    lease's tenant and token, so a lease object only ever ends or extends
    its own lease.
    ``synthetic`` leases were granted locally while Redis was unreachable.
    """

    info: LeaseInfo
    ttl: float | None = None
    over_limit: bool = False
    lost: bool = False
    released: bool = False
    #: The client's observer, told once when the lease is found lost.
    observer: Observer | None = attrs.field(default=None, kw_only=True, repr=False)

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

    @property
    def meters(self) -> tuple[MeterResult, ...]:
        """The rate meters decided with this lease at admission (see ``Decision.meters``)."""
        return self.info.meters

    @property
    def synthetic(self) -> bool:
        """True for a lease granted locally under fail-open or local allowance."""
        return self.info.synthetic

    def renewed(self, result: RenewResult) -> RenewResult:
        """Record a renewal's outcome."""
        cause = self.record_renewal(result)
        if cause is not None and self.observer is not None:
            self.observer.lease_lost(self.info, cause)
        return result

    def record_renewal(self, result: RenewResult) -> LostCause | None:
        """``renewed`` without telling the observer: how the lease was lost, if it just was."""
        if result.renewed:
            self.info = attrs.evolve(self.info, expires_at=result.expires_at)
            self.over_limit = result.over_limit
            return None
        cause: LostCause = "fenced" if result.reason == "fenced" else "expired"
        newly = not self.lost
        self.lost = True
        return cause if newly else None

    def ended(self, result: ReleaseResult) -> ReleaseResult:
        """Record the release's outcome."""
        self.released = True
        if result.state == "expired":
            self.mark_lost("expired")
        elif result.state == "fenced":
            self.mark_lost("fenced")
        return result

    def mark_lost(self, cause: LostCause) -> None:
        """The lease is gone (``cause`` says how); the observer hears it once per lease."""
        if not self.lost and self.observer is not None:
            self.observer.lease_lost(self.info, cause)
        self.lost = True


L = TypeVar("L", bound=LeaseBase)


class AcquisitionBase(Generic[L]):
    """The bookkeeping of ``acquire``'s context manager, for both clients.

    On entry the granted lease is wrapped for its client and handed to the
    client's renewer; on exit the lease still held (if any) is given back.
    The shells only add the blocking or awaited calls.
    """

    def __init__(self, client: Any, request: AcquireRequest, lease: Callable[..., L]) -> None:
        self._client = client
        self._request = request
        self._make_lease = lease
        self._lease: L | None = None

    def _acquire_flow(self) -> Generator[Any, Any, LeaseInfo]:
        return self._client.core.acquire(self._request)  # type: ignore[no-any-return]

    def _granted(self, info: LeaseInfo) -> L:
        observer = self._client.core.observer
        lease = self._make_lease(
            info, self._request.ttl_ms / 1000, client=self._client, observer=observer
        )
        self._client.renewer.hold(lease)
        self._lease = lease
        if observer is not None:
            observer.lease_held(info)
        return lease

    def _leaving(self) -> L | None:
        """The lease to give back on exit, if it is still held."""
        lease, self._lease = self._lease, None
        if lease is not None and lease.observer is not None:
            lease.observer.lease_ended(lease.info)
        return lease if lease is not None and not lease.released else None

    def _release_failed(self, lease: L, error: RateQuotaError) -> None:
        """The release on exit failed (Redis unreachable, out of memory, refused): absorb it.

        Raising here would replace the handler's result, or its own exception,
        with ours. The lease ends by itself at its expiry; the failure is
        counted (``stats().release_failures``) and logged.
        """
        self._client.core.failure.release_failed(lease.info, error)


def node_lookup(backend: object) -> Callable[[str], object]:
    """The shard key of a route, for per-shard breakers (one key if the backend has one shard)."""
    node_of = getattr(backend, "node_of", None)
    if callable(node_of):
        return node_of  # type: ignore[no-any-return]
    return lambda route: "redis"


class ClientBase:
    """What both clients do alike before any I/O: construction and the topology constructors.

    A client class names its backend factories (``embedded_backend``,
    ``url_backend``, ``sharded_backend``, ``cluster_backend``) and finishes its
    own set-up in ``_start``; the settings are built once here, so both
    clients read ``socket_timeout`` and shard ids the same way.
    """

    embedded_backend: ClassVar[Callable[[], Any]]
    url_backend: ClassVar[Callable[..., Any]]
    sharded_backend: ClassVar[Callable[..., Any]]
    cluster_backend: ClassVar[Callable[..., Any]]
    #: The settings the URL and shard factories take besides ``socket_timeout`` and
    #: ``functions`` (the sync client's connection limit; the async client bounds its
    #: round trips with ``batch_in_flight``).
    connection_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        url: str | None = None,
        *,
        backend: Any = None,
        settings: Settings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
        **options: Any,
    ) -> None:
        """Connect to ``url`` (or the embedded default); ``options`` are ``Settings`` fields.

        ``observer`` (e.g. ``ratequota.metrics.PrometheusMetrics``) is told of
        every decision, Redis call, held and lost lease (``ratequota.observe``).
        """
        self.core = make_core(settings, clock, options, observer)
        if backend is None:
            timeout = self.core.settings.socket_timeout
            kind = type(self)
            backend = (
                kind.embedded_backend()
                if url is None
                else kind.url_backend(
                    url,
                    socket_timeout=timeout,
                    functions=self.core.settings.functions,
                    **kind.connection_options(self.core.settings),
                )
            )
        self.backend = backend
        self._node_of = node_lookup(backend)
        self._where = str(getattr(backend, "description", "redis"))
        self._start()

    @classmethod
    def connection_options(cls, settings: Settings) -> dict[str, Any]:
        """The ``connection_settings`` of ``settings``, as the factories take them."""
        return {name: getattr(settings, name) for name in cls.connection_settings}

    def _start(self) -> None:
        """The client's own set-up, once the backend is known."""

    def _runner(self, flow: Generator[Any, Any, T]) -> Runner[T]:
        """A runner for ``flow`` with this client's breakers, routing, observer and clock."""
        core = self.core
        return Runner(
            flow,
            core.breakers,
            self._node_of,
            self._where,
            observer=core.observer,
            clock=core.clock.monotonic,
        )

    def _publish(self, policy: Policy | str | Path, migrate: bool) -> Flow[dict[str, int]]:
        """``apply_policy`` of either client as a flow; a path is read as a TOML policy file."""
        if isinstance(policy, (str, Path)):
            policy = Policy.from_toml(policy)
        return self.core.apply_policy(policy, migrate=migrate)

    def _acquisition_of(
        self, handler: Callable[..., Any], tenant: TenantSpec, units: UnitsSpec, options: Any
    ) -> Callable[..., Any]:
        """What ``limit`` enters around each call of ``handler``: this client's ``acquire``.

        ``tenant`` and ``units`` are read from the call's arguments
        (``requests.handler_arguments``, which also rejects a misspelled name
        at decoration time); the shells add only ``with`` or ``async with``.
        """
        arguments = handler_arguments(handler, tenant, units)
        rest, amounts = meter_arguments(handler, options)
        acquire = self.acquire  # type: ignore[attr-defined]

        def acquisition(*args: Any, **kwargs: Any) -> Any:
            who, how_many = arguments(*args, **kwargs)
            return acquire(who, how_many, **rest, **amounts(*args, **kwargs))

        return acquisition

    def stats(self) -> FailureStats:
        """Counters: fail-open and local admissions, fast failures, fenced releases/renewals."""
        stats = self.core.failure.stats(self.core.breakers.fast_failures)
        return attrs.evolve(stats, fenced_refusals=self.core.fenced_refusals)

    def _load_rounds(self, strict: bool) -> probes.Rounds[None]:
        """``load_scripts`` of either client, as rounds its driver runs."""
        return probes.load_everywhere(self.backend.connections(), self._where, strict=strict)

    def _check_rounds(
        self,
        nodes: list[tuple[str, Callable[..., Any]]],
        node_of: Callable[[str], str],
        groups: Iterable[str] | None,
        allow_degraded: bool,
    ) -> probes.Rounds[ReadinessReport]:
        """``check()`` of either client, as rounds its driver runs."""
        keyspace = self.core.keyspace
        return probes.check(
            nodes,
            node_of,
            self.backend.connection(keyspace.catalog_route).execute_command,
            keyspace,
            groups,
            socket_timeout=self.core.settings.socket_timeout,
            allow_degraded=allow_degraded,
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """A client on one Redis server, e.g. ``redis://localhost:6379/0``."""
        return cls(url, **options)

    @classmethod
    def sharded(
        cls,
        urls: Iterable[str],
        *,
        shard_ids: Iterable[str] | None = None,
        settings: Settings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
        **options: Any,
    ) -> Self:
        """A client on independent Redis shards; each group lives on one (rendezvous hashing).

        ``shard_ids`` name the shards for placement (default: the URLs without
        passwords); keep them stable and every pod and release agrees on where
        each group lives. Other options are the constructor's.
        """
        core = make_core(settings, clock, options)
        backend = cls.sharded_backend(
            list(urls),
            socket_timeout=core.settings.socket_timeout,
            shard_ids=None if shard_ids is None else list(shard_ids),
            functions=core.settings.functions,
            **cls.connection_options(core.settings),
        )
        return cls(backend=backend, settings=core.settings, clock=clock, observer=observer)

    @classmethod
    def cluster(
        cls,
        url: str,
        *,
        settings: Settings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
        **options: Any,
    ) -> Self:
        """A client on a Redis Cluster, given any node's URL; the hash tag places each group.

        Options are the constructor's (``settings=`` or its fields, ``clock=``).
        """
        core = make_core(settings, clock, options)
        backend = cls.cluster_backend(url, socket_timeout=core.settings.socket_timeout)
        return cls(backend=backend, settings=core.settings, clock=clock, observer=observer)
