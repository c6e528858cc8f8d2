"""Shadow mode in the simulation: play a scenario with every group in shadow, count what enforcing
would have refused.

A platform team rolls a new policy out in shadow first and watches what it
would refuse (issue 13, item 2). ``ratequota simulate --shadow`` does that
offline: every group of the scenario's policy is put in shadow mode, so each
would-be ``tenant_limit`` / ``group_full`` refusal is admitted (a real lease)
and reported to the clients' ``Observer`` as ``shadow_admitted``; this module
counts those events per group, tenant and reason.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import attrs

from ratequota.observe import DecisionEvent, Observer
from ratequota.policy import Policy

__all__ = ["ShadowTally", "in_shadow"]


def in_shadow(policy: Policy) -> Policy:
    """``policy`` with every group in shadow mode (limits decided in full, never enforced)."""
    return attrs.evolve(policy, groups=tuple(attrs.evolve(g, shadow=True) for g in policy.groups))


class ShadowTally(Observer):
    """Counts the decisions that shadow mode admitted and enforcing would have refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the counters; held for an increment only
        self.by_reason: Counter[str] = Counter()
        self.by_tenant: Counter[tuple[str, str]] = Counter()
        self.decisions = 0

    def decision(self, event: DecisionEvent) -> None:
        """Count every final outcome, and the shadow admissions by reason and tenant."""
        with self._lock:
            self.decisions += 1
            if event.result == "shadow_admitted":
                self.by_reason[event.reason] += 1
                self.by_tenant[(event.group, event.tenant)] += 1

    @property
    def would_refuse(self) -> int:
        """Requests shadow mode admitted that enforcing would have refused."""
        return sum(self.by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts (``simulate --shadow --json``)."""
        return {
            "decisions": self.decisions,
            "would_refuse": self.would_refuse,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_tenant": [
                {"group": g, "tenant": t, "would_refuse": n}
                for (g, t), n in sorted(self.by_tenant.items())
            ],
        }

    def render(self) -> str:
        """The text block ``ratequota simulate --shadow`` prints after the report."""
        share = self.would_refuse / self.decisions if self.decisions else 0.0
        lines = [
            f"shadow mode: {self.would_refuse} of {self.decisions} decisions "
            f"({share:.0%}) would have been refused by the enforcing policy",
        ]
        for reason, count in sorted(self.by_reason.items()):
            lines.append(f"  {reason}: {count}")
        for (group, tenant), count in sorted(self.by_tenant.items()):
            lines.append(f"  {group}/{tenant}: {count}")
        return "\n".join(lines)
