"""Token meters in the simulation: scenario files, the pure token statistics, driven runs.

The scenario loader is checked on the shipped token scenario and on broken
token demand; the statistics on hand-made batches; and a short driven run of
``examples/scenarios/token-meters.toml`` is judged from ``simulate --json``
on the embedded store and on a real redis-server, against the promises of
docs/rates.md over the run's window ``T``.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota import cli
from ratequota.errors import ConfigError
from ratequota.policy import GroupPolicy, MeterPolicy, Policy, TenantMeter, TenantPolicy
from ratequota.sim.metering import Batch, MeterRefusal
from ratequota.sim.report import render_report
from ratequota.sim.scenario import Scenario, TenantLoad, Traffic
from ratequota.sim.scenario_file import load_scenario
from ratequota.sim.stats import Report
from ratequota.sim.svg import timeline
from ratequota.sim.tokens import (
    group_tokens,
    settlement_totals,
    token_problems,
    token_reports,
    tokens_per_second,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scenarios"
TOKENS = EXAMPLES / "token-meters.toml"

GROUP = GroupPolicy(
    "g",
    capacity=8,
    tenants=(
        TenantPolicy("a", guarantee=4, meters=(TenantMeter("tokens", rate=600, ceil=900),)),
        TenantPolicy("b", guarantee=4, meters=(TenantMeter("tokens", rate=300),)),
    ),
    meters=(MeterPolicy("tokens", rate=60_000, per="minute", burst=2_000),),
)


def _scenario(**traffic: Any) -> Scenario:
    spec = {"concurrency": 2, "hold": 0.5, "tokens": 10, **traffic}
    return Scenario(
        name="t",
        policy=Policy((GROUP,)),
        loads=(TenantLoad("a", "g", Traffic(**spec)), TenantLoad("b", "g", Traffic())),
        duration=4.0,
    )


def test_token_scenario_parses_meters_and_demand() -> None:
    """The shipped scenario declares the group's meters as a policy file does, and every
    tenant's estimate and the range of its actuals (estimates that run high and low)."""
    scenario = load_scenario(TOKENS)
    group = scenario.policy.group("llm")
    assert group is not None and group.meter("tokens") is not None
    assert group.meter("requests") is not None
    traffic = {load.tenant: load.traffic for load in scenario.loads}
    assert traffic["noisy"].actual[0] > 0.5 and traffic["noisy"].actual[1] > 1  # runs low
    assert traffic["lender"].actual[1] <= 1  # its estimates run high
    assert traffic["steady"].tokens == 200 and traffic["steady"].actual == (0.5, 1.5)
    assert traffic["lender"].pattern == "lender"


def test_actual_tokens_spread_between_low_and_high() -> None:
    """A batch uses the estimate times a factor drawn from ``actual = [low, high]``."""
    traffic = Traffic(tokens=1000, actual=(0.5, 1.5))
    assert traffic.actual_tokens(0.0) == 500
    assert traffic.actual_tokens(0.5) == 1000
    assert traffic.mean_tokens() == 1000
    assert Traffic().tokens == 0 and Traffic().actual == (1.0, 1.0)


@pytest.mark.parametrize(
    ("traffic", "field", "words"),
    [
        ({"tokens": -1}, "tokens", ">= 0"),
        ({"actual": (1.5, 0.5)}, "actual", "high >= low"),
        ({"actual": (0.5,)}, "actual", "[low, high]"),
        ({"tokens": 5_000}, "traffic.tokens", "cburst"),
    ],
)
def test_bad_token_demand_names_the_field(traffic: dict[str, Any], field: str, words: str) -> None:
    """A negative estimate, a reversed or short actual range, and an estimate no bucket can
    ever hold are refused when the scenario is built, naming the field."""
    with pytest.raises(ConfigError) as info:
        _scenario(**traffic)
    assert field in str(info.value) and words in str(info.value)


def test_tokens_need_a_tokens_meter(tmp_path: Path) -> None:
    """A token estimate in a group that declares no tokens meter is an error naming it."""
    path = tmp_path / "s.toml"
    path.write_text(
        '[[groups]]\nname = "g"\ncapacity = 4\n[[groups.tenants]]\nname = "a"\n'
        "guarantee = 4\ntraffic = { tokens = 10 }\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="declares no tokens meter"):
        load_scenario(path)


def test_settlement_totals_add_up() -> None:
    """reserved − refunds + debts = settled + kept: a refund, a debt, a lease never settled."""
    batches = [
        Batch("a", "g", 0.0, 1.0, 100, 60, "settled", -40),
        Batch("a", "g", 1.0, 2.0, 100, 150, "settled", 50),
        Batch("a", "g", 2.0, 3.0, 100, 100, "closed"),
    ]
    totals = settlement_totals(batches)
    assert (totals.reserved, totals.refunds, totals.debts) == (300, 40, 50)
    assert (totals.settled, totals.kept) == (210, 100)
    assert totals.adds_up
    broken = attrs.evolve(totals, settled=209)
    assert not broken.adds_up
    assert any("does not add up" in p for p in token_problems([], [], broken))


def test_token_reports_against_rate_ceil_and_bound() -> None:
    """Tokens/s over the window against the tenant's rate and ceil (per minute shown per
    second), refusals by meter and reason, and the bound ceil + (cburst + debt)/T."""
    scenario = _scenario()
    batches = [
        Batch("a", "g", 0.0, 1.0, 100, 80, "settled", -20),
        Batch("a", "g", 1.0, 2.0, 100, 130, "settled", 30),
        Batch("a", "g", 5.0, 6.0, 100, 100),  # after the window: not counted
    ]
    refusals = [
        MeterRefusal("a", 0.5, "tokens", "ceil"),
        MeterRefusal("a", 0.6, "tokens", "ceil"),
        MeterRefusal("a", 0.7, "lease", "tenant_limit"),
    ]
    (a, b) = token_reports(scenario, batches, refusals, until=4.0)
    assert (a.rate, a.ceil) == (10.0, 15.0)
    assert a.used == pytest.approx(210 / 4) and a.charged == a.used
    assert a.asked == pytest.approx(2 * 10 / 0.5)
    assert not a.within_rate
    assert a.refusals == {"lease": 1, "tokens": 2}
    assert a.reasons == {"lease:tenant_limit": 1, "tokens:ceil": 2}
    share = TenantMeter("tokens", rate=600, ceil=900).resolved(GROUP.meters[0])
    assert share.cburst is not None
    assert a.bound == pytest.approx(15.0 + (share.cburst + 2_000) / 4)
    assert b.batches == 0 and b.asked == 0
    (g,) = group_tokens(scenario, batches, until=4.0)
    assert g.rate == 1000.0 and g.bound == pytest.approx(1000 + 4_000 / 4)
    over = attrs.evolve(a, charged=a.bound + 1)
    assert any("above its bound" in p for p in token_problems([over], [g], settlement_totals([])))


def test_tokens_per_second_spreads_a_batch_over_its_run() -> None:
    """A batch's tokens count while it runs: 100 tokens over [0.5, 1.5) fill two 1 s bins
    with 50 tokens/s each; an instant batch lands in its bin."""
    times, rates = tokens_per_second(
        [Batch("a", "g", 0.5, 1.5, 100, 100), Batch("a", "g", 2.5, 2.5, 10, 10)], 3.0, 1.0
    )
    assert times == [0.5, 1.5, 2.5]
    assert rates == pytest.approx([50.0, 50.0, 10.0])


def _simulate(capsys: pytest.CaptureFixture[str], *backend: str) -> dict[str, Any]:
    """``simulate --driven --json`` of the token scenario for 6 s, under a key prefix of its
    own: the embedded store lives as long as the process, and a driven run's buckets must
    start full (an earlier run's meters would still be owed at the same virtual times)."""
    prefix = f"rqsim-tokens-{uuid.uuid4().hex[:8]}"
    args = ["simulate", *backend, "--scenario", str(TOKENS), "--duration", "6", "--pods", "6"]
    args += ["--prefix", prefix]
    code = cli.main([*args, "--driven", "--json", "--quiet", "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    return report


def _judge(report: dict[str, Any]) -> None:
    """The promises of docs/rates.md over the run's window T, from ``--json``.

    * no tenant got more than ``ceil + (cburst + debt)/T`` tokens/s through the meters,
      and the group no more than ``rate + (burst + debt)/T``;
    * a tenant asking within its rate got what it asked, within 10 % (the report's note:
      batch times and actuals are drawn, and each batch spends round trips), and no try
      of its was refused on the tokens meter;
    * reserved − refunds + debts = settled + kept, and the noisy tenant was held back;
    * the unit measure (docs/fairness.md) owes nothing for demand the meters held back:
      every tenant with sustained unit demand (half a unit on average, or more) gets
      got/owed within 0.9–1.1, the group's Jain index is at least 0.98, and the gap's
      four causes and ``asked = meter + unit demand`` add up.
    """
    assert report["safe"], report["problems"]
    T = report["duration"]
    tenants = {t["tenant"]: t for t in report["tokens"]}
    for t in tenants.values():
        assert t["charged"] <= t["ceil"] + (t["cburst"] + 9_000) / T
        assert t["charged"] <= t["bound"]
    (group,) = report["token_groups"]
    assert group["charged"] <= group["rate"] + (group["burst"] + 9_000) / T
    assert math.isclose(sum(t["charged"] for t in tenants.values()), group["charged"])
    steady = tenants["steady"]
    assert steady["within_rate"]
    assert 0.9 * steady["asked"] <= steady["used"] <= 1.1 * steady["asked"], steady
    assert steady["refusals"].get("tokens", 0) == 0
    assert tenants["noisy"]["refusals"]["tokens"] > 0
    assert tenants["noisy"]["used"] <= tenants["noisy"]["bound"]
    settlement = report["settlement"]
    assert settlement["adds_up"]
    assert (
        settlement["reserved"] - settlement["refunds"] + settlement["debts"]
        == settlement["settled"] + settlement["kept"]
    )
    assert settlement["refunds"] > 0 and settlement["debts"] > 0
    assert settlement["batches"] == sum(t["batches"] for t in tenants.values())
    _judge_units(report)


def _judge_units(report: dict[str, Any]) -> None:
    """The unit measure's promises on a metered run (see ``_judge``)."""
    T = report["duration"]
    rows = {t["tenant"]: t for t in report["tenants"]}
    sustained = 0
    for row in rows.values():
        meter, asked = row["meter_unit_seconds"], row["asked_unit_seconds"]
        assert 0 <= meter <= asked, row
        parts = math.fsum(row["gap_parts"].values())
        assert parts == pytest.approx(row["gap_unit_seconds"], abs=1e-6), row
        if asked - meter >= 0.5 * T:
            sustained += 1
            assert 0.9 <= row["got_over_entitled"] <= 1.1, row
    assert sustained == len(rows), "every tenant of the token scenario has unit demand"
    assert rows["noisy"]["meter_unit_seconds"] > 0.5 * rows["noisy"]["asked_unit_seconds"]
    (group,) = report["groups"]
    assert group["jain"] >= 0.98, group


def test_token_scenario_driven_on_the_embedded_store(capsys: pytest.CaptureFixture[str]) -> None:
    """A 6 s driven run of the token scenario on the embedded store keeps every promise."""
    _judge(_simulate(capsys))


@pytest.mark.real_redis
def test_token_scenario_driven_on_real_redis(  # type: ignore[no-untyped-def]
    real_redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same run on a real redis-server keeps them too, and, driven, makes the very same
    decisions as the embedded store: the Lua meters agree end to end."""
    real_redis.client().flushall()
    on_redis = _simulate(capsys, "--redis", real_redis.url)
    _judge(on_redis)
    embedded = _simulate(capsys)
    for report in (on_redis, embedded):
        report.pop("backend")
    assert on_redis == embedded


def test_report_and_picture_show_tokens_against_rate_and_ceil() -> None:
    """The text report has the token table and the settlement line; the SVG a tokens/s
    panel with each tenant's rate and ceil lines."""
    from ratequota.clients.sync import QuotaClient
    from ratequota.sim.fleet import run_scenario
    from ratequota.testing import fake_client

    scenario = load_scenario(TOKENS).with_overrides(duration=2.0, pods=3)
    shared = fake_client()
    backend = shared.backend

    class Shared:
        def __getattr__(self, name: str) -> object:
            return getattr(backend, name)

        def close(self) -> None:
            pass

    try:
        result = run_scenario(scenario, lambda: QuotaClient(backend=Shared()), driven=True)
    finally:
        shared.close()
    report: Report = result.report
    text = render_report(report)
    assert "tokens/s over the run" in text and "settlement: reserved" in text
    assert "adds up" in text
    picture = timeline(result, scenario)
    assert "tokens/s over" in picture
    assert "ceil 1500: steady" in picture and "rate 1000: steady" in picture
    assert "group rate 3000" in picture


def test_shadow_groups_are_exempt_from_the_meter_bounds() -> None:
    """Shadow mode admits above the meters on purpose: its groups' bounds are not checked,
    but settlement must still add up."""
    scenario = _scenario()
    batches = [Batch("a", "g", 0.0, 1.0, 10, 10_000, "settled", 9_990)]
    (a, _b) = token_reports(scenario, batches, [], until=4.0)
    groups = group_tokens(scenario, batches, until=4.0)
    totals = settlement_totals(batches)
    assert len(token_problems([a], groups, totals)) == 2
    assert token_problems([a], groups, totals, exempt={"g"}) == []


@given(
    st.lists(
        st.tuples(
            st.floats(0, 9.5, allow_nan=False),
            st.floats(0, 3, allow_nan=False),
            st.integers(0, 5_000),
        ),
        max_size=20,
    ),
    st.sampled_from([0.25, 0.5, 1.0, 3.0]),
)
def test_tokens_per_second_loses_no_token_inside_the_window(
    spans: list[tuple[float, float, int]], width: float
) -> None:
    """Binned tokens/s times the bins' lengths gives back every token used inside the
    window, whatever the batches and bins: the picture neither loses nor doubles any."""
    until = 10.0
    batches = [Batch("a", "g", s, s + d, n, n) for s, d, n in spans]
    _times, rates = tokens_per_second(batches, until, width)
    spans_of_bins = [min(until, (k + 1) * width) - k * width for k in range(len(rates))]
    inside = math.fsum(
        b.used * (min(b.end, until) - b.start) / (b.end - b.start) if b.end > b.start else b.used
        for b in batches
    )
    got = math.fsum(r * s for r, s in zip(rates, spans_of_bins, strict=True))
    assert got == pytest.approx(inside, rel=1e-9, abs=1e-6)
