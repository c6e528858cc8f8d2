"""Where the scripts run: the embedded fakeredis, one Redis URL, and error translation.

A backend maps a route (a group name, or the catalog's) to a redis-py
connection. Connections are made with a socket timeout and *without*
redis-py's automatic retries: a timed-out script call may still have run, so
the only blind retry ratequota allows is after NOSCRIPT (the script certainly
did not run); anything else is for the caller to retry with the same request id.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeGuard, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratequota.clients.connections import ConnectionStack
from ratequota.clients.embedded import prime
from ratequota.clients.functions import Functions
from ratequota.clients.urls import placement_ids, redact, scrub
from ratequota.engine.ops import Command, ScriptCall
from ratequota.engine.resp import pack_evalsha
from ratequota.engine.routing import Rendezvous
from ratequota.errors import BackendError, BackendUnavailable, ConfigError, RateQuotaError

__all__ = [
    "CALL_ERRORS",
    "Backend",
    "ClusterBackend",
    "PackedScripts",
    "ShardedBackend",
    "Shards",
    "SingleBackend",
    "SyncShards",
    "async_no_retry",
    "cluster_url",
    "embedded_backend",
    "embedded_server",
    "fake_server",
    "is_noscript",
    "packed_bytes",
    "pipelined",
    "plain_pool",
    "redact",
    "routes_itself",
    "scrub",
    "translate_error",
    "url_backend",
]


S = TypeVar("S", bound="Shards")


class Backend(Protocol):
    """Connections by route, for the sync client."""

    def connection(self, route: str) -> Any:
        """The connection that serves ``route``."""

    def connections(self) -> Sequence[Any]:
        """Every distinct connection (to load scripts and check health)."""

    def close(self) -> None:
        """Release sockets."""


class Shards:
    """Connections by route, for either client: one server, or shards by rendezvous hashing.

    Placement is decided here once, so the sync and async clients put every
    group on the same shard; subclasses add only how their connections close
    (blocking or awaited).
    """

    def __init__(
        self, clients: Sequence[Any], description: str, ids: Sequence[str] | None = None
    ) -> None:
        self._clients = list(clients)
        self.description = description
        self.routing = None if ids is None else Rendezvous(ids)

    def connection(self, route: str) -> Any:
        """The connection serving ``route`` (a group name, or the catalog's route)."""
        if self.routing is None:
            return self._clients[0]
        return self._clients[self.routing.index(route)]

    def connections(self) -> Sequence[Any]:
        """Every distinct connection, in the order of the URLs."""
        return list(self._clients)

    def nodes(self) -> list[tuple[str, Any]]:
        """(shard id, connection) of every shard, for per-shard checks."""
        if self.routing is None:
            return [(self.description, self._clients[0])]
        return list(zip(self.routing.shard_ids, self._clients, strict=True))

    def node_of(self, route: str) -> str:
        """The id of the shard serving ``route`` (the circuit breakers' key)."""
        return self.description if self.routing is None else self.routing.shard(route)


class SyncShards(Shards):
    """``Shards`` of blocking redis-py clients: a script call goes pre-packed where it can.

    ``packed`` (the backends made from URLs, whose clients ratequota configured
    itself) sends each single script call through ``PackedScripts``, as a
    function call where ``functions`` allows and the server takes one;
    otherwise, and for a client that does not qualify, through the client's
    ``evalsha``.
    """

    def __init__(
        self,
        clients: Sequence[Any],
        description: str,
        ids: Sequence[str] | None = None,
        *,
        packed: bool = False,
        functions: bool = True,
    ) -> None:
        super().__init__(clients, description, ids)
        self._senders = [
            (PackedScripts.of(client, functions, name) if packed else None) or _evalsha_of(client)
            for name, client in self.nodes()
        ]
        #: Perform one script call on the shard serving its route: its reply (or error).
        self.send_script: Callable[[ScriptCall], Any] = (
            self._senders[0] if self.routing is None else self._send_routed
        )

    def _send_routed(self, call: ScriptCall) -> Any:
        assert self.routing is not None
        return self._senders[self.routing.index(call.route)](call)

    def close_senders(self) -> None:
        """Disconnect the packed senders' own connections (the subclasses' ``close``)."""
        for sender in self._senders:
            if isinstance(sender, PackedScripts):
                sender.close()


def routes_itself(backend: object, kind: type[S]) -> TypeGuard[S]:
    """May a client use ``backend``'s packed senders? Only a ``kind`` (``SyncShards`` or
    ``AsyncBackend``) whose ``connection`` nobody overrides: a backend that wraps or
    overrides ``connection`` (a simulation counting calls) must see every script call."""
    return isinstance(backend, kind) and type(backend).connection is Shards.connection


def _evalsha_of(client: Any) -> Callable[[ScriptCall], Any]:
    """The general path: redis-py's ``evalsha`` with the call's pre-encoded arguments."""
    return lambda call: client.evalsha(*call.wire)


#: What ``no_retry()`` treats as a failed attempt (redis-py's default ``Retry`` errors):
#: after one, redis-py disconnects the connection before raising.
_ATTEMPT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
)


class PackedScripts:
    """EVALSHA on a redis-py client's own pool, the command packed by ratequota (sync client;
    ``async_backends.AsyncPackedScripts`` is the asyncio one).

    redis-py encodes every argument of a command in Python and wraps each call
    in retry and observability closures: for a script call of ~18 arguments
    that is as much client CPU as all of ratequota's own work. This sends the
    RESP bytes of ``ScriptCall.packed`` (the same bytes redis-py would send)
    through the connection's public ``send_packed_command`` and
    ``read_response``, on a connection of its own ``ConnectionStack`` (the
    pool's settings and limit, without its per-call bookkeeping),
    and does on failure what ``Redis.execute_command`` does with the
    ``no_retry()`` policy ratequota gives its connections: an error of an
    attempt (connection, timeout) disconnects the connection and is raised,
    never replayed; an error reply (NOSCRIPT...) is raised as it is; a
    connection marked for reconnection is reconnected before it goes back to
    the pool. Timeouts are the connection's own (``socket_timeout``).

    A call that ``packed`` cannot express, and every call while redis-py's own
    OpenTelemetry metrics are enabled (they count each command it executes),
    goes through ``evalsha`` instead.

    ``functions`` (``clients.functions``) says whether the server takes the
    calls as ``FCALL``; a write that must load the library first sends
    ``FUNCTION LOAD`` ahead of the call and reads its reply first.
    """

    def __init__(self, client: Any, functions: bool = True, where: str = "redis") -> None:
        self._client = client
        pool = client.connection_pool
        #: This sender's own connections (``clients.connections``): the pool's limit,
        #: timeout and connection settings, without its per-call bookkeeping.
        self.connections = ConnectionStack(
            pool, getattr(pool, "max_connections", 50), getattr(pool, "timeout", None)
        )
        self.functions = Functions(functions, where)

    @classmethod
    def of(cls, client: Any, functions: bool = True, where: str = "redis") -> PackedScripts | None:
        """A sender for ``client`` (the server ``where``), or None when it is not the plain
        client this mirrors (``plain_pool``: a ``redis.Redis`` made as ratequota makes its own)."""
        if plain_pool(client, redis.Redis, no_retry()) is None:
            return None
        return cls(client, functions, where)

    def __call__(self, call: ScriptCall) -> Any:
        """Send ``call`` and read its reply, as ``client.evalsha(*call.wire)`` would."""
        functions = self.functions
        packed = packed_bytes(call, functions)
        if packed is None:
            return self._client.evalsha(*call.wire)
        load = functions.take_load() if functions.due else None
        stack = self.connections
        conn = stack.take()
        try:
            if load is None:
                conn.send_packed_command((packed,))
            else:
                conn.send_packed_command((load, packed))
                functions.loaded(_reply_or_error(conn))
            return conn.read_response()
        except redis.exceptions.ResponseError as exc:
            raise functions.answer(exc) from None
        except _ATTEMPT_ERRORS as exc:
            conn.disconnect()
            if load is not None:  # the load may not have been read: load again next time
                functions.loaded(exc)
            raise
        finally:
            try:
                if conn.should_reconnect():
                    conn.disconnect()
                    conn.connect()
            finally:
                stack.give(conn)

    def close(self) -> None:
        """Disconnect this sender's connections (the client's pool is closed apart)."""
        self.connections.close()


def plain_pool(client: Any, kind: type, retry: object) -> Any:
    """The connection pool of ``client`` if the packed path may use it, else None (both clients).

    Only a client of exactly ``kind`` (``redis.Redis`` or ``redis.asyncio.Redis``; not a
    subclass such as fakeredis's) on a connection pool (not a single-connection client),
    whose connections encode UTF-8 strictly (the packed bytes are UTF-8) and never retry
    (``retry``: the ``no_retry()`` policy ratequota gives them, whose failure handling the
    packed path mirrors), whose ``EVALSHA`` replies have no response callback, and whose
    pool hands out a connection without naming the command (redis-py >= 5.3).
    """
    if type(client) is not kind or getattr(client, "connection", None) is not None:
        return None
    if getattr(client, "single_connection_client", False):  # asyncio's connects lazily
        return None
    pool: Any = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict) or not _takes_no_arguments(pool.get_connection):
        return None
    if kwargs.get("encoding", "utf-8").lower().replace("_", "-") not in ("utf-8", "utf8"):
        return None
    if kwargs.get("encoding_errors", "strict") != "strict":
        return None
    if kwargs.get("retry") != retry:  # the failure handling of the packed path is no_retry()'s
        return None
    callbacks: Any = getattr(client, "response_callbacks", None)
    if callbacks is None or callbacks.get("EVALSHA") is not None:
        return None
    return pool


def _reply_or_error(conn: Any) -> Any:
    """The next reply on ``conn``, an error reply returned rather than raised (a
    connection's error is raised: the caller drops the connection)."""
    try:
        return conn.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def packed_bytes(call: ScriptCall, functions: Functions | None = None) -> bytes | None:
    """What a packed path sends for ``call``, or None to leave the call to ``evalsha``.

    ``EVALSHA``, or ``FCALL`` when ``functions`` says the server takes it.
    None for a call ``engine.resp`` cannot pack (an argument neither ``int``
    nor ``str``), and for every call while redis-py's own OpenTelemetry
    metrics are enabled: they count each command its ``execute_command`` runs.
    """
    if _OBSERVABILITY is not None and _OBSERVABILITY().is_enabled():
        return None
    if functions is None:
        return pack_evalsha(call.script.sha, call.keys, call.args)  # ``call.packed``
    return functions.pack(call)


def _takes_no_arguments(method: Callable[..., Any]) -> bool:
    """Can ``method`` be called without arguments? (``get_connection`` before redis-py 5.3
    required the command's name.)"""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return all(p.default is not p.empty or p.kind in variadic for p in parameters)


# Are redis-py's own OpenTelemetry metrics on? ``_OBSERVABILITY().is_enabled()`` says (from
# redis-py 8; earlier versions have no metrics of their own).
try:
    from redis.observability.providers import get_observability_instance as _OBSERVABILITY
except ImportError:  # pragma: no cover
    _OBSERVABILITY = None  # type: ignore[assignment]


class SingleBackend(SyncShards):
    """One Redis (real or fake) serves every group."""

    def __init__(
        self, client: Any, description: str, *, packed: bool = False, functions: bool = True
    ) -> None:
        super().__init__([client], description, packed=packed, functions=functions)

    def close(self) -> None:
        """Close the connection pool and the packed sender's connections."""
        self.close_senders()
        self._clients[0].close()


def _redis_from_url(
    url: str, socket_timeout: float, *, aio: bool = False, max_connections: int = 50
) -> Any:
    """One redis-py client for ``url``: timeouts on every call, no automatic replay.

    ``aio`` makes a ``redis.asyncio`` client (for ``AsyncQuotaClient``) instead.
    ``max_connections`` bounds the sync client's pool (and so its packed sender's own
    connections, ``PackedScripts``).
    """
    if not isinstance(url, str) or not url:
        raise ConfigError("url", f"must be a redis:// URL, got {url!r}")
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }
    try:
        if aio:
            from redis.asyncio import Redis as AsyncRedis

            if url.startswith("redis://"):
                options["connection_class"] = _hiredis_async_connection_class()
            # The async client bounds its connections per shard itself (its batcher).
            return AsyncRedis.from_url(url, retry=async_no_retry(), **options)
        # Many threads may share one client: when the pool's connections are all in use a
        # caller waits for one, at most socket_timeout, instead of failing at once.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            timeout=socket_timeout,
            retry=no_retry(),
            max_connections=max_connections,
            **options,
        )
        return redis.Redis.from_pool(pool)
    except ValueError as exc:
        raise ConfigError("url", f"{scrub(str(exc), url)} in {redact(url)}") from None


@functools.cache
def _hiredis_async_connection_class() -> Any:
    """An asyncio connection that packs commands with hiredis, as the sync client does.

    redis.asyncio packs every argument in pure Python; for a script call with a
    dozen arguments that is a quarter of the async client's CPU time. The sync
    client's hiredis serializer produces the same bytes. Without hiredis the
    stock class is used.
    """
    from redis.asyncio.connection import Connection
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return Connection
    serializer = HiredisRespSerializer()  # type: ignore[no-untyped-call]

    class HiredisPackingConnection(Connection):
        def pack_command(self, *args: Any) -> list[bytes]:
            return serializer.pack(*args)  # type: ignore[no-any-return]

    return HiredisPackingConnection


def no_retry() -> Retry:
    """redis-py retry policy that never replays a command."""
    return Retry(NoBackoff(), 0)


def async_no_retry() -> Any:
    """``no_retry()`` for ``redis.asyncio`` connections (its own ``Retry`` class)."""
    from redis.asyncio.retry import Retry as AsyncRetry

    return AsyncRetry(NoBackoff(), 0)


def url_backend(
    url: str, *, socket_timeout: float, functions: bool = True, max_connections: int = 50
) -> SingleBackend:
    """A backend on one Redis URL (``redis://``, ``rediss://`` or ``unix://``)."""
    client = _redis_from_url(url, socket_timeout, max_connections=max_connections)
    return SingleBackend(client, _redact(url), packed=True, functions=functions)


_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED_SERVER: Any = None


def embedded_backend(*, shared: bool = True, server: Any = None) -> SingleBackend:
    """An in-process fakeredis with Lua, for trying ratequota with nothing installed.

    ``shared`` clients in one process see the same server, like pods on one
    Redis; ``testing`` makes private ones, or passes the ``fakeredis.FakeServer``
    several clients should share.
    """
    import fakeredis

    return SingleBackend(fakeredis.FakeRedis(server=fake_server(shared, server)), EMBEDDED)


#: The embedded store's description (both clients').
EMBEDDED = "embedded fakeredis"


def fake_server(shared: bool, server: Any) -> Any:
    """The ``fakeredis.FakeServer`` an embedded backend of either client uses."""
    import fakeredis

    if server is None:
        server = embedded_server() if shared else fakeredis.FakeServer()
    return prime(server)  # each script compiled once, as Redis does (clients.embedded)


def embedded_server() -> Any:
    """The process-wide ``fakeredis.FakeServer`` shared by sync and async embedded clients."""
    import fakeredis

    global _EMBEDDED_SERVER
    with _EMBEDDED_LOCK:  # held only to create the server object, never across I/O
        if _EMBEDDED_SERVER is None:
            _EMBEDDED_SERVER = fakeredis.FakeServer()
        return _EMBEDDED_SERVER


#: The name the rest of the package has used for ``redact``.
_redact = redact


#: A call's own error reply (the script failed or was refused): a batch answers it in
#: place, as a pipeline does; any other error (the connection) fails the whole batch.
CALL_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ResponseError,)


def pipelined(conn: Any, calls: Sequence[tuple[Any, ...]]) -> Any:
    """Send script calls on one pipeline (no transaction), error replies in place.

    Returns the replies, or for a ``redis.asyncio`` connection what to await for them.
    """
    pipe = conn.pipeline(transaction=False)
    for args in calls:
        pipe.evalsha(*args)
    return pipe.execute(raise_on_error=False)


def pipelined_commands(conn: Any, commands: Sequence[Command]) -> Any:
    """Send plain commands on one pipeline (no transaction); an error reply raises.

    Returns the replies, or for a ``redis.asyncio`` connection what to await for them.
    """
    pipe = conn.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command.args)
    return pipe.execute()


def is_noscript(exc: BaseException) -> bool:
    """True for Redis's NOSCRIPT: the script certainly did not run."""
    return isinstance(exc, redis.exceptions.NoScriptError)


def translate_error(exc: BaseException, where: str) -> RateQuotaError:
    """A ratequota error for a redis-py error (raise it ``from exc``)."""
    if isinstance(
        exc,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            # A cluster mid-failover or mid-resharding: no node could serve the slot.
            redis.exceptions.ClusterError,
            redis.exceptions.TryAgainError,
            redis.exceptions.RedisClusterException,
        ),
    ):
        return BackendUnavailable(f"Redis at {where} is unavailable: {exc}")
    if isinstance(exc, OSError):
        return BackendUnavailable(f"Redis at {where} is unavailable: {exc}")
    return BackendError(f"Redis at {where} answered with an error: {exc}")


class ShardedBackend(SyncShards):
    """Independent Redis servers; each group lives on the one rendezvous hashing picks.

    Shard ids default to the redacted URLs, so the order of the list does not
    matter; pass ``shard_ids`` to keep placement stable when a host name changes.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        socket_timeout: float,
        shard_ids: Sequence[str] | None = None,
        functions: bool = True,
        max_connections: int = 50,
    ) -> None:
        ids = placement_ids(urls, shard_ids)
        clients = [
            _redis_from_url(u, socket_timeout, max_connections=max_connections) for u in urls
        ]
        super().__init__(clients, f"{len(urls)} shards", ids, packed=True, functions=functions)

    def close(self) -> None:
        """Close every shard's pool and packed sender's connections."""
        self.close_senders()
        for client in self._clients:
            client.close()


def cluster_url(url: object) -> str:
    """``url`` if it can name a cluster node (both cluster backends start from one)."""
    if not isinstance(url, str) or not url:
        raise ConfigError("cluster", f"must be a redis:// URL of a cluster node, got {url!r}")
    return url


class ClusterRouting:
    """What the sync and async cluster backends share: one client that routes by slot.

    Subclasses set ``_cluster`` (a redis-py cluster client) and ``description``.
    """

    _cluster: Any
    description: str

    #: redis-py's cluster pipeline refuses EVALSHA (and would re-send timed-out
    #: commands): batches of script calls are sent call by call.
    pipelines = False

    @property
    def cluster(self) -> Any:
        """The underlying redis-py cluster client."""
        return self._cluster

    def connection(self, route: str) -> Any:
        """The cluster client: it sends each call to the node owning the keys' slot."""
        return self._cluster

    def connections(self) -> Sequence[Any]:
        """The cluster client; ``SCRIPT LOAD`` through it reaches every primary."""
        return [self._cluster]

    def _primary_of(self, route: str) -> str:
        """Name of the primary owning ``route``'s slot, as the client last saw the topology."""
        from ratequota.engine.keys import KeySpace, escape_tag

        catalog = KeySpace().catalog_route
        tag = catalog if route == catalog else escape_tag(route)
        slot = self._cluster.keyslot("{" + tag + "}")
        return str(self._cluster.nodes_manager.get_node_from_slot(slot).name)


class ClusterBackend(ClusterRouting):
    """A Redis Cluster through redis-py's cluster client; the hash tag places each group.

    Every script call names only keys of one group, which share the group's
    hash tag, so no call is ever cross-slot. redis-py follows MOVED and ASK
    redirections (and waits out TRYAGAIN during a slot migration) by itself:
    those answers mean the command did not run, so following them replays
    nothing. Its retries after a connection error or timeout are switched off:
    a timed-out script may have run.
    """

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        from redis.connection import parse_url

        try:
            parse_url(cluster_url(url))  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ConfigError("cluster", scrub(str(exc), url)) from None
        self._url = url
        self._socket_timeout = socket_timeout
        self._client: Any = None
        self._lock = threading.Lock()
        self.description = f"cluster at {_redact(url)}"

    @property
    def _cluster(self) -> Any:
        """The cluster client, connected on first use.

        redis-py's cluster client discovers the topology in its constructor;
        doing that here keeps the client's constructor free of I/O, so a pod
        that starts while a node is down or paused starts anyway and its first
        call gets the ``BackendUnavailable`` its failure mode handles. Threads
        that race here may each connect; one client is kept and the other
        closed (the lock guards only the assignment, never the network).
        """
        client = self._client
        if client is not None:
            return client
        client = self._connect()
        with self._lock:
            kept = self._client
            if kept is None:
                self._client = kept = client
        if kept is not client:
            self._close_client(client)
        return kept

    def _connect(self) -> Any:
        from redis.cluster import RedisCluster

        try:
            return RedisCluster(
                url=self._url,
                retry=no_retry(),
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._socket_timeout,
            )
        except ValueError as exc:
            raise ConfigError("cluster", scrub(str(exc), self._url)) from None
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            error = translate_error(exc, _redact(self._url))
            raise type(error)(scrub(str(error), self._url)) from None

    def nodes(self) -> list[tuple[str, Any]]:
        """(node name, direct connection) of every primary, for per-node checks."""
        return [
            (node.name, self._cluster.get_redis_connection(node))
            for node in self._cluster.get_primaries()
        ]

    def node_of(self, route: str) -> str:
        """The primary owning the slot of ``route``'s keys (as the client last saw it)."""
        return self._primary_of(route)

    def close(self) -> None:
        """Close every node's pool (nothing to do if it never connected)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._close_client(client)

    @staticmethod
    def _close_client(client: Any) -> None:
        client.close()
        # RedisCluster.close() leaves the node pools it was given open (redis-py
        # closes only pools it created itself): disconnect them explicitly.
        for node in list(client.nodes_manager.nodes_cache.values()):
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
