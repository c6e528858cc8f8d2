"""``Settings``: every per-client setting, each with a safe default and a validator."""

from __future__ import annotations

import math

import attrs

from ratequota.clients.failure import FAILURE_MODES, FailureMode
from ratequota.errors import ConfigError, InvalidRequest, InvalidType
from ratequota.policy import MAX_LEASE_TTL_LIMIT

__all__ = ["FIRST_PAUSE", "LAST_PAUSE", "Settings", "positive_seconds"]

#: Backoff between tries of a waiting acquire: from the first to the last, doubling.
FIRST_PAUSE = 0.005
LAST_PAUSE = 0.2


def positive_seconds(field: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as seconds: a finite number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(field, f"must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        low = ">= 0" if allow_zero else "> 0"
        raise InvalidRequest(field, f"must be a finite number of seconds {low}, got {value!r}")
    return seconds


def _setting_seconds(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    try:
        positive_seconds(attribute.name, value)
    except InvalidRequest as exc:
        raise ConfigError(attribute.name, str(exc).split(": ", 1)[1]) from None


def _setting_count(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(attribute.name, f"must be an integer >= 1, got {value!r}")


def _setting_mode(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in FAILURE_MODES:
        raise ConfigError(attribute.name, f"must be one of {FAILURE_MODES}, got {value!r}")


def _setting_allowance(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(attribute.name, f"must be an integer >= 0, got {value!r}")


def _setting_flag(_instance: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(attribute.name, f"must be True or False, got {value!r}")


def _setting_fraction(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not 0.05 <= float(value) <= 0.9:  # type: ignore[arg-type]
        raise ConfigError(attribute.name, f"must be a number from 0.05 to 0.9, got {value!r}")


@attrs.frozen
class Settings:
    """Per-client settings; every one has a safe default.

    ``lease_ttl``: lifetime of a lease unless renewed. ``timeout``: how long
    ``acquire`` waits by default. ``pending_ttl``: how long a refused, waiting
    request keeps its demand registered without retrying. ``purge_limit``:
    most expired entries one call cleans up (bounds each script's work).
    ``catalog_ttl``: how often tenant-to-group routing is re-read.
    ``socket_timeout``: every Redis call's timeout.

    Failure policy (§8, see ``ratequota.clients.failure``): ``failure_mode`` is
    ``"closed"`` (raise ``BackendUnavailable``), ``"open"`` (admit with a
    synthetic lease, counted) or ``"local"`` (admit up to ``local_allowance``
    units per tenant held locally at once). ``breaker_failures`` consecutive
    failures open a shard's circuit breaker; after ``breaker_reset`` seconds
    one probe call may close it again.

    Renewal: with ``auto_renew`` leases held by ``acquire`` and ``limit`` are
    renewed every ``renew_fraction`` of their TTL, measured on the client's
    clock: by a background thread (task) unless ``renew_in_background`` is
    False, in which case the holder calls ``quota.renewer.renew_due()`` (tests on
    a ``ManualClock`` do, so renewal happens exactly when they say).
    ``batch_size`` / ``batch_in_flight``: the async client pipelines up to
    ``batch_size`` concurrent script calls per shard into one round trip, with
    at most ``batch_in_flight`` such round trips per shard at once.

    ``functions``: a client made from URLs of independent servers calls the
    scripts as a Redis function library (``FCALL``) on each server that takes
    one (Redis 7 and later, ``+fcall +function|load`` in an ACL), else as
    ``EVALSHA``; False: always ``EVALSHA``, no library loaded
    (``ratequota.clients.functions``).

    ``max_connections``: the sync client made from URLs opens at most this many connections
    to each server for its decisions, and as many again for its other commands (redis-py's
    pool); a call that finds them all busy waits for one, at most ``socket_timeout``. Make
    it at least the number of threads that decide at once. The async client's round trips
    are bounded by ``batch_in_flight`` instead.
    """

    prefix: str = "rq"
    lease_ttl: float = attrs.field(default=60.0, validator=_setting_seconds)
    timeout: float = attrs.field(default=10.0, validator=_setting_seconds)
    pending_ttl: float = attrs.field(default=2.0, validator=_setting_seconds)
    purge_limit: int = attrs.field(default=64, validator=_setting_count)
    catalog_ttl: float = attrs.field(default=5.0, validator=_setting_seconds)
    socket_timeout: float = attrs.field(default=1.0, validator=_setting_seconds)
    failure_mode: FailureMode = attrs.field(default="closed", validator=_setting_mode)
    local_allowance: int = attrs.field(default=0, validator=_setting_allowance)
    breaker_failures: int = attrs.field(default=3, validator=_setting_count)
    breaker_reset: float = attrs.field(default=0.5, validator=_setting_seconds)
    auto_renew: bool = attrs.field(default=True, validator=_setting_flag)
    renew_in_background: bool = attrs.field(default=True, validator=_setting_flag)
    renew_fraction: float = attrs.field(default=1 / 3, validator=_setting_fraction)
    batch_size: int = attrs.field(default=64, validator=_setting_count)
    batch_in_flight: int = attrs.field(default=2, validator=_setting_count)
    functions: bool = attrs.field(default=True, validator=_setting_flag)
    max_connections: int = attrs.field(default=50, validator=_setting_count)

    def __attrs_post_init__(self) -> None:
        if self.pending_ttl < 2 * LAST_PAUSE:
            raise ConfigError(
                "pending_ttl", f"must be at least {2 * LAST_PAUSE}s, longer than a retry pause"
            )
        if self.lease_ttl > MAX_LEASE_TTL_LIMIT:
            raise ConfigError("lease_ttl", f"must be at most {MAX_LEASE_TTL_LIMIT:g}s")
        # Scripts unpack() these many values at once; Lua's C stack holds a few thousand.
        for name in ("purge_limit", "batch_size"):
            if getattr(self, name) > 1000:
                raise ConfigError(name, f"must be at most 1000, got {getattr(self, name)}")
        if self.failure_mode == "local" and self.local_allowance < 1:
            raise ConfigError("local_allowance", "must be >= 1 when failure_mode is 'local'")
