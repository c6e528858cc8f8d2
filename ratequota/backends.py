"""Where the scripts run: the embedded fakeredis, one Redis URL, and error translation.

A backend maps a route (a group name, or the catalog's) to a redis-py
connection. Connections are made with a socket timeout and *without*
redis-py's automatic retries: a timed-out script call may still have run, so
the only blind retry ratequota allows is after NOSCRIPT (the script certainly
did not run); anything else is for the caller to retry with the same request id.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratequota.errors import BackendError, BackendUnavailable, ConfigError, RateQuotaError

__all__ = [
    "Backend",
    "SingleBackend",
    "embedded_backend",
    "is_noscript",
    "translate_error",
    "url_backend",
]


class Backend(Protocol):
    """Connections by route, for the sync client."""

    def connection(self, route: str) -> Any:
        """The connection that serves ``route``."""

    def connections(self) -> Sequence[Any]:
        """Every distinct connection (to load scripts and check health)."""

    def close(self) -> None:
        """Release sockets."""


class SingleBackend:
    """One Redis (real or fake) serves every group."""

    def __init__(self, client: Any, description: str) -> None:
        self._client = client
        self.description = description

    def connection(self, route: str) -> Any:
        """The one connection."""
        return self._client

    def connections(self) -> Sequence[Any]:
        """The one connection, in a list."""
        return [self._client]

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def no_retry() -> Retry:
    """redis-py retry policy that never replays a command."""
    return Retry(NoBackoff(), 0)


def url_backend(url: str, *, socket_timeout: float) -> SingleBackend:
    """A backend on one Redis URL (``redis://``, ``rediss://`` or ``unix://``)."""
    if not isinstance(url, str) or not url:
        raise ConfigError("url", f"must be a redis:// URL, got {url!r}")
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=no_retry(),
            retry_on_timeout=False,
            health_check_interval=0,
        )
    except ValueError as exc:
        raise ConfigError("url", str(exc)) from exc
    return SingleBackend(client, _redact(url))


_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED_SERVER: Any = None


def embedded_backend(*, shared: bool = True, server: Any = None) -> SingleBackend:
    """An in-process fakeredis with Lua, for trying ratequota with nothing installed.

    ``shared`` clients in one process see the same server, like pods on one
    Redis; ``testing`` makes private ones, or passes the ``fakeredis.FakeServer``
    several clients should share.
    """
    import fakeredis

    global _EMBEDDED_SERVER
    if server is not None:
        pass
    elif shared:
        with _EMBEDDED_LOCK:  # held only to create the server object, never across I/O
            if _EMBEDDED_SERVER is None:
                _EMBEDDED_SERVER = fakeredis.FakeServer()
            server = _EMBEDDED_SERVER
    else:
        server = fakeredis.FakeServer()
    return SingleBackend(fakeredis.FakeRedis(server=server), "embedded fakeredis")


def _redact(url: str) -> str:
    """The URL without its password, for messages and reports."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"


def is_noscript(exc: BaseException) -> bool:
    """True for Redis's NOSCRIPT: the script certainly did not run."""
    return isinstance(exc, redis.exceptions.NoScriptError)


def translate_error(exc: BaseException, where: str) -> RateQuotaError:
    """A ratequota error for a redis-py error (raise it ``from exc``)."""
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return BackendUnavailable(f"Redis at {where} is unavailable: {exc}")
    if isinstance(exc, OSError):
        return BackendUnavailable(f"Redis at {where} is unavailable: {exc}")
    return BackendError(f"Redis at {where} answered with an error: {exc}")
