"""``ratequota simulate``: the pure statistics, scenario files, and short real runs.

The statistics are checked on hand-made records whose answers are known;
the scenario loader on the shipped examples and on broken files; the runner
with runs of one or two seconds on the embedded default (and once on a real
redis-server).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from ratequota import cli
from ratequota.clients.sync import QuotaClient
from ratequota.errors import ConfigError, PolicyFileError
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.sim.fleet import progress_line, run_scenario
from ratequota.sim.report import render_report
from ratequota.sim.scenario import Scenario, TenantLoad, Traffic, default_scenario
from ratequota.sim.scenario_file import load_scenario
from ratequota.sim.stats import (
    Interval,
    Outcome,
    Sample,
    binned_average,
    build_report,
    expected_limits,
    integral,
    jain_index,
    level_at,
    percentile,
    reclaim_time,
    step_function,
)
from ratequota.testing import fake_client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scenarios"


def _iv(tenant: str, units: int, start: float, end: float, group: str = "g") -> Interval:
    return Interval(tenant, group, units, start, end)


def _tiny(duration: float = 1.5, pods: int = 4) -> Scenario:
    """Two tenants of one small group: a lender and a steady borrower."""
    group = GroupPolicy(
        "g",
        capacity=8,
        tenants=(TenantPolicy("lender", guarantee=4), TenantPolicy("borrower", guarantee=4)),
    )
    return Scenario(
        name="tiny",
        policy=Policy((group,)),
        loads=(
            TenantLoad("lender", "g", Traffic("lender", 2, 2, 0.2, idle_from=0.2, idle_until=0.5)),
            TenantLoad("borrower", "g", Traffic("steady", 6, 1, 0.2)),
        ),
        duration=duration,
        pods=pods,
        acquire_timeout=0.5,
        sample_interval=0.1,
    )


# -- pure statistics ---------------------------------------------------------------


def test_step_function_and_level() -> None:
    """Overlapping leases add up; a release and an acquire at the same instant do not stack."""
    steps = step_function([_iv("a", 2, 0.0, 1.0), _iv("a", 3, 0.5, 2.0), _iv("a", 1, 1.0, 1.5)])
    assert steps == [(0.0, 2), (0.5, 5), (1.0, 4), (1.5, 3), (2.0, 0)]
    assert level_at(steps, 0.75) == 5
    assert level_at(steps, 5.0) == 0
    assert max(level for _, level in steps) == 5


def test_integral_and_borrowed_unit_seconds() -> None:
    """Unit-seconds held, and held above a guarantee, are exact areas under the steps."""
    steps = step_function([_iv("a", 4, 0.0, 2.0), _iv("a", 4, 1.0, 3.0)])
    assert integral(steps, 3.0) == pytest.approx(16.0)
    assert integral(steps, 3.0, above=6) == pytest.approx(2.0)  # 8 units for 1 s, 2 above 6
    assert integral(steps, 1.0) == pytest.approx(4.0)  # cut at `until`


def test_binned_average_smooths_instant_dips() -> None:
    """A release immediately followed by a re-acquire leaves the average at the held level."""
    steps = step_function([_iv("a", 2, 0.0, 0.5), _iv("a", 2, 0.5, 1.0)])
    centres, means = binned_average(steps, 1.0, 0.25)
    assert centres == [0.125, 0.375, 0.625, 0.875]
    assert means == pytest.approx([2.0] * 4)


def test_percentile_interpolates_and_handles_empty() -> None:
    """Percentiles interpolate linearly; no values give NaN rather than a made-up number."""
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_jain_index_bounds() -> None:
    """Jain's index is 1 for equal shares, 1/n when one tenant takes everything."""
    assert jain_index([0.7, 0.7, 0.7]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert 0.25 < jain_index([1.0, 0.5, 0.2, 0.1]) < 1.0
    assert jain_index([0.0, 0.0]) == 1.0
    assert math.isnan(jain_index([]))


def test_reclaim_time() -> None:
    """Time until the lender holds its target again, measured from its return."""
    steps = step_function([_iv("l", 2, 5.0, 9.0), _iv("l", 2, 5.75, 9.0)])
    assert reclaim_time(steps, 5.0, 4) == pytest.approx(0.75)
    assert reclaim_time(steps, 5.0, 2) == pytest.approx(0.0)
    assert reclaim_time(steps, 5.0, 6) is None
    assert reclaim_time(steps, 5.0, 0) == 0.0


def test_expected_limits_match_the_worked_vector() -> None:
    """The reference limits for C=24, G=12, ℓ=⅓, B=4 with demands 24 and 6 are 16 and 8 (§4)."""
    group = GroupPolicy(
        "g",
        capacity=24,
        tenants=(
            TenantPolicy("big", guarantee=12, lendable=1 / 3, borrow_limit=4),
            TenantPolicy("small", guarantee=12, lendable=1 / 3, borrow_limit=4),
        ),
    )
    scenario = Scenario(
        name="vector",
        policy=Policy((group,)),
        loads=(
            TenantLoad("big", "g", Traffic("steady", 12, 2, 0.5)),
            TenantLoad("small", "g", Traffic("steady", 3, 2, 0.5)),
        ),
        duration=2.0,
    )
    limits = expected_limits(group, scenario, step=0.5)
    assert [round(limit, 6) for _, _, limit in limits["big"]] == [16.0] * 4
    assert [round(limit, 6) for _, _, limit in limits["small"]] == [8.0] * 4


def test_traffic_patterns() -> None:
    """Steady, bursty and lender schedules give the concurrency the docs promise."""
    assert Traffic("steady", 5).concurrency_at(0.99) == 5
    bursty = Traffic("bursty", 8, low=2, period=0.5, duty=0.4)
    assert [bursty.concurrency_at(f) for f in (0.0, 0.19, 0.21, 0.5, 0.75)] == [8, 8, 2, 8, 2]
    lender = Traffic("lender", 3, idle_from=0.25, idle_until=0.5)
    assert [lender.concurrency_at(f) for f in (0.1, 0.3, 0.5)] == [3, 0, 3]
    late = Traffic("steady", 4, start=0.5)
    assert late.concurrency_at(0.4) == 0
    assert late.demand_at(0.6) == 4
    assert 0.25 in lender.changes()
    assert 0.5 in lender.changes()


def test_build_report_flags_over_admission_from_intervals_and_samples() -> None:
    """Leases adding up above the capacity at one instant, or a snapshot above it, are unsafe."""
    scenario = _tiny()
    over = [_iv("lender", 4, 0.0, 1.0), _iv("borrower", 5, 0.5, 1.0)]  # 9 > 8 during [0.5, 1)
    report = build_report(scenario, over, [], [], elapsed=1.5)
    assert report.interval_over_admission == 1
    assert not report.safe
    sample = Sample("g", 0.2, 8, 9, {"lender": 4, "borrower": 5}, {}, 9)
    report = build_report(scenario, [], [], [sample], elapsed=1.5)
    assert report.sampled_over_admission == 1
    assert report.max_over_admission == 1
    assert "SAFETY INVARIANT VIOLATED" in render_report(report)


def test_build_report_on_a_safe_run() -> None:
    """A run within capacity reports zero over-admission, counts and the lender's reclaim."""
    scenario = _tiny(duration=2.0)
    intervals = [
        _iv("lender", 2, 0.0, 0.4),
        _iv("borrower", 4, 0.0, 1.2),
        _iv("lender", 2, 1.1, 2.0),  # back at 1.0 s (idle_until 0.5 of 2 s); 2 units hit 1.1 s
        _iv("lender", 2, 1.3, 2.0),
    ]
    outcomes = [Outcome("lender", 0.0, 0.01, True), Outcome("borrower", 0.0, 0.5, False)]
    sample = Sample("g", 0.1, 8, 6, {"lender": 2, "borrower": 4}, {"lender": 4.0}, 6)
    report = build_report(scenario, intervals, outcomes, [sample], elapsed=2.0, script_calls=10)
    assert report.safe
    assert report.max_over_admission == 0
    lender = next(t for t in report.tenants if t.tenant == "lender")
    assert lender.reclaim_seconds == pytest.approx(0.3)  # 4 units (its guarantee) at 1.3 s
    assert lender.admitted == 1
    borrower = next(t for t in report.tenants if t.tenant == "borrower")
    assert borrower.refused == 1
    assert report.decisions_per_second == pytest.approx(1.0)
    text = render_report(report)
    assert "max over-admission seen: 0 units" in text
    assert "safety invariants: all held" in text


def test_progress_line() -> None:
    """The progress bar is plain text and clamps at the end."""
    assert progress_line(5.0, 20.0, 3, 1, width=4).startswith("[#---]   5.0/20.0 s")
    assert progress_line(25.0, 20.0, 0, 0, width=4).startswith("[####]  20.0/20.0 s")


# -- scenarios ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_scenarios_load(path: Path) -> None:
    """Every scenario shipped in examples/scenarios/ is valid."""
    scenario = load_scenario(path)
    assert scenario.loads
    assert scenario.duration <= 60


def test_default_scenario_mirrors_a_region() -> None:
    """The default has several groups, weights, guarantees, bursts and a returning lender."""
    scenario = default_scenario()
    assert len(scenario.policy.groups) >= 3
    assert scenario.pods == 60
    assert scenario.duration <= 30
    patterns = {load.traffic.pattern for load in scenario.loads}
    assert patterns == {"steady", "bursty", "lender"}


def test_invalid_scenario_names_file_line_and_field(tmp_path: Path) -> None:
    """A bad value in a scenario file is reported with the file, the line and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[simulation]\nduration = 5\n\n[[groups]]\nname = "g"\ncapacity = 8\n\n'
        '[[groups.tenants]]\nname = "a"\n[groups.tenants.traffic]\nconcurrency = 2\nunits = 0\n'
    )
    with pytest.raises(PolicyFileError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert f"{path}:12" in message
    assert "groups[0].tenants[0].traffic.units" in message


def test_invalid_scenario_policy_and_syntax_errors(tmp_path: Path) -> None:
    """Policy errors inside a scenario and TOML syntax errors also carry the line."""
    path = tmp_path / "weight.toml"
    path.write_text(
        '[[groups]]\nname = "g"\ncapacity = 8\n\n[[groups.tenants]]\nname = "a"\nweight = -1\n'
        "traffic = { concurrency = 1 }\n"
    )
    with pytest.raises(PolicyFileError, match=r"weight\.toml:7: .*weight"):
        load_scenario(path)
    broken = tmp_path / "broken.toml"
    broken.write_text("[simulation]\nduration = 5\npods = = 3\n")
    with pytest.raises(PolicyFileError, match=r"broken\.toml:3: not valid TOML"):
        load_scenario(broken)
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")


def test_scenario_rejects_requests_that_can_never_fit() -> None:
    """Traffic asking more units than the tenant may ever hold is refused up front."""
    with pytest.raises(ConfigError, match="can never be admitted"):
        attrs.evolve(
            _tiny(),
            loads=(TenantLoad("lender", "g", Traffic("steady", 1, 9, 0.2)),),
        )


# -- short runs --------------------------------------------------------------------------


def test_run_scenario_on_a_private_fake_is_safe() -> None:
    """A short run on a private fakeredis admits both tenants and violates nothing."""
    server_client = fake_client()
    server = server_client.backend
    try:
        from ratequota.clients.sync import QuotaClient

        result = run_scenario(_tiny(), lambda: QuotaClient(backend=_shared(server)))
    finally:
        server_client.close()
    report = result.report
    assert report.safe, report.problems
    assert report.samples > 0
    assert all(t.admitted > 0 for t in report.tenants)
    assert report.max_over_admission == 0
    assert report.left_over_units == 0


def _shared(backend: Any) -> Any:
    """A backend wrapper whose close() leaves the shared fake server usable."""

    class Shared:
        def __getattr__(self, name: str) -> object:
            return getattr(backend, name)

        def close(self) -> None:
            pass

    return Shared()


def test_simulate_command_default_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ratequota simulate --duration 2` runs the default region and prints every statistic."""
    picture = tmp_path / "sim.png"
    code = cli.main(["simulate", "--duration", "2", "--plot", str(picture)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for needle in ("research", "reclaim", "Jain", "max over-admission seen: 0 units", "decisions:"):
        assert needle in out
    assert "2.0/2.0 s" in err  # the progress bar
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'ratequota[plot]'" in out
    else:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_without_matplotlib_says_how_to_get_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the plot extra the run still succeeds and names the extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        '[simulation]\npods = 2\n[[groups]]\nname = "solo"\ncapacity = 4\n'
        '[[groups.tenants]]\nname = "only"\ntraffic = { concurrency = 2, units = 1, hold = 0.1 }\n'
    )
    args = ["simulate", "--scenario", str(scenario), "--duration", "1", "--quiet"]
    code = cli.main([*args, "--plot", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "pip install 'ratequota[plot]'" in out
    assert not (tmp_path / "x.png").exists()


def test_simulate_exits_non_zero_when_an_invariant_breaks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command's exit status follows the report's safety verdict."""
    import ratequota.sim.command as command
    from ratequota.sim.fleet import RunResult

    real = command.run_scenario

    def broken(*args: object, **kwargs: object) -> RunResult:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        report = attrs.evolve(result.report, problems=("injected violation",))
        return attrs.evolve(result, report=report)

    monkeypatch.setattr(command, "run_scenario", broken)
    code = cli.main(["simulate", "--duration", "0.5", "--pods", "2", "--quiet", "--no-plot"])
    assert code == 1
    assert "injected violation" in capsys.readouterr().out


def test_library_never_imports_the_simulation() -> None:
    """The simulation is a tool on top of the library: importing every library module
    (the command line included) loads nothing from ``ratequota.sim``."""
    import pkgutil
    import subprocess

    import ratequota

    modules = [
        m.name
        for m in pkgutil.iter_modules(ratequota.__path__, "ratequota.")
        if not m.name.startswith("ratequota.sim")
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('ratequota.sim')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_simulate_run_takes_a_client_factory(capsys: pytest.CaptureFixture[str]) -> None:
    """``ratequota.sim.fleet(args, make_client)`` builds every pod through the given factory,
    so the command line can hand in its own without the simulation importing it."""
    import argparse

    from ratequota import sim
    from ratequota.clients.sync import QuotaClient

    parser = argparse.ArgumentParser()
    cli.add_backend_options(parser)
    sim.add_arguments(parser)
    args = parser.parse_args(["--duration", "0.5", "--pods", "3", "--quiet", "--no-plot"])
    shared = fake_client()
    built: list[QuotaClient] = []

    def factory(got: argparse.Namespace) -> QuotaClient:
        assert got is args
        client = QuotaClient(backend=_shared(shared.backend))
        built.append(client)
        return client

    try:
        assert sim.run(args, factory) == 0
    finally:
        shared.close()
    assert len(built) == 3
    assert "safety invariants: all held" in capsys.readouterr().out


def test_simulate_unreachable_backend_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that cannot be reached ends the command with exit 2 and a readable message."""
    code = cli.main(["simulate", "--redis", "redis://127.0.0.1:1/0", "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unavailable" in err
    assert "Traceback" not in err


@pytest.mark.real_redis
def test_simulate_on_real_redis(real_redis, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """The same simulation runs against a real redis-server, with zero over-admission."""
    scenario = str(EXAMPLES / "lender-returns.toml")
    args = ["simulate", "--redis", real_redis.url, "--scenario", scenario]
    code = cli.main([*args, "--duration", "1.5", "--pods", "6", "--quiet", "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max over-admission seen: 0 units" in out


@pytest.mark.real_redis
def test_default_region_is_fair_in_practice_on_real_redis(
    real_redis, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The default scenario, shortened to 8 s on a real redis-server, judged from `--json`.

    Played in driven time (`--driven`), so the run is the same on a loaded machine as on
    an idle one. Every tenant with steady demand gets 0.9-1.1 of its entitlement
    (computed from the demand its clients really had); for the bursty tenants and the
    returning lender the part of the gap not due to reclaim lag or granularity stays under
    5 %, and no reclaim episode outlasts the longest batch; each tenant's four causes add
    up to its gap; and Jain's index over the shares is at least 0.98 in every group.
    """
    import json

    args = ["simulate", "--redis", real_redis.url, "--duration", "8", "--quiet", "--no-plot"]
    code = cli.main([*args, "--driven", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert report["safe"] and report["max_over_admission"] == 0
    table = "\n".join(
        f"{t['group']}/{t['tenant']} {t['pattern']}: got/owed {t['got_over_entitled']:.3f}, "
        f"parts {t['gap_parts']}, longest lag {t['longest_reclaim_seconds']:.2f}"
        for t in report["tenants"]
    )
    for t in report["tenants"]:
        parts = t["gap_parts"]
        assert math.fsum(parts.values()) == pytest.approx(t["gap_unit_seconds"], abs=1e-6)
        assert t["longest_reclaim_seconds"] <= t["reclaim_bound_seconds"], table
        if t["pattern"] == "steady":
            assert 0.9 <= t["got_over_entitled"] <= 1.1, table
        else:
            residual = parts["unseen"] + parts["unexplained"]
            assert residual <= 0.05 * t["entitled_unit_seconds"], table
    for group in report["groups"]:
        assert group["jain"] >= 0.98, (group, table)


def _driven(scenario: Scenario, url: str | None = None) -> dict[str, object]:
    """A driven run of ``scenario`` on a private fake server (or on ``url``), its JSON
    report without the backend's name."""
    from ratequota.sim.report import report_to_dict

    shared = None if url else fake_client()

    def make() -> QuotaClient:
        if shared is None:
            return QuotaClient(url, prefix="rqsim")
        return QuotaClient(backend=_shared(shared.backend))

    try:
        result = run_scenario(scenario, make, driven=True)
    finally:
        if shared is not None:
            shared.close()
    data = report_to_dict(result.report)
    data.pop("backend")
    return data


def test_driven_runs_repeat_exactly() -> None:
    """Two driven runs of one scenario give the same report to the last digit: pods take
    turns in virtual time, so neither thread scheduling nor the machine's load matters."""
    scenario = attrs.evolve(_tiny(duration=2.0), pods=3)
    runs = [_driven(scenario), _driven(scenario)]
    assert runs[0] == runs[1]
    assert runs[0]["safe"] and runs[0]["round_trip_seconds"] == pytest.approx(0.001, rel=0.05)
    assert runs[0]["duration"] == pytest.approx(2.0)


def test_driven_run_keeps_the_global_random_state() -> None:
    """A driven run seeds the clients' retry jitter for itself and restores the caller's
    random state afterwards."""
    import random

    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    _driven(attrs.evolve(_tiny(duration=0.5), pods=2))
    assert random.random() == expected


@pytest.mark.real_redis
def test_driven_run_is_the_same_on_real_redis_and_embedded(real_redis) -> None:  # type: ignore[no-untyped-def]
    """End to end, the Lua on a real redis-server and on the embedded fakeredis decide
    alike: a driven run of the lender scenario gives the same report on both."""
    scenario = load_scenario(EXAMPLES / "lender-returns.toml").with_overrides(duration=3.0, pods=4)
    real_redis.client().flushall()
    assert _driven(scenario, url=real_redis.url) == _driven(scenario)


def test_latency_must_not_be_negative(capsys: pytest.CaptureFixture[str]) -> None:
    """`--latency` below zero is refused before anything runs."""
    code = cli.main(["simulate", "--driven", "--latency", "-1", "--duration", "1", "--quiet"])
    assert code == 2
    assert "--latency" in capsys.readouterr().err
