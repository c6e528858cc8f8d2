"""Bookkeeping and statistics of a simulation run, as pure functions over recorded events.

The simulation's threads only record what happened — a lease held from
``start`` to ``end`` (``Interval``), a request decided after waiting
(``Outcome``), a group snapshot taken (``Sample``) — and every figure is
computed here afterwards (``ratequota.sim.report`` prints them): units held
over time, peaks, borrowed unit-seconds, percentiles of waiting, how long a
returning lender took to get its guarantee back, utilisation, Jain's fairness
index, each tenant's entitlement (``ratequota.sim.measure``) and the safety
checks. What a run records and the plain statistics over step functions are in
``ratequota.sim.series`` (re-exported here). Times are seconds since the start of the run.

Two independent safety checks:

* from the *snapshots* (Redis's own view, one script call per group): units
  held never exceed the capacity, nor any tenant's ``G + B``;
* from the *client-side intervals*: a lease is recorded as held only between
  the acquire returning and the release being sent, a sub-interval of its life
  in Redis, so the sum of recorded intervals at any instant must also stay
  within the capacity. This check sees every instant, not only sampled ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from ratequota.fairness import group_allocation
from ratequota.policy import GroupPolicy
from ratequota.sim.measure import Gap, Request, measure_group
from ratequota.sim.scenario import Scenario
from ratequota.sim.series import (
    Interval,
    Outcome,
    Sample,
    binned_average,
    integral,
    jain_index,
    level_at,
    peak,
    percentile,
    reclaim_time,
    step_function,
)
from ratequota.sim.tokens import GroupTokens, SettlementTotals, TokenReport

__all__ = [
    "GroupReport",
    "Interval",
    "Outcome",
    "Report",
    "Sample",
    "TenantReport",
    "binned_average",
    "build_report",
    "expected_limits",
    "integral",
    "jain_index",
    "level_at",
    "percentile",
    "reclaim_time",
    "step_function",
]


def _has_shadow(group: GroupPolicy) -> bool:
    """True when shadow mode may take ``group`` above its capacity (docs/metrics.md):
    the group is in shadow mode, or one of its tenants (or its default tenant) is.
    Such groups are left out of the capacity checks; their ``over_admission``
    is still reported, as what enforcement would have prevented."""
    return group.shadow or group.default_tenant.shadow or any(t.shadow for t in group.tenants)


def expected_limits(
    group: GroupPolicy, scenario: Scenario, *, step: float = 0.05
) -> dict[str, list[tuple[float, float, float]]]:
    """The reference fair limits over the run for the scenario's *intended* demand.

    For every tenant with traffic: ``(time, demand, limit)`` on a grid of
    ``step`` seconds, computed by ``ratequota.fairness`` from what each tenant
    asks for at that moment, independent of what the system actually did.
    """
    loads = scenario.group_loads(group.name)
    out: dict[str, list[tuple[float, float, float]]] = {load.tenant: [] for load in loads}
    count = max(1, round(scenario.duration / step))
    for k in range(count):
        at = (k + 0.5) * scenario.duration / count
        fraction = at / scenario.duration
        demand = {load.tenant: float(load.traffic.demand_at(fraction)) for load in loads}
        allocation = group_allocation(group, demand, extra=list(demand))
        for load in loads:
            out[load.tenant].append((at, demand[load.tenant], allocation.limit(load.tenant)))
    return out


@attrs.frozen
class TenantReport:
    """What one tenant asked for and got.

    ``fair_limit``: with a measure (``gap``), the units owed averaged over the
    run (entitlement / duration); without one, the mean reference limit for
    the scenario's intended demand. ``share_of_entitlement``: got / owed.
    """

    tenant: str
    group: str
    guarantee: int
    weight: float
    pattern: str
    fair_limit: float
    live_limit: float
    peak_units: int
    admitted: int
    refused: int
    wait_p50: float
    wait_p99: float
    borrowed_unit_seconds: float
    share_of_entitlement: float
    reclaim_seconds: float | None
    is_lender: bool
    gap: Gap | None = None


@attrs.frozen
class GroupReport:
    """One group over the run."""

    group: str
    capacity: int
    utilisation: float
    utilisation_of_demand: float
    jain: float
    peak_units: int
    over_admission: int


@attrs.frozen
class Report:
    """Everything ``ratequota simulate`` prints, and whether the run was safe."""

    scenario: str
    backend: str
    pods: int
    duration: float
    tenants: tuple[TenantReport, ...]
    groups: tuple[GroupReport, ...]
    samples: int
    sampled_over_admission: int
    interval_over_admission: int
    tenant_over_ceiling: int
    inconsistent_samples: int
    decisions: int
    script_calls: int
    lost_leases: int
    left_over_units: int
    problems: tuple[str, ...]
    pending_ttl: float = 2.0
    round_trip: float = math.nan
    #: Token meters (``ratequota.sim.tokens``): per tenant and group, and the settlement.
    tokens: tuple[TokenReport, ...] = ()
    token_groups: tuple[GroupTokens, ...] = ()
    settlement: SettlementTotals | None = None

    @property
    def max_over_admission(self) -> int:
        """Most units held above a group's capacity, by either check (must be 0)."""
        return max(self.sampled_over_admission, self.interval_over_admission)

    @property
    def safe(self) -> bool:
        """True when no safety invariant was violated."""
        return not self.problems

    @property
    def decisions_per_second(self) -> float:
        """Requests decided (admitted or refused) per second of the run."""
        return self.decisions / self.duration if self.duration > 0 else 0.0

    @property
    def script_calls_per_second(self) -> float:
        """Script round trips per second (retries of waiting requests included)."""
        return self.script_calls / self.duration if self.duration > 0 else 0.0


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def build_report(
    scenario: Scenario,
    intervals: Sequence[Interval],
    outcomes: Sequence[Outcome],
    samples: Sequence[Sample],
    *,
    elapsed: float,
    backend: str = "embedded fakeredis",
    script_calls: int = 0,
    round_trip: float = math.nan,
    lost_leases: int = 0,
    left_over_units: int = 0,
    requests: Sequence[Request] | None = None,
    pending_ttl: float = 2.0,
    bin_width: float = 0.0,
) -> Report:
    """Compute every statistic of a run from what its threads recorded.

    With ``requests`` (every request the workers made) each tenant's
    entitlement comes from the demand it really had (``ratequota.sim.measure``),
    with its gap split into causes; without them, from the demand the
    scenario intends (``expected_limits``), as a rough guide.
    """
    until = max(elapsed, 1e-9)
    tenants: list[TenantReport] = []
    groups: list[GroupReport] = []
    problems: list[str] = []
    interval_over = 0
    sampled_over = 0
    tenant_over = 0
    inconsistent = 0
    for sample in samples:
        group = scenario.policy.group(sample.group)
        if group is None:
            continue
        if not _has_shadow(group):
            sampled_over = max(sampled_over, sample.used - sample.capacity)
        if sum(sample.tenant_used.values()) != sample.used or sample.lease_units != sample.used:
            inconsistent += 1
        for name, units in sample.tenant_used.items():
            policy = group.tenant(name)
            if policy is None or group.shadow or policy.shadow:
                continue  # shadow mode admits above the limits on purpose
            if units > policy.ceiling:
                tenant_over = max(tenant_over, units - int(policy.ceiling))
    for group in scenario.policy.groups:
        loads = scenario.group_loads(group.name)
        if not loads:
            continue
        mine = [iv for iv in intervals if iv.group == group.name]
        group_steps = step_function(mine)
        group_over = max(0, peak(group_steps) - group.capacity)
        if not _has_shadow(group):
            interval_over = max(interval_over, group_over)
        expected = expected_limits(group, scenario)
        gaps: dict[str, Gap] = {}
        if requests is not None:
            gaps = measure_group(
                group,
                [rq for rq in requests if rq.group == group.name],
                {load.tenant: load.traffic.units for load in loads},
                {load.tenant: load.traffic.hold * 1.5 for load in loads},
                until=until,
                pending_ttl=pending_ttl,
                bin_width=bin_width,
            )
        shares: list[float] = []
        demanded = 0.0
        for load in loads:
            policy = group.tenant(load.tenant)
            assert policy is not None
            steps = step_function(iv for iv in mine if iv.tenant == load.tenant)
            held = integral(steps, until)
            grid = expected[load.tenant]
            dt = scenario.duration / max(1, len(grid))
            entitled = math.fsum(min(d, lim) * dt for _, d, lim in grid)
            demanded += math.fsum(d * dt for _, d, _ in grid)
            active_limits = [lim for _, d, lim in grid if d > 0]
            gap = gaps.get(load.tenant)
            if gap is not None:
                entitled = gap.entitled
                active_limits = [entitled / until]
            share = held / entitled if entitled > 0 else math.nan
            if entitled > 0:
                shares.append(share)
            live = [
                s.tenant_limit[load.tenant]
                for s in samples
                if s.group == group.name
                and load.tenant in s.tenant_limit
                and load.traffic.demand_at(min(s.at / scenario.duration, 1.0)) > 0
            ]
            mine_outcomes = [o for o in outcomes if o.tenant == load.tenant]
            waits = [o.wait for o in mine_outcomes if o.admitted]
            reclaim: float | None = None
            is_lender = load.traffic.pattern == "lender"
            if is_lender:
                back = load.traffic.idle_until * scenario.duration
                demand = load.traffic.concurrency * load.traffic.units
                target = min(demand, policy.guarantee) // load.traffic.units * load.traffic.units
                if back < until:
                    reclaim = reclaim_time(steps, back, target)
            tenants.append(
                TenantReport(
                    tenant=load.tenant,
                    group=group.name,
                    guarantee=policy.guarantee,
                    weight=policy.weight,
                    pattern=load.traffic.pattern,
                    fair_limit=_mean(active_limits),
                    live_limit=percentile(live, 50),
                    peak_units=peak(steps),
                    admitted=sum(1 for o in mine_outcomes if o.admitted),
                    refused=sum(1 for o in mine_outcomes if not o.admitted),
                    wait_p50=percentile(waits, 50),
                    wait_p99=percentile(waits, 99),
                    borrowed_unit_seconds=integral(steps, until, above=policy.guarantee),
                    share_of_entitlement=share,
                    reclaim_seconds=reclaim,
                    is_lender=is_lender,
                    gap=gap,
                )
            )
        used = integral(group_steps, until)
        groups.append(
            GroupReport(
                group=group.name,
                capacity=group.capacity,
                utilisation=used / (group.capacity * until),
                utilisation_of_demand=used / min(group.capacity * until, demanded)
                if demanded > 0
                else math.nan,
                jain=jain_index(shares),
                peak_units=peak(group_steps),
                over_admission=group_over,
            )
        )
    if sampled_over > 0:
        problems.append(f"a snapshot showed {sampled_over} units held above a group's capacity")
    if interval_over > 0:
        problems.append(f"leases held at one instant exceeded a capacity by {interval_over} units")
    if tenant_over > 0:
        problems.append(f"a tenant held {tenant_over} units above its guarantee + borrow limit")
    if inconsistent:
        problems.append(f"{inconsistent} snapshots whose leases did not add up to the units held")
    if left_over_units:
        problems.append(f"{left_over_units} units were still held after every lease was released")
    return Report(
        scenario=scenario.name,
        backend=backend,
        pods=scenario.pods,
        duration=until,
        tenants=tuple(tenants),
        groups=tuple(groups),
        samples=len(samples),
        sampled_over_admission=max(0, sampled_over),
        interval_over_admission=interval_over,
        tenant_over_ceiling=tenant_over,
        inconsistent_samples=inconsistent,
        decisions=len(outcomes),
        script_calls=script_calls,
        lost_leases=lost_leases,
        left_over_units=left_over_units,
        problems=tuple(problems),
        pending_ttl=pending_ttl,
        round_trip=round_trip,
    )
