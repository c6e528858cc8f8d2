"""Every error ratequota raises, under one root so callers can catch them all.

The tree::

    RateQuotaError
    ├── ConfigError (ValueError)          bad policy or client settings
    │   └── PolicyFileError               a TOML policy file that cannot be used
    ├── InvalidRequest (ValueError)       bad arguments to acquire/release/...
    │   └── InvalidType (TypeError)       ... of the wrong type (units="3")
    ├── QuotaExceeded                     a refusal, carrying the Decision
    │   ├── RequestTooLarge               can never succeed under this policy
    │   ├── RequestIdConflict (ValueError) the request id names another tenant's or size's request
    │   └── AcquireTimeout (TimeoutError) waited until the deadline, still refused
    ├── UnknownTenant (KeyError)          tenant not in the policy, and the policy refuses strangers
    ├── PolicyMissing                     no policy published for the group
    ├── SchemaMismatch                    the keys were written by a newer ratequota
    │   └── LegacyLayout                  ... or are still served by an older one
    ├── BackendUnavailable (ConnectionError)  Redis cannot be reached (fail-closed)
    └── BackendError (RuntimeError)       Redis answered with an error we cannot act on

Each subclass also derives from the builtin a careful caller would already
catch (``ValueError`` for bad input, ``TimeoutError`` for deadlines), so
ratequota fits into code that does not know about it. Errors from redis-py are
translated with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ratequota.decision import Decision

__all__ = [
    "AcquireTimeout",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "InvalidRequest",
    "InvalidType",
    "LegacyLayout",
    "PolicyFileError",
    "PolicyMissing",
    "QuotaExceeded",
    "RateQuotaError",
    "RequestIdConflict",
    "RequestTooLarge",
    "SchemaMismatch",
    "UnknownTenant",
]


class RateQuotaError(Exception):
    """Root of every error raised by ratequota."""


class ConfigError(RateQuotaError, ValueError):
    """A policy or client setting is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class PolicyFileError(ConfigError):
    """A policy file could not be read or does not describe a valid policy."""


class InvalidRequest(RateQuotaError, ValueError):
    """An argument of a call is invalid; raised before Redis is touched."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class InvalidType(InvalidRequest, TypeError):
    """An argument has the wrong type (for example ``units="3"``)."""


class QuotaExceeded(RateQuotaError):
    """The request was refused; ``decision`` holds the reason and the numbers."""

    def __init__(self, decision: Decision, message: str | None = None) -> None:
        self.decision = decision
        super().__init__(message or decision.describe())


class RequestTooLarge(QuotaExceeded, ValueError):
    """The request asks for more units than the policy can ever grant this tenant."""


class RequestIdConflict(QuotaExceeded, ValueError):
    """The request id names a lease or waiting request of another tenant or another size.

    Request ids are scoped to their tenant: a retry is answered by the original
    only when it repeats it exactly (same tenant, same units). Anything else
    was refused without charging or registering anything; use a fresh id.
    """


class AcquireTimeout(QuotaExceeded, TimeoutError):
    """The request was still refused when its deadline passed."""

    def __init__(self, decision: Decision, waited: float) -> None:
        self.waited = waited
        super().__init__(
            decision, f"gave up after waiting {waited:.3f}s; last refusal: {decision.describe()}"
        )


class UnknownTenant(RateQuotaError, KeyError):
    """The tenant is not in the policy and the policy refuses unknown tenants.

    ``published`` is false when no policy is published at all (the tenant has
    no group because there are no groups). ``catalog_ttl`` is set when the
    refusal came from this client's cached copy of the published policy: a
    policy published since then becomes visible within that many seconds.
    """

    def __init__(
        self,
        tenant: str,
        group: str | None = None,
        *,
        published: bool = True,
        catalog_ttl: float | None = None,
    ) -> None:
        self.tenant = tenant
        self.group = group
        if not published:
            message = (
                f"no policy is published, so tenant {tenant!r} has no group; publish one with "
                "`ratequota policy apply FILE`"
            )
        else:
            where = f" of group {group!r}" if group is not None else ""
            message = f"tenant {tenant!r} is not in the policy{where}"
            if catalog_ttl is not None:
                message += (
                    f" (as last read by this client; a policy published since is seen within "
                    f"catalog_ttl={catalog_ttl:g}s)"
                )
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class PolicyMissing(RateQuotaError):
    """No policy has been published for the group this request routes to."""

    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(
            f"no policy is published for group {group!r}; publish one with "
            "`ratequota policy apply FILE`"
        )


class SchemaMismatch(RateQuotaError):
    """The group's keys were written by a newer key schema than this client knows."""

    def __init__(self, group: str, found: int, supported: int) -> None:
        self.group = group
        super().__init__(
            f"group {group!r} uses key schema {found}, this ratequota supports up to "
            f"{supported}; upgrade ratequota on this pod"
        )


class LegacyLayout(SchemaMismatch):
    """Pods of the previous release still serve the group in the previous key layout.

    Publishing it in the new layout would let both releases admit against the same
    capacity, so it is refused until the policy is published with ``migrate=True``
    (docs/deployment.md, "Upgrading the key schema").
    """

    def __init__(self, group: str, found: int, supported: int) -> None:
        self.group = group
        RateQuotaError.__init__(
            self,
            f"group {group!r} is still served in key schema {found} by the previous ratequota "
            f"release; this one uses schema {supported}: publish the policy with migrate=True "
            f"to take the group over (pods of the previous release then refuse it)",
        )


class BackendUnavailable(RateQuotaError, ConnectionError):
    """Redis could not be reached or did not answer in time (fail-closed)."""


class BackendError(RateQuotaError, RuntimeError):
    """Redis answered with an error ratequota cannot act on (a script error, BUSY, OOM...)."""
