"""A policy from plain data (parsed TOML or JSON): every field checked and named.

``Policy.from_dict`` (and through it ``Policy.from_toml``, with
``tomlpos`` adding the file and line) lands here. Unknown fields are
refused by name; a validator's error is re-labelled with the field's
position in the data (``groups[0].tenants[2].weight``) when its owner
cannot be named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import attrs

from ratequota.errors import ConfigError
from ratequota.meter_policy import MeterPolicy, TenantMeter, meter_name
from ratequota.policy import GroupPolicy, Policy, TenantPolicy

__all__ = ["policy_from_dict"]


def policy_from_dict(data: Mapping[str, Any]) -> Policy:
    """Build a policy from plain data; the inverse of ``Policy.to_dict``."""
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
    return Policy(groups=tuple(groups), default_group=data.get("default_group"))


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
        meter_name(f"{where}.{name}", name)
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
