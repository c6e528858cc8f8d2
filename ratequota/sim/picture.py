"""The picture of a simulation run: units held per tenant over time.

An ``.svg`` path is drawn by ``ratequota.sim.svg`` with no dependency (the
default, so the first command a user runs shows its picture); any other path
is a PNG drawn with matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path

from ratequota.sim.fleet import RunResult
from ratequota.sim.scenario import Scenario
from ratequota.sim.stats import binned_average, step_function
from ratequota.sim.tokens import token_series

__all__ = ["plot_timeline"]


def plot_timeline(result: RunResult, scenario: Scenario, path: Path) -> bool:
    """Draw units held against units owed per tenant over time to ``path`` (SVG or PNG).

    One panel per group. For every tenant: the units it held (solid) and the
    units the reference rule entitled it to from the demand its clients
    really had (dashed, same colour), both averaged over short bins; its
    guarantee and weight in the legend. Guarantees are dotted lines labelled
    at the right edge with every tenant that has that guarantee, so tenants
    with equal guarantees are told apart. The group's total is a grey area,
    the capacity a dashed black line. A group metering tokens gets a second
    panel: each tenant's tokens/s against its guaranteed rate (dotted) and
    its ceil (dashed). False when a PNG is asked for and matplotlib is missing.
    """
    if path.suffix.lower() == ".svg":
        from ratequota.sim.svg import timeline

        path.write_text(timeline(result, scenario), encoding="utf-8")
        return True
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    until = min(result.report.duration, scenario.duration)
    width = max(0.1, until / 150)
    gaps = {t.tenant: t.gap for t in result.report.tenants if t.gap is not None}
    groups = [g for g in scenario.policy.groups if scenario.group_loads(g.name)]
    metered = token_series(result.batches, scenario, until)
    rows = len(groups) + len(metered)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.2 * rows), sharex=True, squeeze=False)
    for ax, (group, bin_width, rated, series) in zip(axes[len(groups) :, 0], metered, strict=False):
        ax.fill_between(rated[0], rated[1], color="0.9", label="group total", step="mid")
        for tenant in series:
            line = ax.plot(tenant.times, tenant.rates, label=tenant.tenant, linewidth=1.4)[0]
            ax.axhline(tenant.rate, color=line.get_color(), linestyle=":", linewidth=1)
            ax.axhline(tenant.ceil, color=line.get_color(), linestyle="--", linewidth=0.8)
        rate = series[0].group_rate if series else 0.0
        ax.axhline(rate, color="black", linestyle="--", linewidth=0.8, label="group rate")
        ax.set_title(
            f"group {group.name}: tokens/s over {bin_width:.2f} s bins; solid: used, dotted: "
            "guaranteed rate, dashed: ceil",
            fontsize=9,
        )
        ax.set_ylabel("tokens/s")
        ax.set_ylim(0, rate * 1.3)
        ax.legend(loc="upper left", fontsize=7, ncol=4, frameon=False)
    for ax, group in zip(axes[:, 0], groups, strict=False):
        mine = [iv for iv in result.intervals if iv.group == group.name]
        times, total = binned_average(step_function(mine), until, width)
        ax.fill_between(times, total, color="0.9", label="group total", step="mid")
        guarantees: dict[int, list[str]] = {}
        for load in scenario.group_loads(group.name):
            policy = group.tenant(load.tenant)
            assert policy is not None
            gap = gaps.get(load.tenant)
            share = "" if gap is None else f", got/owed {gap.share:.2f}"
            label = f"{load.tenant} (G {policy.guarantee}, w {policy.weight:g}{share})"
            if gap is not None and gap.times:
                line = ax.plot(gap.times, gap.held, label=label, linewidth=1.4)[0]
                ax.plot(gap.times, gap.owed, color=line.get_color(), linestyle="--", linewidth=1)
            else:
                steps = step_function(iv for iv in mine if iv.tenant == load.tenant)
                times, held = binned_average(steps, until, width)
                line = ax.plot(times, held, label=label, linewidth=1.4)[0]
            if policy.guarantee:
                guarantees.setdefault(policy.guarantee, []).append(load.tenant)
                ax.axhline(policy.guarantee, color=line.get_color(), linestyle=":", linewidth=1)
        for level, names in guarantees.items():
            ax.annotate(
                f"G {level}: {', '.join(names)}",
                xy=(1.0, level),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
            )
        ax.axhline(group.capacity, color="black", linestyle="--", linewidth=0.8, label="capacity")
        ax.set_title(
            f"group {group.name}: capacity {group.capacity}; solid: units held, dashed: units "
            "owed by the rule, dotted: guarantees",
            fontsize=9,
        )
        ax.set_ylabel("units")
        ax.set_xlim(0, until)
        ax.set_ylim(0, group.capacity * 1.3)
        ax.legend(loc="upper left", fontsize=7, ncol=3, frameon=False)
    axes[-1, 0].set_xlabel(f"seconds (units averaged over {width:.2f} s bins)")
    fig.suptitle(f"ratequota simulate: {scenario.name}, {scenario.pods} pods", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
