"""ratequota: fair, lease-based tenant quota for batch inference, enforced in Redis.

This module only re-exports; the work lives in modules named for what they
hold (``policy``, ``fairness``, the ``clients`` and ``engine`` subpackages, ...),
which are private. Users import from here, or from the public modules
``ratequota.metrics``, ``ratequota.tracing``, ``ratequota.testing`` and
``ratequota.ratelimit_headers`` (tests/test_exported_members.py holds the examples to that).
"""

from ratequota.clients.aio import AsyncAcquisition, AsyncLease, AsyncQuotaClient
from ratequota.clients.explain import Explanation, Loan, explain
from ratequota.clients.failure import FailureStats
from ratequota.clients.readiness import ReadinessReport, ShardReport
from ratequota.clients.settings import Settings
from ratequota.clients.sync import Acquisition, Lease, QuotaClient
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    MeterResult,
    MeterSettlement,
    ReleaseResult,
    RenewResult,
    TenantSnapshot,
    UsageRow,
)
from ratequota.errors import (
    AcquireTimeout,
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    InvalidType,
    LegacyLayout,
    PolicyFileError,
    PolicyMissing,
    QuotaExceeded,
    RateQuotaError,
    RequestIdConflict,
    RequestTooLarge,
    SchemaMismatch,
    UnknownTenant,
)
from ratequota.observe import DecisionEvent, Observer, Observers
from ratequota.policy import GroupPolicy, MeterPolicy, Policy, TenantMeter, TenantPolicy

__all__ = [
    "AcquireTimeout",
    "Acquisition",
    "AsyncAcquisition",
    "AsyncLease",
    "AsyncQuotaClient",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "Decision",
    "DecisionEvent",
    "Explanation",
    "FailureStats",
    "GroupPolicy",
    "GroupSnapshot",
    "InvalidRequest",
    "InvalidType",
    "Lease",
    "LeaseInfo",
    "LegacyLayout",
    "Loan",
    "MeterPolicy",
    "MeterResult",
    "MeterSettlement",
    "Observer",
    "Observers",
    "Policy",
    "PolicyFileError",
    "PolicyMissing",
    "QuotaClient",
    "QuotaExceeded",
    "RateQuotaError",
    "ReadinessReport",
    "ReleaseResult",
    "RenewResult",
    "RequestIdConflict",
    "RequestTooLarge",
    "SchemaMismatch",
    "Settings",
    "ShardReport",
    "TenantMeter",
    "TenantPolicy",
    "TenantSnapshot",
    "UnknownTenant",
    "UsageRow",
    "explain",
]

__version__ = "0.1.0.dev0"
