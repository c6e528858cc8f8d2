"""Quota policy: groups, their capacity, and each tenant's share of it.

Policies are frozen attrs classes validated at construction, so a bad policy
fails where it is written, with a message naming the field, long before any
pod tries to enforce it. ``Policy.from_toml`` reads the same structure from a
file; ``Policy.to_dict``/``from_dict`` is the round trip used to publish the
catalog to Redis.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from ratequota.errors import ConfigError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass

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
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")
    if value > MAX_UNITS:
        raise ConfigError(field, f"must be at most 2**50 ({MAX_UNITS}), got {value}")
    return value


#: How long an hour of the usage ledger is kept after it ends (docs/usage.md): 7 days,
#: at most 366 days.
DEFAULT_USAGE_RETENTION = 7 * 24 * 3600.0
MAX_USAGE_RETENTION = 366 * 24 * 3600.0

# --- Rate meters (docs/rates.md) -------------------------------------------------------------

#: Largest rate, burst or debt a meter may name: 2**36 tokens (about 6.9e10). The meter
#: arithmetic (ratequota/rates.py, lua/_meters.lua) counts in ticks, 60,000 to a token, so
#: that a rate per second or per minute refills an integer number of ticks every ms; a full
#: bucket of 2**36 tokens is then 2**36 * 60,000 ~ 4.1e15 ticks and the sum of two such
#: levels stays below 2**53, where doubles (Lua's numbers) stop being exact integers.
MAX_METER = 2**36

#: Most meters a group may declare. The enforcing scripts keep one contention set per meter
#: and must name every key up front (Redis Cluster), so the number is fixed: meter i of the
#: group's list uses key slot i (lua/_metered.lua, KEYS[6 + i]).
MAX_METERS = 4

#: How a meter's rates are spelled: tokens per second or per minute.
Per = Literal["second", "minute"]

_METER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

#: Weights a meter accepts: wide enough for any sane ratio, narrow enough that the
#: borrowing tags (tokens / weight) stay well inside a double's exact range.
MIN_METER_WEIGHT = 1e-3
MAX_METER_WEIGHT = 1e6


def _meter_int(field: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")
    if value > MAX_METER:
        raise ConfigError(field, f"must be at most 2**36 ({MAX_METER}), got {value}")
    return value


def _meter_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not _METER_NAME.match(value):
        raise ConfigError(
            field, f"must be a lowercase name (a-z, 0-9, _; up to 32 characters), got {value!r}"
        )
    return value


def _check_meter(instance: MeterPolicy, _attr: object, _value: str) -> None:
    name = _meter_name("meter.name", instance.name)
    who = f"meter {name!r}"
    _meter_int(f"{who}: rate", instance.rate, 1)
    if instance.per not in ("second", "minute"):
        raise ConfigError(f"{who}: per", f"must be 'second' or 'minute', got {instance.per!r}")
    _meter_int(f"{who}: burst", instance.burst, 1)
    if instance.debt is not None:
        _meter_int(f"{who}: debt", instance.debt, 0)


@attrs.frozen
class MeterPolicy:
    """A rate meter of a group (``requests``, ``tokens``, ...): the group's rate and burst.

    ``rate`` tokens refill every ``per`` (a second or a minute); ``burst`` is the
    most the group may spend at once. Tenants share the rate as HTB classes
    share a link (docs/rates.md): each has a guaranteed rate and may borrow
    what the others leave unused, up to its ceil. ``debt`` bounds how far a
    settlement above the estimate may push a bucket below zero (None: one
    ``burst``); beyond it the overrun is forgiven and reported, never lost.
    """

    name: str = attrs.field(validator=_check_meter)
    rate: int
    burst: int
    per: Per = "second"
    debt: int | None = None

    @property
    def debt_limit(self) -> int:
        """Most tokens a bucket of this meter may owe."""
        return self.burst if self.debt is None else self.debt

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON, keyed by the meter's name in its group."""
        out: dict[str, Any] = {"rate": self.rate, "burst": self.burst}
        if self.per != "second":
            out["per"] = self.per
        if self.debt is not None:
            out["debt"] = self.debt
        return out


def _check_tenant_meter(instance: TenantMeter, _attr: object, _value: str) -> None:
    name = _meter_name("meter.name", instance.name)
    who = f"meter {name!r}"
    _meter_int(f"{who}: rate", instance.rate, 0)
    if instance.ceil is not None:
        _meter_int(f"{who}: ceil", instance.ceil, 0)
        if instance.ceil < instance.rate:
            raise ConfigError(
                f"{who}: ceil", f"must be >= the rate {instance.rate}, got {instance.ceil}"
            )
    weight = instance.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{who}: weight", f"must be a number, got {weight!r}")
    if not (math.isfinite(weight) and MIN_METER_WEIGHT <= weight <= MAX_METER_WEIGHT):
        raise ConfigError(
            f"{who}: weight",
            f"must be within [{MIN_METER_WEIGHT:g}, {MAX_METER_WEIGHT:g}], got {weight}",
        )
    if instance.burst is not None:
        _meter_int(f"{who}: burst", instance.burst, 0)
    if instance.cburst is not None:
        _meter_int(f"{who}: cburst", instance.cburst, 0)


@attrs.frozen
class TenantMeter:
    """A tenant's share of one meter of its group (HTB's class parameters).

    ``rate`` is guaranteed: asking within it is always admitted. ``ceil``
    (None: the group's rate) is the most it may reach by borrowing rate its
    group-mates leave unused; ``weight`` is its share of that spare among
    contending borrowers. ``burst`` (None: the group's burst scaled by
    rate/group rate) sizes its guaranteed bucket, ``cburst`` (None: the
    larger of ``burst`` and the group's burst scaled by ceil/group rate) its
    ceiling bucket. All in the group meter's unit and ``per``.
    """

    name: str = attrs.field(validator=_check_tenant_meter)
    rate: int = 0
    ceil: int | None = None
    weight: float = 1.0
    burst: int | None = None
    cburst: int | None = None

    def resolved(self, group: MeterPolicy) -> TenantMeter:
        """This share with every default filled in from the group's meter."""
        ceil = group.rate if self.ceil is None else self.ceil
        burst = group.burst * self.rate // group.rate if self.burst is None else self.burst
        cburst = self.cburst
        if cburst is None:
            cburst = max(burst, group.burst * ceil // group.rate)
        return TenantMeter(
            self.name, rate=self.rate, ceil=ceil, weight=self.weight, burst=burst, cburst=cburst
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON, keyed by the meter's name; omits defaults."""
        out: dict[str, Any] = {}
        for field in attrs.fields(TenantMeter)[1:]:
            value = getattr(self, field.name)
            if value != field.default:
                out[field.name] = value
        return out


def _meter_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError("meters", "must be a sequence of meters")
    if not isinstance(value, Iterable):
        raise ConfigError("meters", f"must be a sequence of meters, got {value!r}")
    return tuple(value)


def _check_tenant_meters(owner: str, meters: tuple[Any, ...]) -> None:
    names: set[str] = set()
    for meter in meters:
        if not isinstance(meter, TenantMeter):
            raise ConfigError(f"{owner}: meters", f"must hold TenantMeter, got {meter!r}")
        if meter.name in names:
            raise ConfigError(f"{owner}: meters", f"meter {meter.name!r} is listed twice")
        names.add(meter.name)


def _check_group_meters(instance: GroupPolicy) -> None:
    """Meters of a group and its tenants: the HTB constraints, checked per meter."""
    who = f"group {instance.name!r}"
    meters: dict[str, MeterPolicy] = {}
    for meter in instance.meters:
        if not isinstance(meter, MeterPolicy):
            raise ConfigError(f"{who}: meters", f"must hold MeterPolicy, got {meter!r}")
        if meter.name in meters:
            raise ConfigError(f"{who}: meters", f"meter {meter.name!r} is listed twice")
        meters[meter.name] = meter
    if len(meters) > MAX_METERS:
        raise ConfigError(f"{who}: meters", f"at most {MAX_METERS} meters, got {len(meters)}")
    for tenant in (*instance.tenants, instance.default_tenant):
        owner = f"tenant {tenant.name!r}"
        for share in tenant.meters:
            group = meters.get(share.name)
            if group is None:
                raise ConfigError(
                    f"{owner}: meters.{share.name}",
                    f"the group {instance.name!r} declares no meter {share.name!r}",
                )
            _check_share(f"{owner}: meters.{share.name}", share, group)
    if instance.default_tenant.meters and any(m.rate for m in instance.default_tenant.meters):
        # Like the guarantee: strangers are unbounded in number, so none can be promised rate.
        raise ConfigError(f"{who}: default_tenant.meters", "rate must be 0 for unknown tenants")
    for name, group in meters.items():
        rates = 0
        bursts = 0
        for tenant in instance.tenants:
            listed = tenant.meter(name)
            if listed is not None:
                resolved = listed.resolved(group)
                rates += resolved.rate
                bursts += resolved.burst or 0
        if rates > group.rate:
            raise ConfigError(
                f"{who}: meters.{name}.rate",
                f"tenant rates sum to {rates}, above the group's rate {group.rate}",
            )
        if bursts > group.burst:
            raise ConfigError(
                f"{who}: meters.{name}.burst",
                f"tenant bursts sum to {bursts}, above the group's burst {group.burst}",
            )


def _check_share(where: str, share: TenantMeter, group: MeterPolicy) -> None:
    if share.rate > group.rate:
        raise ConfigError(
            f"{where}.rate", f"must be <= the group's rate {group.rate}, got {share.rate}"
        )
    resolved = share.resolved(group)
    ceil = resolved.ceil if resolved.ceil is not None else group.rate
    if ceil > group.rate:
        raise ConfigError(f"{where}.ceil", f"must be <= the group's rate {group.rate}, got {ceil}")
    burst = resolved.burst or 0
    cburst = resolved.cburst or 0
    # A bucket that never refills would be a one-off allowance whose refusals could never
    # name a time to retry: a burst needs a rate to refill it.
    if share.rate == 0 and burst > 0:
        raise ConfigError(f"{where}.burst", f"must be 0 when the rate is 0, got {burst}")
    if ceil == 0 and cburst > 0:
        raise ConfigError(f"{where}.cburst", f"must be 0 when the ceil is 0, got {cburst}")
    if burst > group.burst:
        raise ConfigError(
            f"{where}.burst", f"must be <= the group's burst {group.burst}, got {burst}"
        )
    if not burst <= cburst <= group.burst:
        raise ConfigError(
            f"{where}.cburst",
            f"must be within [burst {burst}, the group's burst {group.burst}], got {cburst}",
        )


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
    _check_tenant_meters(who, instance.meters)


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
    meters: tuple[TenantMeter, ...] = attrs.field(default=(), converter=_meter_tuple)

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
    _check_group_meters(instance)


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
    meters: tuple[MeterPolicy, ...] = attrs.field(default=(), converter=_meter_tuple)
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
        """Build a policy from plain data (parsed TOML or JSON)."""
        if not isinstance(data, Mapping):
            raise ConfigError("policy", "must be a table")
        _reject_unknown("policy", data, {"groups", "default_group"})
        groups_data = data.get("groups", [])
        if not isinstance(groups_data, list):
            raise ConfigError("policy.groups", "must be a list of tables")
        groups = []
        for index, group_data in enumerate(groups_data):
            where = f"groups[{index}]"
            if not isinstance(group_data, Mapping):
                raise ConfigError(where, "must be a table")
            _reject_unknown(
                where,
                group_data,
                {
                    "name",
                    "capacity",
                    "tenants",
                    "unknown_tenants",
                    "default_tenant",
                    "max_lease_ttl",
                    "shadow",
                    "meters",
                    "usage_retention",
                },
            )
            for required in ("name", "capacity"):
                if required not in group_data:
                    raise ConfigError(f"{where}.{required}", "is required")
            tenants_data = group_data.get("tenants", [])
            if not isinstance(tenants_data, list):
                raise ConfigError(f"{where}.tenants", "must be a list of tables")
            tenants = [_tenant_from(f"{where}.tenants[{i}]", t) for i, t in enumerate(tenants_data)]
            extra: dict[str, Any] = {}
            if "default_tenant" in group_data:
                default_data = group_data["default_tenant"]
                if not isinstance(default_data, Mapping):
                    raise ConfigError(
                        f"{where}.default_tenant",
                        f"must be a table (like {{ weight = 1 }}), got {default_data!r}",
                    )
                default_data = {"name": "*", **default_data}
                extra["default_tenant"] = _tenant_from(f"{where}.default_tenant", default_data)
            for key in ("unknown_tenants", "max_lease_ttl", "shadow", "usage_retention"):
                if key in group_data:
                    extra[key] = group_data[key]
            if "meters" in group_data:
                extra["meters"] = _meters_from(f"{where}.meters", group_data["meters"], MeterPolicy)
            with _positioned(where, "group"):
                group = GroupPolicy(
                    name=group_data["name"],
                    capacity=group_data["capacity"],
                    tenants=tuple(tenants),
                    **extra,
                )
            groups.append(group)
        return cls(groups=tuple(groups), default_group=data.get("default_group"))

    @classmethod
    def from_toml(cls, source: str | Path) -> Policy:
        """Read a policy file; errors name the file, the line and the field at fault."""
        from ratequota.tomlpos import load_toml

        return load_toml(source, cls.from_dict)


def _reject_unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})"
        )


def _tenant_from(where: str, data: object) -> TenantPolicy:
    if not isinstance(data, Mapping):
        raise ConfigError(where, "must be a table")
    _reject_unknown(where, data, {f.name for f in attrs.fields(TenantPolicy)})
    if "name" not in data:
        raise ConfigError(f"{where}.name", "is required")
    fields = dict(data)
    if "meters" in fields:
        fields["meters"] = _meters_from(f"{where}.meters", fields["meters"], TenantMeter)
    with _positioned(where, "tenant"):
        return TenantPolicy(**fields)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns or raises


@contextlib.contextmanager
def _positioned(where: str, kind: str) -> Iterator[None]:
    """Name a validator's field by its position in the data when its owner cannot be found.

    Validators name fields by owner (``tenant 'a': weight``), which a policy
    file can be searched for; but not a bad name (``tenant.name``) nor the
    default tenant (``tenant '*'``). Those get their position instead
    (``groups[0].default_tenant.weight``), keeping the owner in the message.
    """
    try:
        yield
    except ConfigError as exc:
        field = exc.field
        owner, sep, attribute = field.partition(": ")
        default = where.endswith(".default_tenant")
        if sep and not default:
            raise
        if not sep:
            owner, attribute = "", field.removeprefix(f"{kind}.")
        message = str(exc)[len(field) + 2 :]
        suffix = f" ({owner})" if owner and not default else ""
        raise ConfigError(f"{where}.{attribute}", f"{message}{suffix}") from None


M = TypeVar("M", MeterPolicy, TenantMeter)


def _meters_from(where: str, data: object, kind: type[M]) -> tuple[M, ...]:
    """Meters from a table keyed by meter name (``[groups.meters.tokens]``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(where, "must be a table of meters keyed by name")
    known = {f.name for f in attrs.fields(kind)} - {"name"}
    meters = []
    for name, fields in data.items():
        _meter_name(f"{where}.{name}", name)
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{where}.{name}", "must be a table")
        _reject_unknown(f"{where}.{name}", fields, known)
        if kind is MeterPolicy:
            for required in ("rate", "burst"):
                if required not in fields:
                    raise ConfigError(f"{where}.{name}.{required}", "is required")
        try:
            meters.append(kind(name, **fields))
        except ConfigError as exc:
            # "meter 'tokens': ceil" -> "groups[0].meters.tokens.ceil", which tomlpos can place.
            message = str(exc)[len(exc.field) + 2 :]
            suffix = exc.field.partition(": ")[2]
            raise ConfigError(
                f"{where}.{name}" + (f".{suffix}" if suffix else ""), message
            ) from exc
    return tuple(meters)
