"""What an acquire reports to the ``Observer``: its final outcome as one ``DecisionEvent``.

Both clients report through ``QuotaCore``, which builds the event here, so a
metric or a span means the same thing whichever client made the decision.
"""

from __future__ import annotations

from collections.abc import Mapping

from ratequota.clients.failure import FailureMode
from ratequota.clients.requests import AcquireRequest
from ratequota.decision import Decision
from ratequota.errors import BackendUnavailable, UnknownTenant
from ratequota.observe import DecisionEvent, DecisionResult
from ratequota.policy import Policy

__all__ = ["decision_event", "error_event", "guarantee_of"]


def decision_event(
    decision: Decision,
    *,
    failure_mode: FailureMode,
    policy: Policy | None,
    waited: float | None = None,
    timed_out: bool = False,
) -> DecisionEvent:
    """An acquire's final outcome; a synthetic admission is named by the failure mode."""
    d = decision
    result: DecisionResult = "refused"
    reason: str = d.reason
    if d.lease is not None and d.lease.synthetic:
        result = "fallback_admitted"
        reason = "fail_open" if failure_mode == "open" else "local_allowance"
    elif d.shadow_refused:
        result = "shadow_admitted"
    elif d.admitted:
        result = "admitted"
    elif timed_out:
        result = "timed_out"
    synthetic = result == "fallback_admitted"
    return DecisionEvent(
        group=d.group,
        tenant=d.tenant,
        units=d.units,
        result=result,
        reason=reason,
        used=None if synthetic else d.used,
        limit=d.limit,
        group_used=None if synthetic else d.group_used,
        capacity=d.capacity,
        guarantee=guarantee_of(policy, d.group, d.tenant),
        waited=waited,
    )


def error_event(
    request: AcquireRequest,
    error: BackendUnavailable | UnknownTenant,
    *,
    routes: Mapping[str, str],
    waited: float | None = None,
) -> DecisionEvent:
    """An acquire that raised: the tenant is unknown, or Redis is unreachable."""
    r = request
    if isinstance(error, UnknownTenant):
        group = error.group or r.group or ""
        result: DecisionResult = "refused"
        reason = "unknown_tenant"
    else:
        group = r.group or routes.get(r.tenant, "")
        result, reason = "failed", "backend_unavailable"
    return DecisionEvent(
        group=group,
        tenant=r.tenant,
        units=r.units,
        result=result,
        reason=reason,
        waited=waited,
    )


def guarantee_of(policy: Policy | None, group: str, tenant: str) -> int | None:
    """The tenant's guaranteed units by ``policy`` (None when the policy does not say)."""
    group_policy = None if policy is None else policy.group(group)
    tenant_policy = None if group_policy is None else group_policy.tenant(tenant)
    return None if tenant_policy is None else tenant_policy.guarantee
