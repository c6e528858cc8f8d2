"""The report of a simulation run as text (what ``ratequota simulate`` prints) and as JSON."""

from __future__ import annotations

import math

import attrs

from ratequota.sim.stats import Report

__all__ = ["render_report", "report_to_dict"]


def _num(value: float, spec: str = ".1f", *, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _render_gaps(report: Report) -> list[str]:
    """The table splitting every tenant's gap into its causes (empty without a measure).

    The ``meter`` column (demand rate meters held back, owed nothing) appears
    only when a meter held something back, so runs without meters read as before.
    """
    rows = [t for t in report.tenants if t.gap is not None]
    if not rows:
        return []
    metered = any(t.gap is not None and t.gap.meter > 0 for t in rows)
    out = ["", "why got differs from owed, in % of the entitlement (the parts add up to the gap):"]
    header = (
        f"{'group':8} {'tenant':10} {'gap':>6} {'unseen':>7} {'reclaim':>8} {'granul.':>8} "
        f"{'unexpl.':>8} {'longest lag':>12}"
    )
    if metered:
        header += f" {'meter':>7}"
    out += [header, "-" * len(header)]
    for t in rows:
        gap = t.gap
        assert gap is not None
        scale = 100.0 / gap.entitled if gap.entitled > 0 else math.nan
        lag = f"{gap.longest_reclaim:.2f}/{gap.reclaim_bound:.2f}s"
        line = (
            f"{t.group:8} {t.tenant:10} {_num(gap.gap * scale, '+.1f'):>6} "
            f"{_num(gap.unseen * scale, '+.1f'):>7} {_num(gap.reclaim * scale, '+.1f'):>8} "
            f"{_num(gap.granularity * scale, '+.1f'):>8} "
            f"{_num(gap.unexplained * scale, '+.1f'):>8} {lag:>12}"
        )
        if metered:
            line += f" {_num(gap.meter_share * 100, '.1f') + '%':>7}"
        out.append(line)
    out.append(
        "unseen: demand Redis had not registered yet (or let expire) moved the limit; reclaim: "
        "held above the limit"
    )
    out.append(
        "(< 0) or waiting for others' borrowed leases to end (> 0); granul.: less than a batch "
        "of room; unexpl.: a"
    )
    out.append(
        "batch fitted but was not admitted (a waiting request between tries); longest lag: the "
        "longest stretch of"
    )
    out.append("reclaim lag / its bound, the group's longest batch (leases are never preempted).")
    if metered:
        out.append(
            "meter: demand a rate meter held back (its last try was refused by a meter), in % "
            "of all demand asked; the"
        )
        out.append(
            "concurrency rule owes it nothing, so it is outside owed and the gap (asked = meter "
            "+ unit demand)."
        )
    return out


def _render_tokens(report: Report) -> list[str]:
    """The token meters' table: tokens/s against rate and ceil, refusals, settlement."""
    if not report.tokens:
        return []
    out = ["", f"tokens/s over the run (T = {report.duration:.1f} s):"]
    header = (
        f"{'group':8} {'tenant':10} {'rate':>7} {'ceil':>7} {'asked':>8} {'used':>8} "
        f"{'used/ask':>8} {'charged':>8} {'bound':>8} {'batches':>7}  refused tries by meter:reason"
    )
    out += [header, "-" * len(header)]
    for t in report.tokens:
        refused = ", ".join(f"{why} {n}" for why, n in t.reasons.items()) or "-"
        ratio = t.used / t.asked if t.asked > 0 else math.nan
        out.append(
            f"{t.group:8} {t.tenant:10} {t.rate:7.0f} {t.ceil:7.0f} {t.asked:8.0f} "
            f"{t.used:8.0f} {_num(ratio, '.2f'):>8} {t.charged:8.0f} {t.bound:8.0f} "
            f"{t.batches:7d}  {refused}"
        )
    for g in report.token_groups:
        out.append(
            f"{g.group:8} {'(group)':10} {g.rate:7.0f} {'':>7} {'':>8} {g.used:8.0f} {'':>8} "
            f"{g.charged:8.0f} {g.bound:8.0f}"
        )
    out.append(
        "asked: closed-loop demand (active slots x mean tokens of a batch / mean batch time); "
        "used: settled"
    )
    out.append(
        "actuals (the estimate where never settled) / T; charged: used less what the debt bound "
        "forgave; bound: ceil (group:"
    )
    out.append(
        "rate) + (burst + debt)/T, the most the meters let through in T s. A tenant asking "
        "within its rate"
    )
    out.append(
        "gets used/ask near 1: short of it only by the run's own randomness (batch times and "
        "actuals are drawn)"
    )
    out.append("and the round trips of each batch; refusals: every refused try of an acquire.")
    totals = report.settlement
    if totals is not None:
        out.append(
            f"settlement: reserved {totals.reserved:,} - refunds {totals.refunds:,} + debts "
            f"{totals.debts:,} = settled {totals.settled:,} + kept {totals.kept:,} "
            f"({totals.batches} batches; {'adds up' if totals.adds_up else 'DOES NOT ADD UP'}"
            f"; forgiven by the debt bound {totals.forgiven:,.0f})"
        )
    return out


def report_to_dict(report: Report) -> dict[str, object]:
    """The report as plain JSON-ready data (``ratequota simulate --json``); NaN becomes None."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tenants = []
    for t in report.tenants:
        row = attrs.asdict(t, recurse=False, filter=lambda a, _: a.name != "gap")
        if t.gap is not None:
            gap = t.gap
            row["got_unit_seconds"] = gap.got
            row["entitled_unit_seconds"] = gap.entitled
            row["got_over_entitled"] = gap.share
            row["gap_unit_seconds"] = gap.gap
            row["gap_parts"] = gap.parts()
            row["meter_unit_seconds"] = gap.meter
            row["asked_unit_seconds"] = gap.asked
            row["longest_reclaim_seconds"] = gap.longest_reclaim
            row["reclaim_bound_seconds"] = gap.reclaim_bound
        tenants.append(row)
    data: dict[str, object] = {
        "scenario": report.scenario,
        "backend": report.backend,
        "pods": report.pods,
        "duration": report.duration,
        "pending_ttl": report.pending_ttl,
        "tenants": tenants,
        "groups": [attrs.asdict(g) for g in report.groups],
        "samples": report.samples,
        "max_over_admission": report.max_over_admission,
        "sampled_over_admission": report.sampled_over_admission,
        "interval_over_admission": report.interval_over_admission,
        "tenant_over_ceiling": report.tenant_over_ceiling,
        "inconsistent_samples": report.inconsistent_samples,
        "decisions": report.decisions,
        "script_calls": report.script_calls,
        "round_trip_seconds": report.round_trip,
        "lost_leases": report.lost_leases,
        "left_over_units": report.left_over_units,
        "problems": list(report.problems),
        "safe": report.safe,
    }
    if report.tokens:
        data["tokens"] = [
            {
                **attrs.asdict(t),
                "refusals": dict(t.refusals),
                "reasons": dict(t.reasons),
                "within_rate": t.within_rate,
            }
            for t in report.tokens
        ]
        data["token_groups"] = [attrs.asdict(g) for g in report.token_groups]
    if report.settlement is not None:
        data["settlement"] = {
            **attrs.asdict(report.settlement),
            "adds_up": report.settlement.adds_up,
        }
    return clean(data)  # type: ignore[return-value]


def render_report(report: Report) -> str:
    """The report as the text ``ratequota simulate`` prints."""
    out: list[str] = []
    out.append(
        f"scenario {report.scenario!r} on {report.backend}: {report.pods} pods, "
        f"{report.duration:.1f} s"
    )
    out.append("")
    header = (
        f"{'group':8} {'tenant':10} {'G':>4} {'owed':>6} {'live':>6} {'peak':>5} "
        f"{'admitted':>8} {'refused':>7} {'p50 ms':>7} {'p99 ms':>7} {'borrowed':>9} "
        f"{'got/owed':>8} {'reclaim':>8}"
    )
    out.append(header)
    out.append("-" * len(header))
    for t in report.tenants:
        if t.is_lender:
            reclaim = "never" if t.reclaim_seconds is None else f"{t.reclaim_seconds:.2f}s"
        else:
            reclaim = ""
        out.append(
            f"{t.group:8} {t.tenant:10} {t.guarantee:4d} {_num(t.fair_limit):>6} "
            f"{_num(t.live_limit):>6} {t.peak_units:5d} {t.admitted:8d} {t.refused:7d} "
            f"{_ms(t.wait_p50):>7} {_ms(t.wait_p99):>7} {t.borrowed_unit_seconds:9.1f} "
            f"{_num(t.share_of_entitlement, '.2f'):>8} {reclaim:>8}"
        )
    out.append("")
    out.append(
        "owed: units the reference rule entitles the tenant to, averaged over the run "
        "(∫ min(demand, fair limit) dt / run,"
    )
    out.append(
        "from the demand its clients really had); live: median limit Redis reported; "
        "borrowed: unit-seconds above G;"
    )
    out.append(
        "got/owed: unit-seconds held / entitlement; reclaim: how long the returning lender "
        "took to hold its guarantee again."
    )
    out += _render_gaps(report)
    out += _render_tokens(report)
    out.append("")
    gheader = f"{'group':8} {'C':>4} {'peak':>5} {'util':>6} {'util/asked':>10} {'Jain':>6}"
    out.append(gheader)
    out.append("-" * len(gheader))
    for g in report.groups:
        out.append(
            f"{g.group:8} {g.capacity:4d} {g.peak_units:5d} {g.utilisation:6.0%} "
            f"{_num(g.utilisation_of_demand * 100, '.0f') + '%':>10} {_num(g.jain, '.3f'):>6}"
        )
    out.append("")
    out.append(
        f"max over-admission seen: {report.max_over_admission} units "
        f"({report.samples} snapshots: {report.sampled_over_admission}; every instant of "
        f"client-held leases: {report.interval_over_admission})"
    )
    out.append(
        f"decisions: {report.decisions} requests, {report.decisions_per_second:.0f}/s "
        f"({report.script_calls} script calls, {report.script_calls_per_second:.0f}/s, "
        f"mean round trip {_ms(report.round_trip)} ms)"
    )
    if report.lost_leases:
        out.append(
            f"leases that expired before release (holder overran its TTL): {report.lost_leases}"
        )
    if report.problems:
        out.append("")
        out.append("SAFETY INVARIANT VIOLATED:")
        out += [f"  - {p}" for p in report.problems]
    else:
        out.append("safety invariants: all held")
    return "\n".join(out)
