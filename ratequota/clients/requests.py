"""The arguments of a client call, validated before any I/O.

A bad argument fails here with a ``ratequota`` error naming the field, never
half-way through a flow (and never as a Redis error).
"""

from __future__ import annotations

import math

import attrs

from ratequota.decision import LeaseInfo
from ratequota.errors import InvalidRequest, InvalidType
from ratequota.policy import MAX_UNITS

__all__ = [
    "AcquireRequest",
    "check_lease",
    "positive_seconds",
    "validate_request_id",
    "validate_tenant",
    "validate_units",
]


def positive_seconds(field: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(field, f"must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        low = ">= 0" if allow_zero else "> 0"
        raise InvalidRequest(field, f"must be a finite number of seconds {low}, got {value!r}")
    return seconds


@attrs.frozen
class AcquireRequest:
    """A validated acquire: what to ask for, under which id, for how long, waiting how long."""

    tenant: str
    units: int
    group: str | None
    lease_id: str
    ttl_ms: int
    timeout: float


def validate_tenant(tenant: object, field: str = "tenant") -> str:
    """A tenant (or group) name: a non-empty ``str``."""
    if not isinstance(tenant, str):
        raise InvalidType(field, f"must be a string, got {type(tenant).__name__}")
    if not tenant:
        raise InvalidRequest(field, "must not be empty")
    return tenant


def validate_units(units: object) -> int:
    """Units of a request: an ``int`` (not bool, not float, not str) >= 1."""
    if isinstance(units, bool) or not isinstance(units, int):
        raise InvalidType("units", f"must be an integer, got {units!r}")
    if units < 1:
        raise InvalidRequest("units", f"must be >= 1, got {units}")
    if units > MAX_UNITS:
        raise InvalidRequest("units", f"must be at most 2**50 ({MAX_UNITS}), got {units}")
    return units


def validate_request_id(request_id: object) -> str:
    """A caller-chosen request id, used as the lease id (idempotent retries)."""
    if not isinstance(request_id, str):
        raise InvalidType("request_id", f"must be a string, got {type(request_id).__name__}")
    if not request_id or len(request_id) > 200:
        raise InvalidRequest("request_id", "must be 1 to 200 characters")
    return request_id


def check_lease(lease: object) -> None:
    """A lease named by release/renew: the facts the scripts store back on re-assertion."""
    if not isinstance(lease, LeaseInfo):
        raise InvalidType("lease", f"must be a lease, got {type(lease).__name__}")
    validate_tenant(lease.tenant, "lease.tenant")
    token = lease.token
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise InvalidRequest("lease.token", f"must be an integer >= 0, got {token!r}")
    validate_units(lease.units)
