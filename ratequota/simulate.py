"""``ratequota simulate``: a fleet of pods serving tenants in groups, on the embedded default.

Every pod is a ``QuotaClient`` on the same backend (for the embedded default,
clients of one process share one in-process server, as pods share a Redis).
Each tenant's traffic (``ratequota.scenario``) is played by worker threads
spread over the pods: a worker that is active in the schedule acquires its
units (waiting up to the scenario's timeout, its demand registered as
pending), holds them for the batch's duration, releases them, and records
what happened. The main thread samples a snapshot of every group and draws a
progress bar on stderr. All statistics are computed afterwards from the
records by ``ratequota.simstats``; the threads stay thin.

The run exits non-zero when a safety invariant was violated: units held above
a group's capacity (seen by a snapshot, or by the client-side intervals at any
instant), a tenant above ``G + B``, snapshots whose leases do not add up, or
units left held after every lease was released.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import redis

from ratequota.clients.backends import translate_error
from ratequota.clients.sync import QuotaClient
from ratequota.errors import AcquireTimeout, RateQuotaError
from ratequota.scenario import Scenario, TenantLoad, default_scenario, load_scenario
from ratequota.simstats import (
    Interval,
    Outcome,
    Report,
    Sample,
    binned_average,
    build_report,
    render_report,
    step_function,
)

__all__ = [
    "CountingBackend",
    "Recorder",
    "RunResult",
    "add_arguments",
    "plot_timeline",
    "run",
    "run_scenario",
]

#: How often a worker whose tenant is idle in the schedule checks again.
_IDLE_POLL = 0.05


class CountingBackend:
    """Wraps a backend so every script call (EVALSHA) is counted; everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.description = getattr(inner, "description", "redis")
        self.calls = 0  # += under the GIL from many threads; an estimate is all we need

    def connection(self, route: str) -> Any:
        """The inner connection, wrapped to count ``evalsha``."""
        return _CountingConnection(self._inner.connection(route), self)

    def connections(self) -> Sequence[Any]:
        """The inner backend's connections."""
        return self._inner.connections()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the inner backend."""
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingConnection:
    def __init__(self, conn: Any, owner: CountingBackend) -> None:
        self._conn = conn
        self._owner = owner

    def evalsha(self, *args: Any) -> Any:
        self._owner.calls += 1
        return self._conn.evalsha(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@attrs.define
class Recorder:
    """What one worker thread saw; only that thread appends to it (no lock needed)."""

    intervals: list[Interval] = attrs.Factory(list)
    outcomes: list[Outcome] = attrs.Factory(list)
    lost: int = 0
    errors: list[str] = attrs.Factory(list)


@attrs.frozen
class RunResult:
    """The report of a run and the raw records it was computed from."""

    report: Report
    intervals: tuple[Interval, ...]
    samples: tuple[Sample, ...]


def _worker(
    client: QuotaClient,
    load: TenantLoad,
    index: int,
    scenario: Scenario,
    started: float,
    stop: threading.Event,
    record: Recorder,
) -> None:
    """One slot of one tenant: acquire, hold, release while the schedule says it is active."""
    rng = random.Random(f"{scenario.seed}:{load.tenant}:{index}")
    traffic = load.traffic
    while not stop.is_set():
        now = time.monotonic() - started
        if index >= traffic.concurrency_at(now / scenario.duration):
            stop.wait(_IDLE_POLL)
            continue
        asked = time.monotonic()
        # Never wait past the end of the run; a wait cut short by the end is not a refusal.
        remaining = scenario.duration - (asked - started)
        timeout = min(scenario.acquire_timeout, max(0.0, remaining))
        try:
            acquisition = client.acquire(
                load.tenant,
                traffic.units,
                group=load.group,
                ttl=scenario.lease_ttl,
                timeout=timeout,
            )
            lease = acquisition.__enter__()
        except AcquireTimeout:
            if timeout >= scenario.acquire_timeout:
                record.outcomes.append(
                    Outcome(load.tenant, asked - started, time.monotonic() - asked, False)
                )
            continue
        except RateQuotaError as exc:
            record.errors.append(f"{load.tenant}: {exc}")
            stop.wait(0.2)
            continue
        got = time.monotonic()
        record.outcomes.append(Outcome(load.tenant, asked - started, got - asked, True))
        stop.wait(traffic.hold * rng.uniform(0.5, 1.5))
        end = time.monotonic()
        try:
            lease.release()
        except RateQuotaError as exc:
            record.errors.append(f"{load.tenant}: release: {exc}")
        if lease.lost:
            record.lost += 1  # its units may have been reused: not a client-side holding
        else:
            record.intervals.append(
                Interval(load.tenant, load.group, traffic.units, got - started, end - started)
            )


def _sample(client: QuotaClient, scenario: Scenario, started: float) -> list[Sample]:
    samples = []
    for group in scenario.policy.groups:
        names = [t.name for t in group.tenants]
        snap = client.snapshot(group.name, names)
        samples.append(
            Sample(
                group=group.name,
                at=time.monotonic() - started,
                capacity=snap.capacity,
                used=snap.used,
                tenant_used={n: t.used for n, t in snap.tenants.items()},
                tenant_limit={n: t.limit for n, t in snap.tenants.items()},
                lease_units=snap.used
                if snap.leases_truncated
                else sum(lease.units for lease in snap.leases),
            )
        )
    return samples


def progress_line(
    elapsed: float, duration: float, admitted: int, refused: int, width: int = 30
) -> str:
    """A plain-text progress bar: ``[#####-----]  5.0/20.0 s  admitted 123  refused 4``."""
    done = min(1.0, max(0.0, elapsed / duration)) if duration > 0 else 1.0
    filled = round(done * width)
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {min(elapsed, duration):5.1f}/{duration:.1f} s"
        f"  admitted {admitted}  refused {refused}"
    )


def run_scenario(
    scenario: Scenario,
    make_client: Callable[[], QuotaClient],
    *,
    progress: TextIO | None = None,
) -> RunResult:
    """Play ``scenario`` with one client per pod from ``make_client``; report what happened.

    Publishes the scenario's policy first (through the first pod). Raises
    ``BackendUnavailable`` when the backend cannot be reached at start.
    """
    clients: list[QuotaClient] = []
    try:
        for _ in range(scenario.pods):
            client = make_client()
            client.backend = CountingBackend(client.backend)
            clients.append(client)
        clients[0].apply_policy(scenario.policy)
        for client in clients[1:]:
            client.load_policy()
        return _play(scenario, clients, progress)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


def _play(scenario: Scenario, clients: list[QuotaClient], progress: TextIO | None) -> RunResult:
    stop = threading.Event()
    recorders: list[Recorder] = []
    threads: list[threading.Thread] = []
    started = time.monotonic()
    slot = 0
    for load in scenario.loads:
        for index in range(load.traffic.concurrency):
            recorder = Recorder()
            recorders.append(recorder)
            pod = clients[slot % len(clients)]
            slot += 1
            threads.append(
                threading.Thread(
                    target=_worker,
                    args=(pod, load, index, scenario, started, stop, recorder),
                    name=f"pod{slot % len(clients)}-{load.tenant}-{index}",
                    daemon=True,
                )
            )
    for thread in threads:
        thread.start()
    samples: list[Sample] = []
    sampler = clients[0]
    last_draw = -1.0
    tty = progress is not None and progress.isatty()
    try:
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= scenario.duration:
                break
            samples += _sample(sampler, scenario, started)
            if progress is not None and (
                tty or elapsed - last_draw >= max(1.0, scenario.duration / 10)
            ):
                admitted = sum(1 for r in recorders for o in r.outcomes if o.admitted)
                refused = sum(1 for r in recorders for o in r.outcomes if not o.admitted)
                line = progress_line(elapsed, scenario.duration, admitted, refused)
                progress.write(f"\r{line}" if tty else f"{line}\n")
                progress.flush()
                last_draw = elapsed
            stop.wait(min(scenario.sample_interval, max(0.0, scenario.duration - elapsed)))
    finally:
        stop.set()
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + scenario.acquire_timeout + 10.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if progress is not None:
        admitted = sum(1 for r in recorders for o in r.outcomes if o.admitted)
        refused = sum(1 for r in recorders for o in r.outcomes if not o.admitted)
        line = progress_line(elapsed, scenario.duration, admitted, refused) + "  done"
        progress.write(f"\r{line}\n" if tty else f"{line}\n")
        progress.flush()
    stuck = sum(1 for t in threads if t.is_alive())
    left = sum(sampler.snapshot(g.name).used for g in scenario.policy.groups)
    intervals = [iv for r in recorders for iv in r.intervals]
    outcomes = [o for r in recorders for o in r.outcomes]
    calls = sum(getattr(c.backend, "calls", 0) for c in clients)
    report = build_report(
        scenario,
        intervals,
        outcomes,
        samples,
        elapsed=elapsed,
        backend=getattr(sampler.backend, "description", "redis"),
        script_calls=calls,
        lost_leases=sum(r.lost for r in recorders),
        left_over_units=left if not stuck else 0,
    )
    errors = [e for r in recorders for e in r.errors]
    problems = list(report.problems)
    if stuck:
        problems.append(f"{stuck} worker threads did not stop in time")
    if errors:
        problems.append(f"{len(errors)} unexpected errors, the first: {errors[0]}")
    if problems != list(report.problems):
        report = attrs.evolve(report, problems=tuple(problems))
    return RunResult(report, tuple(intervals), tuple(samples))


# -- the picture -----------------------------------------------------------------


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


# -- the command -----------------------------------------------------------------


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
        metavar="PNG",
        default="ratequota-simulation.png",
        help="where to draw units held over time (default: ratequota-simulation.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the picture")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # Simulated traffic must never land on a deployment's real keys.
    for action in parser._actions:
        if action.dest == "prefix":
            action.default = "rqsim"
            action.help = "key prefix (default: rqsim, apart from a deployment's keys)"


def run(args: argparse.Namespace) -> int:
    """Run the simulation the arguments describe; 0 when every invariant held, 1 otherwise."""
    from ratequota.cli import client_from_args

    scenario = load_scenario(args.scenario) if args.scenario else default_scenario()
    scenario = scenario.with_overrides(duration=args.duration, pods=args.pods, seed=args.seed)
    first = client_from_args(args)
    try:
        for conn in first.backend.connections():
            conn.ping()
    except redis.exceptions.RedisError as exc:
        first.close()
        raise translate_error(exc, getattr(first.backend, "description", "redis")) from exc
    pool = [first]

    def make_client() -> QuotaClient:
        return pool.pop() if pool else client_from_args(args)

    print(
        f"simulating {scenario.pods} pods, {len(scenario.loads)} tenants in "
        f"{len(scenario.policy.groups)} groups, {scenario.workers()} request slots, "
        f"for {scenario.duration:g} s ...",
        file=sys.stderr,
    )
    result = run_scenario(scenario, make_client, progress=None if args.quiet else sys.stderr)
    print(render_report(result.report))
    if not args.no_plot:
        path = Path(args.plot)
        if plot_timeline(result, scenario, path):
            print(f"\npicture of units held per tenant over time: {path}")
        else:
            print(
                "\nno picture drawn: matplotlib is not installed; "
                "`pip install 'ratequota[plot]'` to get one"
            )
    return 0 if result.report.safe else 1
