"""What the sync and async clients share beyond the core: stepping flows, leases, decorators.

The clients are thin shells: each only *performs* wire operations (blocking
or awaited). Everything else they have in common lives here, once:

- ``Runner`` steps a core flow: it turns the flow's ops into wire ops, applies
  the per-shard circuit breaker before each call, the NOSCRIPT rule (load the
  script and retry exactly once: the script certainly did not run), and
  translates redis-py errors into ``ratequota`` errors thrown back into the flow.
- ``LoadScript`` / ``Batch``: wire ops beyond the core's (``Batch`` pipelines
  several script calls to one shard in one round trip).
- ``LeaseBase``: a held lease's bookkeeping (renewal results, loss, release).
- ``handler_arguments``: how the ``limit`` decorator reads tenant and units.

No lock is taken here; ``Breakers`` guard their few integers themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypedDict, TypeVar

import attrs
import redis

from ratequota.clients.backends import is_noscript, translate_error
from ratequota.clients.core import AcquireRequest, Command, QuotaCore, Settings, Sleep
from ratequota.clients.failure import Breakers
from ratequota.clock import Clock
from ratequota.decision import LeaseInfo, ReleaseResult, RenewResult
from ratequota.engine.protocol import ScriptCall
from ratequota.errors import BackendUnavailable, InvalidRequest, InvalidType, RateQuotaError
from ratequota.observe import LostCause, Observer

__all__ = [
    "AcquireOptions",
    "AcquisitionBase",
    "Batch",
    "ClientBase",
    "LeaseBase",
    "LoadScript",
    "Runner",
    "TenantSpec",
    "TryOptions",
    "UnitsSpec",
    "WaitOptions",
    "call_name",
    "handler_arguments",
    "make_core",
    "node_lookup",
    "pipeline_args",
    "wire_call",
]

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")

#: redis-py's own errors (cluster errors do not all derive from RedisError).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)


#: What the ``limit`` decorator reads the tenant and the units from.
TenantSpec = Callable[..., str] | str
UnitsSpec = Callable[..., int] | str | int


class WaitOptions(TypedDict, total=False):
    """Keyword options of ``acquire`` and ``limit`` in both clients.

    ``group``: charge this group instead of the tenant's routed one; ``ttl``:
    lease lifetime in seconds (default ``Settings.lease_ttl``); ``timeout``:
    how long to wait (default ``Settings.timeout``; 0 never waits).
    """

    group: str | None
    ttl: float | None
    timeout: float | None


class TryOptions(TypedDict, total=False):
    """Keyword options of ``try_acquire``: ``group`` and ``ttl`` as for ``acquire``,
    ``request_id`` to make a retried call idempotent (the lease id)."""

    group: str | None
    ttl: float | None
    request_id: str | None


class AcquireOptions(WaitOptions, total=False):
    """Keyword options of ``acquire``: ``WaitOptions`` plus ``request_id``."""

    request_id: str | None


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


@attrs.frozen
class LoadScript:
    """``SCRIPT LOAD source`` on the shard of ``route``, then perform ``then``."""

    route: str
    source: str
    then: Any


@attrs.frozen
class Batch:
    """Several script calls to the shard of ``route``, pipelined in one round trip.

    The reply is a list with one entry per call: its reply, or the exception
    it raised (the other calls are unaffected).
    """

    route: str
    calls: tuple[ScriptCall, ...]


def wire_call(op: ScriptCall | Command | LoadScript) -> tuple[str, tuple[Any, ...]]:
    """The redis-py method and arguments performing ``op``."""
    if isinstance(op, Command):
        return "execute_command", op.args
    if isinstance(op, LoadScript):
        return "script_load", (op.source,)
    return "evalsha", (op.script.sha, len(op.keys), *op.keys, *op.args)


def call_name(op: ScriptCall | Command | LoadScript | Batch) -> str:
    """How a Redis call is labelled in metrics: its script, its command, or ``script_load``.

    A pipelined ``Batch`` is one round trip, named by the script of its calls.
    """
    if isinstance(op, ScriptCall):
        return op.script.name
    if isinstance(op, Command):
        return str(op.args[0]).lower()
    if isinstance(op, LoadScript):
        return "script_load"
    return op.calls[0].script.name if op.calls else "pipeline"


def pipeline_args(batch: Batch) -> list[tuple[Any, ...]]:
    """The EVALSHA arguments of each call of a batch, in order."""
    return [wire_call(call)[1] for call in batch.calls]


class Runner(Generic[T]):
    """Steps one flow; the shell performs ``op`` and reports with ``send`` or ``throw``.

    The shell's whole loop: ``while run.op is not None: run.step(perform)``
    (``await run.astep(perform)`` in the async client), then ``run.result()``.
    With an ``observer``, every perform but a sleep is timed on ``clock`` and
    reported as one Redis call (the one place both clients are measured).
    """

    def __init__(
        self,
        flow: Generator[Any, Any, T],
        breakers: Breakers,
        node_of: Callable[[str], object],
        where: str,
        *,
        observer: Observer | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._flow = flow
        self._breakers = breakers
        self._node_of = node_of
        self._where = where
        self._observer = observer
        self._clock = clock
        self.op: Any = None
        self._result: Any = None
        self._reloaded = False
        self._partial: list[Any] | None = None
        self._missing: list[int] = []
        self._advance(None, None)

    def step(self, perform: Callable[[Any], Any]) -> None:
        """Perform ``op`` with a blocking ``perform`` and feed the outcome to the flow."""
        op, began = self.op, self._began()
        try:
            value = perform(op)
        except Exception as exc:  # translated into a ratequota error, or re-raised if a bug
            self._timed(op, began, is_noscript(exc))
            self.throw(exc)
        else:
            self._timed(op, began, True)
            self.send(value)

    async def astep(self, perform: Callable[[Any], Awaitable[Any]]) -> None:
        """``step`` for an awaitable ``perform``."""
        op, began = self.op, self._began()
        try:
            value = await perform(op)
        except Exception as exc:
            self._timed(op, began, is_noscript(exc))
            self.throw(exc)
        else:
            self._timed(op, began, True)
            self.send(value)

    def _began(self) -> float | None:
        if self._observer is None or self._clock is None or isinstance(self.op, Sleep):
            return None
        return self._clock()

    def _timed(self, op: Any, began: float | None, ok: bool) -> None:
        """Report one round trip; a NOSCRIPT reply is not an error (the script loads, once)."""
        if began is None:
            return
        assert self._observer is not None and self._clock is not None
        seconds = max(0.0, self._clock() - began)
        self._observer.redis_call(str(self._node_of(op.route)), call_name(op), seconds, ok)

    def result(self) -> T:
        """The flow's return value, once ``op`` is None."""
        assert self.op is None
        return self._result  # type: ignore[no-any-return]

    def _advance(self, value: Any, error: BaseException | None) -> None:
        while True:
            try:
                op = self._flow.send(value) if error is None else self._flow.throw(error)
            except StopIteration as stop:
                self.op, self._result = None, stop.value
                return
            value = error = None
            self._reloaded, self._partial = False, None
            if not isinstance(op, Sleep):
                error = self._breakers.refuse(self._node_of(op.route), self._where)
            if error is None:
                self.op = op
                return

    def send(self, value: Any) -> None:
        """``op`` succeeded with ``value``."""
        op = self.op
        if isinstance(op, Sleep):
            self._advance(value, None)
            return
        self._breakers.record(self._node_of(op.route), True)
        if isinstance(op, LoadScript):
            self.op = op.then
            return
        if isinstance(op, Batch):
            value = self._batch_reply(op, list(value))
            if value is None:
                return
        self._advance(value, None)

    def _batch_reply(self, op: Batch, replies: list[Any]) -> list[Any] | None:
        """Merge a batch's replies; on NOSCRIPT load once and re-send only those calls."""
        if self._partial is not None:
            merged = self._partial
            for index, reply in zip(self._missing, replies, strict=True):
                merged[index] = reply
            return merged
        missing = [i for i, r in enumerate(replies) if is_noscript(r)]
        if not missing:
            return replies
        self._partial, self._missing = replies, missing
        retry: Batch | LoadScript = Batch(op.route, tuple(op.calls[i] for i in missing))
        for source in {op.calls[i].script.source for i in missing}:
            retry = LoadScript(op.route, source, retry)
        self.op = retry
        return None

    def throw(self, exc: BaseException) -> None:
        """``op`` raised ``exc``; anything not from Redis is re-raised (a bug, not an outage)."""
        op = self.op
        if isinstance(op, ScriptCall) and is_noscript(exc) and not self._reloaded:
            # Restart, failover or SCRIPT FLUSH: load and retry exactly once.
            self._reloaded = True
            self.op = LoadScript(op.route, op.script.source, op)
            return
        if isinstance(exc, RateQuotaError):
            error: RateQuotaError = exc
        elif isinstance(exc, REDIS_ERRORS):
            error = translate_error(exc, self._where)
            error.__cause__ = exc
        else:
            self._flow.close()
            raise exc
        if not isinstance(op, Sleep):
            ok = not isinstance(error, BackendUnavailable)
            self._breakers.record(self._node_of(op.route), ok)
        self._advance(None, error)


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


def handler_arguments(
    handler: Callable[..., Any], tenant: object, units: object
) -> Callable[..., tuple[Any, Any]]:
    """How the ``limit`` decorator reads (tenant, units) from one call of ``handler``.

    Each spec is a callable receiving the handler's arguments, the name of one
    of its parameters, or (for ``units``) a constant. A string that names no
    parameter is an error at decoration time, never a tenant of that name: a
    misspelt ``tenant="tenat"`` would otherwise charge a tenant called "tenat".
    A fixed tenant is a callable (``tenant=lambda *a, **k: "acme"``).
    """
    signature = inspect.signature(handler)
    get_tenant = _argument_getter(tenant, "tenant", signature)
    get_units = _argument_getter(units, "units", signature)
    return lambda *a, **k: (get_tenant(*a, **k), get_units(*a, **k))


def _argument_getter(spec: object, name: str, signature: inspect.Signature) -> Callable[..., Any]:
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in signature.parameters:
            known = ", ".join(signature.parameters) or "none"
            raise InvalidRequest(
                name,
                f"{spec!r} names no parameter of the handler (its parameters: {known}); "
                f"for a fixed {name}, pass a callable such as lambda *args, **kwargs: {spec!r}",
            )

        def from_parameter(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return bound.arguments[spec]

        return from_parameter
    return lambda *a, **k: spec


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
                else kind.url_backend(url, socket_timeout=timeout)
            )
        self.backend = backend
        self._node_of = node_lookup(backend)
        self._where = str(getattr(backend, "description", "redis"))
        self._start()

    def _start(self) -> None:
        """The client's own set-up, once the backend is known."""

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
