"""The arguments of a client call, validated before any I/O, and the options' types.

A bad argument fails here with a ``ratequota`` error naming the field, never
half-way through a flow (and never as a Redis error).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import attrs

from ratequota.clients.settings import Settings, positive_seconds
from ratequota.decision import LeaseInfo
from ratequota.engine.meterwire import check_amounts
from ratequota.errors import InvalidRequest, InvalidType
from ratequota.policy import MAX_LEASE_TTL_LIMIT, MAX_UNITS

__all__ = [
    "AcquireOptions",
    "AcquireRequest",
    "LimitOptions",
    "MeterOptions",
    "TenantSpec",
    "TryOptions",
    "UnitsSpec",
    "WaitOptions",
    "acquire_request",
    "check_lease",
    "handler_arguments",
    "lease_ttl_ms",
    "meter_amounts",
    "meter_arguments",
    "new_request_id",
    "plain_request",
    "validate_request_id",
    "validate_tenant",
    "validate_units",
    "wait_seconds",
]


# Not slotted: a frozen class with a ``__dict__`` is built in a third less time (one per call).
@attrs.frozen(slots=False)
class AcquireRequest:
    """A validated acquire: what to ask for, under which id, for how long, waiting how long."""

    tenant: str
    units: int
    group: str | None
    lease_id: str
    ttl_ms: int
    timeout: float
    #: Rate-meter amounts by meter name (docs/rates.md), decided with the lease.
    meters: Mapping[str, int] = attrs.field(factory=dict)


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


def meter_amounts(
    tokens: object = None, requests: object = None, meters: Mapping[str, object] | None = None
) -> dict[str, int]:
    """The rate-meter amounts of a call: ``tokens=``, ``requests=`` and any other ``meters=``.

    Checked here (integers from 0 to 2**36, meter names as policies spell
    them), so a bad amount never reaches Redis; naming one meter twice is an
    error too.
    """
    named: dict[str, object] = dict(meters or {})
    for name, value in (("tokens", tokens), ("requests", requests)):
        if value is not None:
            if name in named:
                raise InvalidRequest(name, f"given twice (as {name}= and in meters=)")
            named[name] = value
    return check_amounts(named)


def lease_ttl_ms(settings: Settings, ttl: float | None, /) -> int:
    """Lease lifetime in ms from seconds (None: the client's default)."""
    seconds = settings.lease_ttl if ttl is None else positive_seconds("ttl", ttl)
    if seconds > MAX_LEASE_TTL_LIMIT:
        raise InvalidRequest("ttl", f"must be at most {MAX_LEASE_TTL_LIMIT:g}s")
    return max(1, round(seconds * 1000))


def wait_seconds(settings: Settings, timeout: float | None, /) -> float:
    """How long a waiting acquire may wait (None: the client's default)."""
    if timeout is None:
        return settings.timeout
    return positive_seconds("timeout", timeout, allow_zero=True)


def new_request_id() -> str:
    """A fresh request id: random, so concurrent pods never collide."""
    return os.urandom(16).hex()


def acquire_request(
    settings: Settings,
    tenant: str,
    units: int,
    /,
    *,
    group: str | None = None,
    ttl: float | None = None,
    timeout: float | None = None,
    request_id: str | None = None,
    tokens: int | None = None,
    requests: int | None = None,
    meters: Mapping[str, int] | None = None,
    **unknown: object,
) -> AcquireRequest:
    """Validate an acquire's arguments (before any I/O) into a request.

    A misspelt option is reported by its name and the options that exist,
    never as a TypeError about this internal function.
    """
    if unknown:
        raise InvalidType(
            sorted(unknown)[0],
            "unexpected keyword argument (the options are group, ttl, timeout, request_id, "
            "tokens, requests and meters)",
        )
    return AcquireRequest(
        tenant=validate_tenant(tenant),
        units=validate_units(units),
        group=None if group is None else validate_tenant(group, "group"),
        lease_id=new_request_id() if request_id is None else validate_request_id(request_id),
        ttl_ms=lease_ttl_ms(settings, ttl),
        timeout=wait_seconds(settings, timeout),
        meters=meter_amounts(tokens, requests, meters),
    )


def plain_request(settings: Settings, tenant: str, units: int, /) -> AcquireRequest:
    """``acquire_request`` with no options (the hot path): the same checks, the defaults.

    The default ttl and timeout come from ``settings``, validated when they were made.
    """
    return AcquireRequest(
        validate_tenant(tenant),
        validate_units(units),
        None,
        new_request_id(),
        max(1, round(settings.lease_ttl * 1000)),  # lease_ttl_ms(settings, None)
        settings.timeout,
        {},
    )


#: What the ``limit`` decorator reads the tenant and the units from.
TenantSpec = Callable[..., str] | str
UnitsSpec = Callable[..., int] | str | int


class MeterOptions(TypedDict, total=False):
    """Rate-meter amounts of a call (docs/rates.md): ``tokens``, ``requests``, or any meter
    by name in ``meters``. At acquire they are the estimates decided with the lease; at
    ``settle`` and ``release`` the actual amounts used."""

    tokens: int | None
    requests: int | None
    meters: Mapping[str, int] | None


class WaitOptions(TypedDict, total=False):
    """Keyword options of ``acquire`` and ``limit`` in both clients.

    ``group``: charge this group instead of the tenant's routed one; ``ttl``:
    lease lifetime in seconds (default ``Settings.lease_ttl``); ``timeout``:
    how long to wait (default ``Settings.timeout``; 0 never waits).
    """

    group: str | None
    ttl: float | None
    timeout: float | None


class TryOptions(MeterOptions, total=False):
    """Keyword options of ``try_acquire``: ``group`` and ``ttl`` as for ``acquire``,
    ``request_id`` to make a retried call idempotent (the lease id), meter amounts."""

    group: str | None
    ttl: float | None
    request_id: str | None


class AcquireOptions(WaitOptions, MeterOptions, total=False):
    """Keyword options of ``acquire``: ``WaitOptions``, ``request_id`` and meter amounts."""

    request_id: str | None


class LimitOptions(WaitOptions, total=False):
    """Keyword options of ``limit``: ``WaitOptions`` and meter amounts, each (like ``units``)
    a constant, a parameter name of the handler, or a callable of its arguments."""

    tokens: UnitsSpec | None
    requests: UnitsSpec | None
    meters: Mapping[str, UnitsSpec] | None


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


def meter_arguments(
    handler: Callable[..., Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], Callable[..., dict[str, Any]]]:
    """How ``limit`` reads meter amounts from one call: (the other options, a function of the
    handler's arguments giving ``meters=``). Specs are read like ``units``'s."""
    rest = {k: v for k, v in options.items() if k not in ("tokens", "requests", "meters")}
    specs: dict[str, object] = dict(options.get("meters") or {})
    for name in ("tokens", "requests"):
        if options.get(name) is not None:
            specs[name] = options[name]
    signature = inspect.signature(handler)
    getters = {name: _argument_getter(spec, name, signature) for name, spec in specs.items()}
    if not getters:
        return rest, lambda *a, **k: {}
    return rest, lambda *a, **k: {"meters": {n: get(*a, **k) for n, get in getters.items()}}


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
