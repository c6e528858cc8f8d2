"""Quota policy: groups, their capacity, and each tenant's share of it.

Policies are frozen attrs classes validated at construction, so a bad policy
fails where it is written, with a message naming the field, long before any
pod tries to enforce it. ``Policy.from_toml`` reads the same structure from a
file; ``Policy.to_dict``/``from_dict`` is the round trip used to publish the
catalog to Redis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ratequota.errors import ConfigError
from ratequota.meter_policy import (
    MAX_METER,
    MAX_METERS,
    MeterPolicy,
    TenantMeter,
    check_group_meters,
    check_tenant_meters,
    int_within,
    meter_tuple,
)

__all__ = [
    "MAX_METER",
    "MAX_METERS",
    "MAX_UNITS",
    "GroupPolicy",
    "MeterPolicy",
    "Policy",
    "TenantMeter",
    "TenantPolicy",
    "UnknownTenants",
]

UnknownTenants = Literal["refuse", "default"]

#: Longest lease a policy may allow. Group keys expire this long after the
#: last write, so the bound is what keeps abandoned state from living forever.
MAX_LEASE_TTL_LIMIT = 7 * 24 * 3600.0

#: Largest number of units a capacity, guarantee, borrow limit, max_units or
#: request may name: 2**50 (about 1.1e15). The Lua scripts hold numbers as
#: doubles, exact up to 2**53; 2**50 leaves room for the sums they form (units
#: held + units asked + the reserve of the oldest waiting request, or a few
#: large waiting requests), so every one of them stays an exact integer.
MAX_UNITS = 2**50


def _name(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise ConfigError(field, "must not be empty")
    return value


def _int_at_least(field: str, value: object, low: int) -> int:
    return int_within(field, value, low, MAX_UNITS, "2**50")


#: How long an hour of the usage ledger is kept after it ends (docs/usage.md): 7 days,
#: at most 366 days.
DEFAULT_USAGE_RETENTION = 7 * 24 * 3600.0
MAX_USAGE_RETENTION = 366 * 24 * 3600.0


def _check_tenant(instance: TenantPolicy, _attr: object, _value: str) -> None:
    # One validator for the whole class: messages can name the tenant.
    who = f"tenant {instance.name!r}" if isinstance(instance.name, str) else "tenant"
    _name("tenant.name", instance.name)
    _int_at_least(f"{who}: guarantee", instance.guarantee, 0)
    lendable = instance.lendable
    if isinstance(lendable, bool) or not isinstance(lendable, (int, float)):
        raise ConfigError(f"{who}: lendable", f"must be a number in [0, 1], got {lendable!r}")
    if not 0.0 <= lendable <= 1.0:
        raise ConfigError(f"{who}: lendable", f"must be within [0, 1], got {lendable}")
    if instance.borrow_limit is not None:
        _int_at_least(f"{who}: borrow_limit", instance.borrow_limit, 0)
    weight = instance.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{who}: weight", f"must be a positive number, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{who}: weight", f"must be a finite number > 0, got {weight}")
    if instance.max_units is not None:
        _int_at_least(f"{who}: max_units", instance.max_units, 1)
    _flag(f"{who}: shadow", instance.shadow)
    check_tenant_meters(who, instance.meters)


def _flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")


@attrs.frozen
class TenantPolicy:
    """One tenant's share of its group.

    ``guarantee`` is always available to the tenant when it asks; ``lendable``
    is the fraction of its *unused* guarantee others may borrow (the rest is
    kept idle for it); ``borrow_limit`` caps what it may hold above its
    guarantee (None: up to the capacity); ``weight`` sets its share of spare
    capacity; ``max_units`` caps a single request. ``shadow``: the tenant's
    requests are decided in full but never refused for its limit or the
    group's capacity; such admissions are flagged and counted (docs/metrics.md).
    ``meters`` holds its share of the group's rate meters (docs/rates.md); a
    meter it does not list gives it no guaranteed rate, a ceil of the group's
    rate and weight 1.
    """

    name: str = attrs.field(validator=_check_tenant)
    guarantee: int = 0
    lendable: float = 1.0
    borrow_limit: int | None = None
    weight: float = 1.0
    max_units: int | None = None
    shadow: bool = False
    meters: tuple[TenantMeter, ...] = attrs.field(default=(), converter=meter_tuple)

    def meter(self, name: str) -> TenantMeter | None:
        """The tenant's share of the meter ``name``, if it lists one."""
        for share in self.meters:
            if share.name == name:
                return share
        return None

    @property
    def reserve(self) -> float:
        """Units of the guarantee never lent out: what an idle tenant still occupies."""
        return self.guarantee * (1.0 - self.lendable)

    @property
    def ceiling(self) -> float:
        """Most units the tenant may hold at once, ignoring others (``G + B``)."""
        return math.inf if self.borrow_limit is None else self.guarantee + self.borrow_limit

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON; omits defaults so files stay short."""
        out: dict[str, Any] = {"name": self.name}
        for field in attrs.fields(TenantPolicy)[1:]:
            value = getattr(self, field.name)
            if field.name == "meters":
                if value:
                    out["meters"] = {m.name: m.to_dict() for m in value}
            elif value != field.default:
                out[field.name] = value
        return out


def _check_group(instance: GroupPolicy, _attr: object, _value: str) -> None:
    who = f"group {instance.name!r}" if isinstance(instance.name, str) else "group"
    _name("group.name", instance.name)
    _int_at_least(f"{who}: capacity", instance.capacity, 1)
    names: set[str] = set()
    total = 0
    for tenant in instance.tenants:
        if not isinstance(tenant, TenantPolicy):
            raise ConfigError(f"{who}: tenants", f"must hold TenantPolicy, got {tenant!r}")
        if tenant.name in names:
            raise ConfigError(f"{who}: tenants", f"tenant {tenant.name!r} is listed twice")
        names.add(tenant.name)
        total += tenant.guarantee
    if total > instance.capacity:
        raise ConfigError(
            f"{who}: guarantee",
            f"guarantees sum to {total}, above the capacity {instance.capacity}",
        )
    if instance.unknown_tenants not in ("refuse", "default"):
        raise ConfigError(
            f"{who}: unknown_tenants",
            f"must be 'refuse' or 'default', got {instance.unknown_tenants!r}",
        )
    default = instance.default_tenant
    if not isinstance(default, TenantPolicy):
        raise ConfigError(f"{who}: default_tenant", f"must be a TenantPolicy, got {default!r}")
    if default.guarantee != 0:
        # Unknown tenants are unbounded in number: a guarantee for each of them
        # could not be kept within the capacity.
        raise ConfigError(f"{who}: default_tenant.guarantee", "must be 0 for unknown tenants")
    ttl = instance.max_lease_ttl
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ConfigError(f"{who}: max_lease_ttl", f"must be a number of seconds, got {ttl!r}")
    if not 1.0 <= ttl <= MAX_LEASE_TTL_LIMIT:
        raise ConfigError(
            f"{who}: max_lease_ttl", f"must be within [1, {MAX_LEASE_TTL_LIMIT:g}] s, got {ttl}"
        )
    _flag(f"{who}: shadow", instance.shadow)
    keep = instance.usage_retention
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep):
        raise ConfigError(f"{who}: usage_retention", f"must be a number of seconds, got {keep!r}")
    if not 0 <= keep <= MAX_USAGE_RETENTION:
        raise ConfigError(
            f"{who}: usage_retention",
            f"must be within [0, {MAX_USAGE_RETENTION:g}] s (366 days), got {keep}",
        )
    check_group_meters(instance)


def _tenant_tuple(value: Iterable[TenantPolicy]) -> tuple[TenantPolicy, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError("group.tenants", "must be a sequence of TenantPolicy")
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(
            "group.tenants", f"must be a sequence of TenantPolicy, got {value!r}"
        ) from None


@attrs.frozen
class GroupPolicy:
    """A group of tenants sharing ``capacity`` units; all its state lives in one hash slot.

    ``unknown_tenants`` says what happens to a tenant the policy does not
    list: ``"refuse"`` raises ``UnknownTenant``, ``"default"`` treats it as
    ``default_tenant`` (which has no guarantee: strangers only borrow).
    ``max_lease_ttl`` bounds lease length, and so how long idle keys live.
    ``shadow``: every tenant of the group is in shadow mode (see
    ``TenantPolicy.shadow``): a way to roll out a policy and watch what it
    would refuse before it does.
    ``meters`` are its rate meters (docs/rates.md); none by default.
    ``usage_retention``: how long each hour of the usage ledger is kept after
    the hour ends, in seconds (docs/usage.md); 7 days by default.
    """

    name: str = attrs.field(validator=_check_group)
    capacity: int
    tenants: tuple[TenantPolicy, ...] = attrs.field(default=(), converter=_tenant_tuple)
    unknown_tenants: UnknownTenants = "refuse"
    default_tenant: TenantPolicy = TenantPolicy("*")
    max_lease_ttl: float = 3600.0
    shadow: bool = False
    meters: tuple[MeterPolicy, ...] = attrs.field(default=(), converter=meter_tuple)
    usage_retention: float = DEFAULT_USAGE_RETENTION

    def meter(self, name: str) -> MeterPolicy | None:
        """The group's meter called ``name``, if it declares one."""
        for meter in self.meters:
            if meter.name == name:
                return meter
        return None

    def tenant(self, name: str) -> TenantPolicy | None:
        """The policy of ``name``: listed, the default for strangers, or None if refused."""
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        if self.unknown_tenants == "default":
            return attrs.evolve(self.default_tenant, name=name)
        return None

    @property
    def reserve(self) -> float:
        """Units idle tenants still occupy: the sum of their non-lendable guarantees."""
        return math.fsum(t.reserve for t in self.tenants)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON."""
        out: dict[str, Any] = {
            "name": self.name,
            "capacity": self.capacity,
            "tenants": [t.to_dict() for t in self.tenants],
        }
        if self.unknown_tenants != "refuse":
            out["unknown_tenants"] = self.unknown_tenants
        default = self.default_tenant.to_dict()
        default.pop("name")
        if default:
            out["default_tenant"] = default
        if self.max_lease_ttl != 3600.0:
            out["max_lease_ttl"] = self.max_lease_ttl
        if self.shadow:
            out["shadow"] = True
        if self.meters:
            out["meters"] = {m.name: m.to_dict() for m in self.meters}
        if self.usage_retention != DEFAULT_USAGE_RETENTION:
            out["usage_retention"] = self.usage_retention
        return out


def _check_policy(instance: Policy, _attr: object, _value: object) -> None:
    names: set[str] = set()
    for group in instance.groups:
        if not isinstance(group, GroupPolicy):
            raise ConfigError("policy.groups", f"must hold GroupPolicy, got {group!r}")
        if group.name in names:
            raise ConfigError("policy.groups", f"group {group.name!r} is listed twice")
        names.add(group.name)
    # A tenant is charged to exactly one group.
    seen: dict[str, str] = {}
    for group in instance.groups:
        for tenant in group.tenants:
            if tenant.name in seen:
                raise ConfigError(
                    f"tenant {tenant.name!r}",
                    f"belongs to both group {seen[tenant.name]!r} and {group.name!r}",
                )
            seen[tenant.name] = group.name
    if instance.default_group is not None:
        _name("policy.default_group", instance.default_group)
        if instance.default_group not in names:
            raise ConfigError(
                "policy.default_group", f"names no group of the policy: {instance.default_group!r}"
            )


def _group_tuple(value: Iterable[GroupPolicy]) -> tuple[GroupPolicy, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError("policy.groups", "must be a sequence of GroupPolicy")
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(
            "policy.groups", f"must be a sequence of GroupPolicy, got {value!r}"
        ) from None


@attrs.frozen
class Policy:
    """Every group a deployment enforces; what ``apply_policy`` publishes.

    ``default_group`` is where a tenant the policy does not list is routed
    (that group must accept unknown tenants for the request to go through).
    """

    groups: tuple[GroupPolicy, ...] = attrs.field(converter=_group_tuple, validator=_check_policy)
    default_group: str | None = None

    def group(self, name: str) -> GroupPolicy | None:
        """The group called ``name``, if the policy has one."""
        for group in self.groups:
            if group.name == name:
                return group
        return None

    def group_of(self, tenant: str) -> str | None:
        """The group charged for ``tenant``: its own, else ``default_group``."""
        for group in self.groups:
            for listed in group.tenants:
                if listed.name == tenant:
                    return group.name
        return self.default_group

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the inverse of ``from_dict``."""
        out: dict[str, Any] = {"groups": [g.to_dict() for g in self.groups]}
        if self.default_group is not None:
            out["default_group"] = self.default_group
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from plain data (parsed TOML or JSON); errors name the field."""
        from ratequota.policy_data import policy_from_dict

        return policy_from_dict(data)

    @classmethod
    def from_toml(cls, source: str | Path) -> Policy:
        """Read a policy file; errors name the file, the line and the field at fault."""
        from ratequota.tomlpos import load_toml

        return load_toml(source, cls.from_dict)
