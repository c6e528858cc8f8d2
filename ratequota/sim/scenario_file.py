"""Scenario files: TOML with a ``[simulation]`` table and the policy's ``[[groups]]``.

Each ``[[groups.tenants]]`` may carry a ``traffic`` table; the rest of a
group is read by the policy as in a policy file (meters included). Errors
name the file and the field (and the line where TOML gives one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ratequota.errors import ConfigError
from ratequota.policy import Policy
from ratequota.sim.scenario import Scenario, TenantLoad, Traffic
from ratequota.tomlpos import load_toml

__all__ = ["load_scenario", "scenario_from_dict"]

_SIMULATION_KEYS = {
    "name",
    "duration",
    "pods",
    "lease_ttl",
    "acquire_timeout",
    "sample_interval",
    "seed",
}
_TRAFFIC_KEYS = {f.name for f in attrs.fields(Traffic)}


def scenario_from_dict(data: Mapping[str, Any], *, name: str = "custom") -> Scenario:
    """Build a scenario from parsed TOML; ``ConfigError`` names the field at fault."""
    if not isinstance(data, Mapping):
        raise ConfigError("scenario", "must be a table")
    unknown = sorted(set(data) - {"simulation", "groups", "default_group"})
    if unknown:
        raise ConfigError(unknown[0], "unknown top-level table (known: simulation, groups)")
    sim = data.get("simulation", {})
    if not isinstance(sim, Mapping):
        raise ConfigError("simulation", "must be a table")
    extra = sorted(set(sim) - _SIMULATION_KEYS)
    if extra:
        raise ConfigError(
            f"simulation.{extra[0]}",
            f"unknown field (known: {', '.join(sorted(_SIMULATION_KEYS))})",
        )
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ConfigError("groups", "a scenario needs at least one [[groups]] table")
    policy_groups: list[dict[str, Any]] = []
    traffic: list[tuple[str, str, Traffic]] = []
    for gi, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise ConfigError(f"groups[{gi}]", "must be a table")
        stripped = dict(group)
        tenants = group.get("tenants", [])
        if isinstance(tenants, list):
            stripped["tenants"] = []
            for ti, tenant in enumerate(tenants):
                if not isinstance(tenant, Mapping):
                    raise ConfigError(f"groups[{gi}].tenants[{ti}]", "must be a table")
                tenant = dict(tenant)
                spec = tenant.pop("traffic", None)
                stripped["tenants"].append(tenant)
                if spec is not None:
                    where = f"groups[{gi}].tenants[{ti}].traffic"
                    traffic.append(
                        (
                            str(tenant.get("name")),
                            str(group.get("name")),
                            _traffic_from(where, spec),
                        )
                    )
        policy_groups.append(stripped)
    policy_data: dict[str, Any] = {"groups": policy_groups}
    if "default_group" in data:
        policy_data["default_group"] = data["default_group"]
    policy = Policy.from_dict(policy_data)
    settings = {k: sim[k] for k in _SIMULATION_KEYS - {"name"} if k in sim}
    return Scenario(
        name=str(sim.get("name", name)),
        policy=policy,
        loads=tuple(TenantLoad(t, g, spec) for t, g, spec in traffic),
        **settings,
    )


def _traffic_from(where: str, spec: object) -> Traffic:
    if not isinstance(spec, Mapping):
        raise ConfigError(where, "must be a table")
    unknown = sorted(set(spec) - _TRAFFIC_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(_TRAFFIC_KEYS))})"
        )
    try:
        return Traffic(**spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file; errors name the file, the line where known, and the field."""
    path = Path(path)
    return load_toml(path, lambda data: scenario_from_dict(data, name=path.stem))
