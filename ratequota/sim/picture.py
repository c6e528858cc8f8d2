"""The picture of a simulation run: units held per tenant over time (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from ratequota.sim.run import RunResult
from ratequota.sim.scenario import Scenario
from ratequota.sim.stats import binned_average, step_function

__all__ = ["plot_timeline"]


def plot_timeline(result: RunResult, scenario: Scenario, path: Path) -> bool:
    """Draw units held per tenant over time to ``path`` (PNG); False when matplotlib is missing.

    One panel per group: each tenant's units (averaged over short bins), its
    guarantee as a dotted line in the same colour, the group's total as a
    grey area and the capacity as a dashed line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    until = min(result.report.duration, scenario.duration)
    width = max(0.1, until / 150)
    groups = [g for g in scenario.policy.groups if scenario.group_loads(g.name)]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(10, 2.8 * len(groups)), sharex=True, squeeze=False
    )
    for ax, group in zip(axes[:, 0], groups, strict=False):
        mine = [iv for iv in result.intervals if iv.group == group.name]
        times, total = binned_average(step_function(mine), until, width)
        ax.fill_between(times, total, color="0.88", label="group total", step="mid")
        for load in scenario.group_loads(group.name):
            steps = step_function(iv for iv in mine if iv.tenant == load.tenant)
            times, held = binned_average(steps, until, width)
            line = ax.plot(times, held, label=load.tenant, linewidth=1.4)[0]
            policy = group.tenant(load.tenant)
            if policy is not None and policy.guarantee:
                ax.axhline(policy.guarantee, color=line.get_color(), linestyle=":", linewidth=1)
        ax.axhline(group.capacity, color="black", linestyle="--", linewidth=0.8, label="capacity")
        ax.set_title(
            f"group {group.name}: capacity {group.capacity}; dotted lines are guarantees",
            fontsize=10,
        )
        ax.set_ylabel("units held")
        ax.set_xlim(0, until)
        ax.set_ylim(0, group.capacity * 1.25)
        ax.legend(loc="upper left", fontsize=8, ncol=6, frameon=False)
    axes[-1, 0].set_xlabel(f"seconds (units averaged over {width:.2f} s bins)")
    fig.suptitle(f"ratequota simulate: {scenario.name}, {scenario.pods} pods", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
