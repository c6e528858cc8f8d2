"""``ratequota simulate --shadow``: every group in shadow mode; the run reports what enforcing
would have refused (issue 13, item 2), counted from the pods' decisions by an ``Observer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.observe import DecisionEvent
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.sim.shadow import ShadowTally, in_shadow

#: One tenant asking for twice the group's capacity at once: enforcing must refuse.
OVERLOADED = (
    '[simulation]\npods = 2\n[[groups]]\nname = "solo"\ncapacity = 4\n'
    '[[groups.tenants]]\nname = "only"\nguarantee = 2\n'
    "traffic = { concurrency = 8, units = 1, hold = 0.2 }\n"
)


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    scenario = tmp_path / "s.toml"
    scenario.write_text(OVERLOADED)
    args = ["simulate", "--scenario", str(scenario), "--duration", "1.5", "--quiet"]
    code = cli.main([*args, "--no-plot", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


def test_shadow_run_admits_what_enforcing_refuses_and_counts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Enforcing, the overloaded tenant is refused; in shadow, it is admitted and the would-be
    refusals are reported by reason and tenant."""
    shadow = _run(tmp_path, capsys, "--shadow")["shadow"]
    assert isinstance(shadow, dict)
    assert shadow["would_refuse"] > 0
    assert set(shadow["by_reason"]) <= {"tenant_limit", "group_full"}
    assert shadow["by_tenant"] == [
        {"group": "solo", "tenant": "only", "would_refuse": shadow["would_refuse"]}
    ]
    enforcing = _run(tmp_path, capsys)
    assert "shadow" not in enforcing


def test_in_shadow_puts_every_group_in_shadow_and_changes_nothing_else() -> None:
    """The policy played is the scenario's own, each group flagged ``shadow``."""
    policy = Policy(
        [
            GroupPolicy("a", capacity=4, tenants=[TenantPolicy("x", guarantee=2)]),
            GroupPolicy("b", capacity=6),
        ]
    )
    shadowed = in_shadow(policy)
    assert [g.shadow for g in shadowed.groups] == [True, True]
    assert [(g.name, g.capacity, g.tenants) for g in shadowed.groups] == [
        (g.name, g.capacity, g.tenants) for g in policy.groups
    ]


def test_tally_counts_only_shadow_admissions() -> None:
    """Admissions and refusals are decisions; only ``shadow_admitted`` ones would be refused."""
    tally = ShadowTally()
    for result, reason in [
        ("admitted", "admitted"),
        ("shadow_admitted", "tenant_limit"),
        ("shadow_admitted", "group_full"),
        ("refused", "too_large"),
    ]:
        tally.decision(DecisionEvent("g", "t", 1, result, reason))  # type: ignore[arg-type]
    assert tally.decisions == 4 and tally.would_refuse == 2
    assert tally.to_dict()["by_reason"] == {"group_full": 1, "tenant_limit": 1}
    assert "2 of 4 decisions (50%)" in tally.render()
