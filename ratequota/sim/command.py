"""``ratequota simulate``: its options, and the command that runs a scenario and reports.

The command line (``ratequota.cli``) only registers this command; the
simulation builds its own clients from the backend options, so the library
and the command line never import the simulation back (no import cycle).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import redis

from ratequota.clients.backends import translate_error
from ratequota.clients.sync import QuotaClient
from ratequota.errors import ConfigError
from ratequota.sim.fleet import run_scenario
from ratequota.sim.picture import plot_timeline
from ratequota.sim.report import render_report, report_to_dict
from ratequota.sim.scenario import default_scenario
from ratequota.sim.scenario_file import load_scenario
from ratequota.sim.shadow import ShadowTally, in_shadow

__all__ = ["add_arguments", "run"]

ClientFactory = Callable[[argparse.Namespace], QuotaClient]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota simulate``."""
    parser.add_argument(
        "--scenario", metavar="FILE", help="a scenario TOML file (default: built in)"
    )
    parser.add_argument(
        "--duration", type=float, help="seconds to run (default: the scenario's, 20)"
    )
    parser.add_argument("--pods", type=int, help="pods (clients) to simulate (default 60)")
    parser.add_argument("--seed", type=int, help="random seed of batch durations")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        default="ratequota-simulation.svg",
        help="where to draw units held over time: .svg (default: ratequota-simulation.svg, "
        "no dependency) or .png (the plot extra, matplotlib)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the picture")
    parser.add_argument(
        "--shadow",
        action="store_true",
        help="every group in shadow mode: admit all, report what enforcing would have refused",
    )
    parser.add_argument(
        "--driven",
        action="store_true",
        help="play the scenario in driven (virtual) time: pods take turns, every round trip "
        "takes --latency, and the same seed gives the same run on any machine",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=1.0,
        metavar="MS",
        help="with --driven: the virtual round trip of a script call, in ms (default 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (entitlements and the split of every gap included)",
    )
    # Simulated traffic must never land on a deployment's real keys.
    for action in parser._actions:
        if action.dest == "prefix":
            action.default = "rqsim"
            action.help = "key prefix (default: rqsim, apart from a deployment's keys)"


def run(args: argparse.Namespace, make_client: ClientFactory) -> int:
    """Run the simulation the arguments describe; 0 when every invariant held, 1 otherwise.

    ``make_client`` builds one pod's client from the arguments (the command
    line passes its ``client_from_args``, so the simulation itself depends on
    the library only and parses no backend options of its own).
    """
    factory = make_client
    scenario = load_scenario(args.scenario) if args.scenario else default_scenario()
    scenario = scenario.with_overrides(duration=args.duration, pods=args.pods, seed=args.seed)
    first = factory(args)
    try:
        for conn in first.backend.connections():
            conn.ping()
    except redis.exceptions.RedisError as exc:
        first.close()
        raise translate_error(exc, getattr(first.backend, "description", "redis")) from exc
    pool = [first]

    def next_pod() -> QuotaClient:
        return pool.pop() if pool else factory(args)

    print(
        f"simulating {scenario.pods} pods, {len(scenario.loads)} tenants in "
        f"{len(scenario.policy.groups)} groups, {scenario.workers()} request slots, "
        f"for {scenario.duration:g} s{' of driven time' if args.driven else ''} ...",
        file=sys.stderr,
    )
    tally = ShadowTally() if args.shadow else None
    if tally is not None:
        scenario = attrs.evolve(scenario, policy=in_shadow(scenario.policy))
    if args.latency < 0 or args.latency != args.latency:
        raise ConfigError("--latency", f"must be >= 0 ms, got {args.latency}")
    result = run_scenario(
        scenario,
        next_pod,
        progress=None if args.quiet else sys.stderr,
        observer=tally,
        driven=args.driven,
        latency=args.latency / 1000,
    )
    if args.json:
        document = report_to_dict(result.report)
        if tally is not None:
            document["shadow"] = tally.to_dict()
        print(json.dumps(document, indent=2))
    else:
        print(render_report(result.report))
        if tally is not None:
            print("\n" + tally.render())
    if not args.no_plot:
        path = Path(args.plot)
        drawn = plot_timeline(result, scenario, path)
        if args.json:
            pass  # stdout carries the JSON document alone
        elif drawn:
            tokens = " and tokens/s" if result.report.tokens else ""
            print(f"\npicture of units held{tokens} per tenant over time: {path}")
        else:
            print(
                "\nno picture drawn: a PNG needs matplotlib (`pip install 'ratequota[plot]'`); "
                f"--plot {path.with_suffix('.svg')} draws one with no dependency"
            )
    return 0 if result.report.safe else 1
