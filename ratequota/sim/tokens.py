"""Token meters in a simulation run: what the batches reserved, used and settled, per tenant.

A metered batch is admitted with its estimate (``tokens=estimate``), runs,
and is settled at what it really used; the worker records one ``Batch`` per
admitted lease and one ``MeterRefusal`` per refused try (``DecisionTap``
sees every try of a waiting acquire, not only the last). Everything else is
computed here afterwards, as pure functions (``ratequota.sim.metering``
records them):

* each tenant's tokens/s over the run against its guaranteed ``rate`` and
  its ``ceil``, and against what it asked for (its closed-loop demand, from
  the scenario);
* the bounds the meters promise over a window of ``T`` seconds, checked on
  what they let through (used, less what the debt bound forgave): a tenant
  at most ``ceil·T + cburst + debt``, the group at most ``rate·T + burst +
  debt`` (``debt``: the most a settlement above the estimate may leave
  owing, docs/rates.md);
* the settlement totals, which must add up: reserved − refunds + debts =
  settled + the estimates of leases never settled.

Rates are in tokens per second whatever the meter's ``per``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter
from ratequota.sim.metering import Batch, MeterRefusal
from ratequota.sim.scenario import Scenario

__all__ = [
    "GroupTokens",
    "SettlementTotals",
    "TenantSeries",
    "TokenReport",
    "group_tokens",
    "settlement_totals",
    "token_problems",
    "token_reports",
    "token_series",
    "tokens_per_second",
]


def _per_second(value: float, spec: MeterPolicy) -> float:
    return value / 60.0 if spec.per == "minute" else float(value)


@attrs.frozen
class TokenReport:
    """One tenant's tokens over the run, in tokens/s, beside its share of the meter.

    ``used``: tokens its batches used (settled actuals; a batch never settled
    counts its estimate) per second of the run; ``asked``: its closed-loop
    demand (slots active × mean tokens of a batch / mean batch time);
    ``charged``: what the meters let through (``used`` less what the debt bound
    forgave), per second; ``bound``: the
    most ``charged`` may reach over the run, ``ceil + (cburst + debt)/T``.
    ``refusals``: refused tries by meter (``lease``: by the concurrency rule);
    ``reasons``: the same by ``meter:reason`` (``tokens:share``, ``lease:group_full``).
    """

    tenant: str
    group: str
    rate: float
    ceil: float
    burst: int
    cburst: int
    asked: float
    used: float
    charged: float
    bound: float
    batches: int
    reserved: int
    refunds: int
    debts: int
    forgiven: float
    refusals: Mapping[str, int]
    reasons: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def within_rate(self) -> bool:
        """True when the tenant asked no more than its guaranteed rate."""
        return self.asked <= self.rate


@attrs.frozen
class SettlementTotals:
    """Tokens reserved at admission and how settlement moved them, over every metered lease.

    ``reserved − refunds + debts = settled + kept`` (``kept``: estimates of
    leases never settled); ``forgiven`` is what the debt bound let go.
    """

    batches: int
    reserved: int
    refunds: int
    debts: int
    settled: int
    kept: int
    forgiven: float

    @property
    def adds_up(self) -> bool:
        """True when reserved − refunds + debts equals settled + kept."""
        return self.reserved - self.refunds + self.debts == self.settled + self.kept


def settlement_totals(batches: Iterable[Batch]) -> SettlementTotals:
    """The settlement totals of ``batches``."""
    rows = list(batches)
    return SettlementTotals(
        batches=len(rows),
        reserved=sum(b.estimate for b in rows),
        refunds=sum(-b.delta for b in rows if b.settled and b.delta < 0),
        debts=sum(b.delta for b in rows if b.settled and b.delta > 0),
        settled=sum(b.actual for b in rows if b.settled),
        kept=sum(b.estimate for b in rows if not b.settled),
        forgiven=math.fsum(max(0.0, b.clipped) for b in rows),
    )


def _share(group: GroupPolicy, tenant: str, spec: MeterPolicy) -> TenantMeter:
    policy = group.tenant(tenant) or group.default_tenant
    return (policy.meter(spec.name) or TenantMeter(spec.name)).resolved(spec)


def _asked(scenario: Scenario, tenant: str) -> float:
    """Closed-loop demand in tokens/s: every active slot runs batches back to back."""
    load = scenario.load_of(tenant)
    if load is None or not load.traffic.tokens:
        return 0.0
    traffic = load.traffic
    points = [*traffic.changes(), 1.0]
    slot_fraction = math.fsum(
        traffic.concurrency_at(lo) * (hi - lo) for lo, hi in itertools.pairwise(points)
    )
    return slot_fraction * traffic.mean_tokens() / traffic.hold


def token_reports(
    scenario: Scenario,
    batches: Sequence[Batch],
    refusals: Sequence[MeterRefusal],
    *,
    until: float,
) -> tuple[TokenReport, ...]:
    """One ``TokenReport`` per tenant with traffic in a group that meters tokens."""
    window = max(until, 1e-9)
    out: list[TokenReport] = []
    for group in scenario.policy.groups:
        spec = group.meter("tokens")
        if spec is None:
            continue
        for load in scenario.group_loads(group.name):
            share = _share(group, load.tenant, spec)
            assert share.ceil is not None and share.burst is not None
            assert share.cburst is not None
            mine = [b for b in batches if b.tenant == load.tenant and b.start < until]
            counts: dict[str, int] = {}
            reasons: dict[str, int] = {}
            for refusal in refusals:
                if refusal.tenant == load.tenant and refusal.at < until:
                    counts[refusal.meter] = counts.get(refusal.meter, 0) + 1
                    why = f"{refusal.meter}:{refusal.reason}"
                    reasons[why] = reasons.get(why, 0) + 1
            totals = settlement_totals(mine)
            ceil = _per_second(share.ceil, spec)
            out.append(
                TokenReport(
                    tenant=load.tenant,
                    group=group.name,
                    rate=_per_second(share.rate, spec),
                    ceil=ceil,
                    burst=share.burst,
                    cburst=share.cburst,
                    asked=_asked(scenario, load.tenant),
                    used=sum(b.used for b in mine) / window,
                    charged=math.fsum(b.charged for b in mine) / window,
                    bound=ceil + (share.cburst + spec.debt_limit) / window,
                    batches=len(mine),
                    reserved=totals.reserved,
                    refunds=totals.refunds,
                    debts=totals.debts,
                    forgiven=totals.forgiven,
                    refusals=dict(sorted(counts.items())),
                    reasons=dict(sorted(reasons.items())),
                )
            )
    return tuple(out)


@attrs.frozen
class GroupTokens:
    """One metered group over the run: tokens/s used and charged against its ``rate``;
    ``bound`` is the most ``charged`` may reach, ``rate + (burst + debt)/T``."""

    group: str
    rate: float
    burst: int
    used: float
    charged: float
    bound: float


def group_tokens(
    scenario: Scenario, batches: Sequence[Batch], *, until: float
) -> tuple[GroupTokens, ...]:
    """One ``GroupTokens`` per group that meters tokens and has traffic."""
    window = max(until, 1e-9)
    out = []
    for group in scenario.policy.groups:
        spec = group.meter("tokens")
        if spec is None or not scenario.group_loads(group.name):
            continue
        mine = [b for b in batches if b.group == group.name and b.start < until]
        rate = _per_second(spec.rate, spec)
        out.append(
            GroupTokens(
                group=group.name,
                rate=rate,
                burst=spec.burst,
                used=sum(b.used for b in mine) / window,
                charged=math.fsum(b.charged for b in mine) / window,
                bound=rate + (spec.burst + spec.debt_limit) / window,
            )
        )
    return tuple(out)


def token_problems(
    tenants: Iterable[TokenReport],
    groups: Iterable[GroupTokens],
    totals: SettlementTotals,
    *,
    exempt: Collection[str] = (),
) -> list[str]:
    """The meters' promises the run broke (empty: all held).

    Groups named in ``exempt`` (in shadow mode, which admits above the
    meters on purpose) are left out of the bounds; settlement must add up
    everywhere.
    """
    over = [
        (f"tenant {t.tenant!r}", t.charged, t.bound, "ceil + (cburst + debt)/T")
        for t in tenants
        if t.group not in exempt
    ] + [
        (f"group {g.group!r}", g.charged, g.bound, "rate + (burst + debt)/T")
        for g in groups
        if g.group not in exempt
    ]
    problems = [
        f"{who} was charged {charged:.1f} tokens/s, above its bound {bound:.1f} ({formula})"
        for who, charged, bound, formula in over
        if charged > bound * (1 + 1e-9)
    ]
    if not totals.adds_up:
        problems.append(
            f"settlement does not add up: reserved {totals.reserved} - refunds {totals.refunds} "
            f"+ debts {totals.debts} != settled {totals.settled} + kept {totals.kept}"
        )
    return problems


def tokens_per_second(
    batches: Iterable[Batch], until: float, width: float
) -> tuple[list[float], list[float]]:
    """Tokens/s over consecutive bins of ``width`` s: (bin centres, rates).

    Each batch's tokens are spread evenly over the time it ran (a model
    generates while its lease is held), so a rate is not a comb of
    settlement instants.
    """
    count = max(1, math.ceil(until / width))
    used = [0.0] * count
    for b in batches:
        lo, end = b.start, max(b.end, b.start)
        if end <= lo:
            if lo < until:
                used[min(count - 1, int(lo / width))] += b.used
            continue
        # A batch running past the window keeps its rate; the share of its run each bin
        # overlaps is taken first, so a vanishingly short batch cannot overflow a rate.
        length = end - lo
        hi = min(end, until)
        k = int(lo / width)
        while k < count and k * width < hi:
            overlap = min(hi, (k + 1) * width) - max(lo, k * width)
            if overlap > 0:
                used[k] += b.used * (overlap / length)
            k += 1
    centres = [min(until, (k + 0.5) * width) for k in range(count)]
    spans = [min(until, (k + 1) * width) - k * width for k in range(count)]
    return centres, [u / s if s > 0 else 0.0 for u, s in zip(used, spans, strict=True)]


@attrs.frozen
class TenantSeries:
    """What the pictures draw of one tenant: tokens/s at ``times``, its rate and ceil."""

    tenant: str
    times: Sequence[float]
    rates: Sequence[float]
    rate: float
    ceil: float
    group_rate: float


def token_series(
    batches: Sequence[Batch], scenario: Scenario, until: float
) -> list[tuple[GroupPolicy, float, tuple[list[float], list[float]], list[TenantSeries]]]:
    """Per group metering tokens of a run's ``batches``: (group, bin width, group total, one
    series per tenant)."""
    width = max(0.25, until / 40)
    out = []
    for group in scenario.policy.groups:
        spec = group.meter("tokens")
        loads = scenario.group_loads(group.name)
        if spec is None or not loads:
            continue
        mine = [b for b in batches if b.group == group.name]
        total = tokens_per_second(mine, until, width)
        lines = []
        for load in loads:
            share = _share(group, load.tenant, spec)
            assert share.ceil is not None
            times, rates = tokens_per_second(
                (b for b in mine if b.tenant == load.tenant), until, width
            )
            lines.append(
                TenantSeries(
                    load.tenant,
                    times,
                    rates,
                    _per_second(share.rate, spec),
                    _per_second(share.ceil, spec),
                    _per_second(spec.rate, spec),
                )
            )
        out.append((group, width, total, lines))
    return out
