"""Rate meters in the policy: a group's meters and each tenant's share of them (docs/rates.md).

Split from ``policy`` so each reads in one sitting; ``policy`` re-exports
``MeterPolicy``, ``TenantMeter``, ``MAX_METER`` and ``MAX_METERS``, and its
``GroupPolicy`` validator calls ``check_group_meters``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ratequota.errors import ConfigError

if TYPE_CHECKING:
    from ratequota.policy import GroupPolicy

__all__ = ["MAX_METER", "MAX_METERS", "MeterPolicy", "TenantMeter"]

#: Largest rate, burst or debt a meter may name: 2**36 tokens (about 6.9e10). The meter
#: arithmetic (ratequota/rates.py, lua/_meters.lua) counts in ticks, 60,000 to a token, so
#: that a rate per second or per minute refills an integer number of ticks every ms; a full
#: bucket of 2**36 tokens is then 2**36 * 60,000 ~ 4.1e15 ticks and the sum of two such
#: levels stays below 2**53, where doubles (Lua's numbers) stop being exact integers.
MAX_METER = 2**36

#: Most meters a group may declare. The enforcing scripts keep one contention set per meter
#: and must name every key up front (Redis Cluster), so the number is fixed: meter i of the
#: group's list uses key slot i (lua/_metered.lua, KEYS[8 + i]).
MAX_METERS = 4

#: How a meter's rates are spelled: tokens per second or per minute.
Per = Literal["second", "minute"]

_METER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

#: Weights a meter accepts: wide enough for any sane ratio, narrow enough that the
#: borrowing tags (tokens / weight) stay well inside a double's exact range.
MIN_METER_WEIGHT = 1e-3
MAX_METER_WEIGHT = 1e6


def int_within(field: str, value: object, low: int, high: int, spelled: str) -> int:
    """``value`` as an integer in ``[low, high]`` (``spelled``: ``high`` as a power, for the
    message), else a ``ConfigError`` naming ``field``; shared with ``policy``'s unit counts."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")
    if value > high:
        raise ConfigError(field, f"must be at most {spelled} ({high}), got {value}")
    return value


def _meter_int(field: str, value: object, low: int) -> int:
    return int_within(field, value, low, MAX_METER, "2**36")


def meter_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not _METER_NAME.match(value):
        raise ConfigError(
            field, f"must be a lowercase name (a-z, 0-9, _; up to 32 characters), got {value!r}"
        )
    return value


def _check_meter(instance: MeterPolicy, _attr: object, _value: str) -> None:
    name = meter_name("meter.name", instance.name)
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
    name = meter_name("meter.name", instance.name)
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


def meter_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError("meters", "must be a sequence of meters")
    if not isinstance(value, Iterable):
        raise ConfigError("meters", f"must be a sequence of meters, got {value!r}")
    return tuple(value)


def check_tenant_meters(owner: str, meters: tuple[Any, ...]) -> None:
    names: set[str] = set()
    for meter in meters:
        if not isinstance(meter, TenantMeter):
            raise ConfigError(f"{owner}: meters", f"must hold TenantMeter, got {meter!r}")
        if meter.name in names:
            raise ConfigError(f"{owner}: meters", f"meter {meter.name!r} is listed twice")
        names.add(meter.name)


def check_group_meters(instance: GroupPolicy) -> None:
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
