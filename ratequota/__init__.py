"""ratequota: fair, lease-based tenant quota for batch inference, enforced in Redis.

This module only re-exports; the work lives in modules named for what they
hold (``policy``, ``fairness``, ``core``, ``client``, ...).
"""

from ratequota.client import Acquisition, Lease, QuotaClient
from ratequota.core import Settings
from ratequota.decision import (
    Decision,
    GroupSnapshot,
    LeaseInfo,
    ReleaseResult,
    RenewResult,
    TenantSnapshot,
)
from ratequota.errors import (
    AcquireTimeout,
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    InvalidType,
    PolicyFileError,
    PolicyMissing,
    QuotaExceeded,
    RateQuotaError,
    RequestTooLarge,
    SchemaMismatch,
    UnknownTenant,
)
from ratequota.policy import GroupPolicy, Policy, TenantPolicy

__all__ = [
    "AcquireTimeout",
    "Acquisition",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "Decision",
    "GroupPolicy",
    "GroupSnapshot",
    "InvalidRequest",
    "InvalidType",
    "Lease",
    "LeaseInfo",
    "Policy",
    "PolicyFileError",
    "PolicyMissing",
    "QuotaClient",
    "QuotaExceeded",
    "RateQuotaError",
    "ReleaseResult",
    "RenewResult",
    "RequestTooLarge",
    "SchemaMismatch",
    "Settings",
    "TenantPolicy",
    "TenantSnapshot",
    "UnknownTenant",
]

__version__ = "0.1.0.dev0"
