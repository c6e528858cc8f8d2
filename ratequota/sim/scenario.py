"""Simulation scenarios: a policy plus the traffic each tenant sends, pure and validated.

A scenario is what ``ratequota simulate`` plays: the groups and tenants of a
policy, and for every tenant a *traffic* description saying how many batches
it wants in flight at each moment, how many units each takes and how long
each runs. Traffic is closed-loop: a tenant with concurrency 6 keeps six
requests outstanding (waiting or running) while it is active, like a batch
client with six workers.

A group may declare rate meters (``[groups.meters.tokens]``, parsed by the
policy as in a policy file). A tenant's ``tokens`` is then the estimate of
every batch: its pods acquire with ``tokens=estimate`` (and ``requests=1``
when the group meters requests), and settle, when the batch ends, at what it
really used: the estimate times a factor drawn uniformly (seeded) from
``actual = [low, high]`` — ``[0.5, 1.5]`` is an estimator that runs high and
low in turn.

Three patterns cover what a region sees:

* ``steady`` — ``concurrency`` requests in flight for the whole run;
* ``bursty`` — ``concurrency`` during a burst, ``low`` between bursts; bursts
  take ``duty`` of every ``period``;
* ``lender`` — steady, except idle between ``idle_from`` and ``idle_until``:
  the tenant lends its guarantee out, then comes back and must get it back.

Times that shape the schedule (``period``, ``idle_from``, ``idle_until``,
``start``, ``stop``) are fractions of the run, so one scenario plays the same
story in 5 s or in 60 s; ``hold`` (how long one batch runs) is in seconds.

Scenario files are TOML (read by ``ratequota.sim.scenario_file``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from ratequota.errors import ConfigError
from ratequota.policy import GroupPolicy, Policy, TenantMeter, TenantPolicy

__all__ = [
    "Pattern",
    "Scenario",
    "TenantLoad",
    "Traffic",
    "default_scenario",
]

Pattern = Literal["steady", "bursty", "lender"]

_PATTERNS = ("steady", "bursty", "lender")


def _number(field: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, f"must be a number, got {value!r}")
    if not low <= value <= high:
        bound = f"within [{low:g}, {high:g}]" if high != math.inf else f">= {low:g}"
        raise ConfigError(field, f"must be {bound}, got {value}")
    return float(value)


def _count(field: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")
    return value


def _check_traffic(instance: Traffic, _attr: attrs.Attribute[str], _value: str) -> None:
    if instance.pattern not in _PATTERNS:
        raise ConfigError(
            "pattern", f"must be one of {', '.join(_PATTERNS)}, got {instance.pattern!r}"
        )
    _count("concurrency", instance.concurrency, low=1)
    _count("units", instance.units, low=1)
    _number("hold", instance.hold, low=0.01, high=3600)
    _count("low", instance.low, low=0)
    if instance.low > instance.concurrency:
        raise ConfigError(
            "low", f"must be <= concurrency ({instance.concurrency}), got {instance.low}"
        )
    _number("period", instance.period, low=0.01, high=1)
    _number("duty", instance.duty, low=0.01, high=1)
    _number("idle_from", instance.idle_from, low=0, high=1)
    _number("idle_until", instance.idle_until, low=0, high=1)
    if instance.idle_until <= instance.idle_from:
        raise ConfigError("idle_until", "must be after idle_from")
    _number("start", instance.start, low=0, high=1)
    _number("stop", instance.stop, low=0, high=1)
    if instance.stop <= instance.start:
        raise ConfigError("stop", "must be after start")
    _count("tokens", instance.tokens, low=0)
    if not isinstance(instance.actual, tuple) or len(instance.actual) != 2:
        raise ConfigError("actual", f"must be [low, high], got {instance.actual!r}")
    low = _number("actual", instance.actual[0], low=0, high=100)
    if _number("actual", instance.actual[1], low=0, high=100) < low:
        raise ConfigError("actual", f"[low, high] needs high >= low, got {list(instance.actual)}")


def _pair(value: object) -> object:
    """A TOML array ``[low, high]`` as a tuple (anything else is left for the validator)."""
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen
class Traffic:
    """How one tenant loads its group over the run (see the module docstring)."""

    pattern: Pattern = attrs.field(default="steady", validator=_check_traffic)
    concurrency: int = 4
    units: int = 1
    hold: float = 0.5
    low: int = 0
    period: float = 0.2
    duty: float = 0.5
    idle_from: float = 0.3
    idle_until: float = 0.6
    start: float = 0.0
    stop: float = 1.0
    tokens: int = 0
    actual: tuple[float, float] = attrs.field(default=(1.0, 1.0), converter=_pair)

    def actual_tokens(self, draw: float) -> int:
        """Tokens a batch really used, for ``draw`` uniform in [0, 1): the estimate scaled
        by a factor between ``actual[0]`` and ``actual[1]``, so estimates run high and low."""
        low, high = self.actual
        return round(self.tokens * (low + (high - low) * draw))

    def mean_tokens(self) -> float:
        """The mean tokens a batch really uses."""
        return self.tokens * (self.actual[0] + self.actual[1]) / 2

    def concurrency_at(self, fraction: float) -> int:
        """Requests the tenant wants in flight at ``fraction`` (0..1) of the run."""
        if not self.start <= fraction < self.stop:
            return 0
        if self.pattern == "bursty":
            phase = ((fraction - self.start) / self.period) % 1.0
            return self.concurrency if phase < self.duty else self.low
        if self.pattern == "lender" and self.idle_from <= fraction < self.idle_until:
            return 0
        return self.concurrency

    def active_until(self, index: int, fraction: float) -> float:
        """Fraction of the run at which slot ``index`` (0-based), active at ``fraction``, stops.

        1.0 when it stays active to the end. A worker waits for a lease no
        longer than this: a burst's extra requests end with the burst.
        """
        for point in self.changes():
            if point > fraction and index >= self.concurrency_at(point):
                return point
        return 1.0

    def next_active(self, index: int, fraction: float) -> float:
        """Fraction of the run at which slot ``index``, idle at ``fraction``, is next active.

        1.0 when it never is again: an idle worker sleeps until then instead of polling.
        """
        for point in self.changes():
            if point > fraction and index < self.concurrency_at(point):
                return point
        return 1.0

    def changes(self) -> list[float]:
        """Fractions of the run where the concurrency may change (sorted, within [0, 1])."""
        points = {0.0, self.start, self.stop}
        if self.pattern == "lender":
            points |= {self.idle_from, self.idle_until}
        elif self.pattern == "bursty":
            k = 0
            while self.start + k * self.period < self.stop and k < 10_000:
                base = self.start + k * self.period
                points |= {base, base + self.duty * self.period}
                k += 1
        return sorted(p for p in points if 0.0 <= p <= 1.0)

    def demand_at(self, fraction: float) -> int:
        """Units the tenant asks for at ``fraction`` of the run (in flight times units)."""
        return self.concurrency_at(fraction) * self.units


@attrs.frozen
class TenantLoad:
    """One tenant's traffic, with the group it is charged to."""

    tenant: str
    group: str
    traffic: Traffic


def _check_scenario(instance: Scenario, _attr: attrs.Attribute[str], _value: str) -> None:
    _number("simulation.duration", instance.duration, low=0.5, high=3600)
    _count("simulation.pods", instance.pods, low=1)
    if instance.pods > 1000:
        raise ConfigError("simulation.pods", f"must be <= 1000, got {instance.pods}")
    _number("simulation.lease_ttl", instance.lease_ttl, low=1, high=3600)
    _number("simulation.acquire_timeout", instance.acquire_timeout, low=0, high=600)
    _number("simulation.sample_interval", instance.sample_interval, low=0.01, high=60)
    _count("simulation.seed", instance.seed, low=0)
    if not instance.loads:
        raise ConfigError(
            "groups", "no tenant has traffic: give at least one tenant a traffic table"
        )
    for load in instance.loads:
        group = instance.policy.group(load.group)
        if group is None or group.tenant(load.tenant) is None:
            raise ConfigError(f"tenant {load.tenant!r}", f"is not a tenant of group {load.group!r}")
        largest = min(group.capacity, group.tenant(load.tenant).ceiling)  # type: ignore[union-attr]
        if load.traffic.units > largest:
            raise ConfigError(
                f"tenant {load.tenant!r}: traffic.units",
                f"{load.traffic.units} units can never be admitted (at most {largest:g})",
            )
        if load.traffic.tokens:
            _check_tokens(group, load)
        if load.traffic.hold >= instance.lease_ttl:
            raise ConfigError(
                f"tenant {load.tenant!r}: traffic.hold",
                f"must be shorter than simulation.lease_ttl ({instance.lease_ttl:g} s)",
            )


def _check_tokens(group: GroupPolicy, load: TenantLoad) -> None:
    """A token estimate needs a ``tokens`` meter in the group, and must fit its buckets."""
    field = f"tenant {load.tenant!r}: traffic.tokens"
    spec = group.meter("tokens")
    if spec is None:
        raise ConfigError(field, f"group {group.name!r} declares no tokens meter")
    policy = group.tenant(load.tenant)
    assert policy is not None
    share = (policy.meter("tokens") or TenantMeter("tokens")).resolved(spec)
    assert share.cburst is not None
    if load.traffic.tokens > share.cburst:
        raise ConfigError(
            field, f"{load.traffic.tokens} can never be admitted (its cburst is {share.cburst})"
        )


@attrs.frozen
class Scenario:
    """A policy, each tenant's traffic, and how to run them."""

    name: str = attrs.field(validator=_check_scenario)
    policy: Policy
    loads: tuple[TenantLoad, ...]
    duration: float = 20.0
    pods: int = 60
    lease_ttl: float = 10.0
    acquire_timeout: float = 2.0
    sample_interval: float = 0.2
    seed: int = 0

    def load_of(self, tenant: str) -> TenantLoad | None:
        """The traffic of ``tenant`` (None when it sends none)."""
        for load in self.loads:
            if load.tenant == tenant:
                return load
        return None

    def group_loads(self, group: str) -> list[TenantLoad]:
        """The loads charged to ``group``, in policy order."""
        return [load for load in self.loads if load.group == group]

    def workers(self) -> int:
        """Threads the run needs: the peak concurrency of every tenant, summed."""
        return sum(load.traffic.concurrency for load in self.loads)

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with the given run settings replaced (None values are ignored)."""
        return attrs.evolve(self, **{k: v for k, v in changes.items() if v is not None})


# -- the default scenario ------------------------------------------------------


def default_scenario() -> Scenario:
    """A region in miniature: three groups, steady and bursty tenants, a lender that returns.

    * ``search`` (48 units): ``web`` is steady and weighted 2, ``batch`` bursts,
      ``research`` lends its 16 units while idle and comes back for them,
      ``adhoc`` has no guarantee and lives on borrowed capacity.
    * ``chat`` (32 units): ``prod`` keeps half of its guarantee in reserve,
      ``eval`` borrows, ``staging`` bursts.
    * ``embed`` (16 units): two saturating tenants with equal guarantees and
      weights 3 and 1 split the spare capacity 3:1.
    """
    steady: Pattern = "steady"
    bursty: Pattern = "bursty"
    lender: Pattern = "lender"
    plan: list[tuple[str, int, list[tuple[TenantPolicy, Traffic]]]] = [
        (
            "search",
            48,
            [
                (TenantPolicy("web", guarantee=16, weight=2), Traffic(steady, 10, 2, 1.2)),
                (
                    TenantPolicy("research", guarantee=16),
                    Traffic(lender, 4, 4, 1.6, idle_from=0.25, idle_until=0.55),
                ),
                (
                    TenantPolicy("batch", guarantee=8, borrow_limit=16),
                    Traffic(bursty, 8, 2, 0.6, low=1, period=0.5, duty=0.5),
                ),
                (
                    TenantPolicy("adhoc", guarantee=0, weight=0.5, borrow_limit=16),
                    Traffic(steady, 6, 2, 0.6),
                ),
            ],
        ),
        (
            "chat",
            32,
            [
                (TenantPolicy("prod", guarantee=20, lendable=0.5), Traffic(steady, 6, 2, 1.0)),
                (TenantPolicy("eval", guarantee=8, borrow_limit=16), Traffic(steady, 8, 2, 0.8)),
                (
                    TenantPolicy("staging", guarantee=4),
                    Traffic(bursty, 6, 2, 0.5, period=0.5, duty=0.5),
                ),
            ],
        ),
        (
            "embed",
            16,
            [
                (TenantPolicy("alpha", guarantee=4, weight=3), Traffic(steady, 13, 1, 1.0)),
                (TenantPolicy("beta", guarantee=4, weight=1), Traffic(steady, 5, 1, 1.0)),
            ],
        ),
    ]
    groups = []
    loads = []
    for name, capacity, tenants in plan:
        groups.append(GroupPolicy(name, capacity=capacity, tenants=tuple(t for t, _ in tenants)))
        loads += [TenantLoad(t.name, name, traffic) for t, traffic in tenants]
    return Scenario(name="default region", policy=Policy(tuple(groups)), loads=tuple(loads))
