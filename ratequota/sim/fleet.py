"""``ratequota simulate``: a fleet of pods serving tenants in groups, on the embedded default.

Every pod is a ``QuotaClient`` on the same backend (for the embedded default,
clients of one process share one in-process server, as pods share a Redis).
Each tenant's traffic (``ratequota.sim.scenario``) is played by worker threads
spread over the pods: a worker that is active in the schedule acquires its
units (waiting up to the scenario's timeout, its demand registered as
pending), holds them for the batch's duration, releases them, and records
what happened. The main thread samples a snapshot of every group and draws a
progress bar on stderr. All statistics are computed afterwards from the
records by ``ratequota.sim.stats``; the threads stay thin.

Time comes from ``ratequota.sim.timing``: the wall clock, or driven time in
which the threads take turns on a virtual clock, so a run is the same on any
machine (``simulate --driven``).

The run exits non-zero when a safety invariant was violated: units held above
a group's capacity (seen by a snapshot, or by the client-side intervals at any
instant), a tenant above ``G + B``, snapshots whose leases do not add up, or
units left held after every lease was released.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable
from typing import TextIO

import attrs

from ratequota.clients.sync import QuotaClient
from ratequota.errors import AcquireTimeout, RateQuotaError
from ratequota.observe import Observer
from ratequota.sim.measure import Request
from ratequota.sim.metering import (
    Batch,
    DecisionTap,
    MeterRefusal,
    estimates,
    request_record,
    settle_batch,
)
from ratequota.sim.scenario import Scenario, TenantLoad
from ratequota.sim.stats import (
    Interval,
    Outcome,
    Report,
    Sample,
    build_report,
)
from ratequota.sim.timing import CountingBackend, DrivenTime, PodClock, WallTime
from ratequota.sim.tokens import (
    group_tokens,
    settlement_totals,
    token_problems,
    token_reports,
)

__all__ = [
    "CountingBackend",
    "Recorder",
    "RunResult",
    "progress_line",
    "run_scenario",
]

#: Shortest sleep of a worker whose slot is idle in the schedule (it sleeps until the slot
#: is next active, but never spins).
_IDLE_POLL = 0.005


@attrs.define
class Recorder:
    """What one worker thread saw; only that thread appends to it (no lock needed)."""

    intervals: list[Interval] = attrs.Factory(list)
    outcomes: list[Outcome] = attrs.Factory(list)
    requests: list[Request] = attrs.Factory(list)
    batches: list[Batch] = attrs.Factory(list)
    refusals: list[MeterRefusal] = attrs.Factory(list)
    lost: int = 0
    errors: list[str] = attrs.Factory(list)


@attrs.frozen
class RunResult:
    """The report of a run and the raw records it was computed from."""

    report: Report
    intervals: tuple[Interval, ...]
    samples: tuple[Sample, ...]
    requests: tuple[Request, ...] = ()
    batches: tuple[Batch, ...] = ()


def _worker(
    client: QuotaClient,
    load: TenantLoad,
    index: int,
    scenario: Scenario,
    timebase: WallTime | DrivenTime,
    token: int,
    record: Recorder,
) -> None:
    """One slot of one tenant: acquire, hold, release while the schedule says it is active.

    A request waits at most until its slot stops being active in the
    schedule (the end of a burst, a lender going idle): a tenant's demand is
    what its schedule says, not requests left waiting from an earlier phase.
    """
    timebase.begin(token)
    try:
        _serve(client, load, index, scenario, timebase, record)
    finally:
        timebase.leave()


def _serve(
    client: QuotaClient,
    load: TenantLoad,
    index: int,
    scenario: Scenario,
    timebase: WallTime | DrivenTime,
    record: Recorder,
) -> None:
    rng = random.Random(f"{scenario.seed}:{load.tenant}:{index}")
    traffic = load.traffic
    clock = client.core.clock
    tap = client.core.attempt if isinstance(client.core.attempt, DecisionTap) else None
    amounts = estimates(scenario, load)
    stop = timebase.stop
    count = 0
    while not stop.is_set() and timebase.now() < scenario.duration:
        now = timebase.now()
        if index >= traffic.concurrency_at(now / scenario.duration):
            wake = scenario.duration * traffic.next_active(index, now / scenario.duration)
            timebase.wait(max(_IDLE_POLL, wake - now))
            continue
        asked = now
        # Never wait past the end of the run or of the slot's active phase; a wait cut
        # short by either is not a refusal.
        remaining = scenario.duration * traffic.active_until(index, now / scenario.duration) - now
        timeout = min(scenario.acquire_timeout, max(0.0, remaining))
        refusals: list[float] = []
        refused: list[MeterRefusal] = []
        if isinstance(clock, PodClock):
            clock.watch(refusals)
        if tap is not None:
            tap.watch(load.tenant, refused)
        count += 1
        # Driven runs name their requests, so the same run makes the same keys.
        request_id = f"sim-{load.tenant}-{index}-{count}" if timebase.driven else None
        try:
            acquisition = client.acquire(
                load.tenant,
                traffic.units,
                group=load.group,
                ttl=scenario.lease_ttl,
                timeout=timeout,
                request_id=request_id,
                meters=amounts or None,
            )
            lease = acquisition.__enter__()
        except AcquireTimeout:
            gave_up = timebase.now()
            if timeout >= scenario.acquire_timeout:
                record.outcomes.append(Outcome(load.tenant, asked, gave_up - asked, False))
            record.requests.append(request_record(load, asked, gave_up, None, refusals, refused))
            continue
        except RateQuotaError as exc:
            record.errors.append(f"{load.tenant}: {exc}")
            timebase.wait(0.2)
            continue
        finally:
            if isinstance(clock, PodClock):
                clock.watch(None)
            if tap is not None:
                tap.watch(load.tenant, None)
            record.refusals += refused
        got = timebase.now()
        record.outcomes.append(Outcome(load.tenant, asked, got - asked, True))
        timebase.wait(traffic.hold * rng.uniform(0.5, 1.5))
        if traffic.tokens:
            batch, error = settle_batch(
                lease, load, got, traffic.actual_tokens(rng.random()), timebase.now
            )
            record.batches.append(batch)
            if error is not None:
                record.errors.append(error)
        end = timebase.now()
        try:
            lease.release()
        except RateQuotaError as exc:
            record.errors.append(f"{load.tenant}: release: {exc}")
        if lease.lost:
            record.lost += 1  # its units may have been reused: not a client-side holding
        else:
            record.intervals.append(Interval(load.tenant, load.group, traffic.units, got, end))
            record.requests.append(request_record(load, asked, end, got, refusals, refused))


def _in_shadow(scenario: Scenario) -> set[str]:
    """Groups shadow mode may take above their meters (the group or a tenant is in it)."""
    return {
        g.name
        for g in scenario.policy.groups
        if g.shadow or g.default_tenant.shadow or any(t.shadow for t in g.tenants)
    }


def _sample(client: QuotaClient, scenario: Scenario, at: float) -> list[Sample]:
    samples = []
    for group in scenario.policy.groups:
        names = [t.name for t in group.tenants]
        snap = client.snapshot(group.name, names)
        samples.append(
            Sample(
                group=group.name,
                at=at,
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
    observer: Observer | None = None,
    driven: bool = False,
    latency: float = 0.001,
) -> RunResult:
    """Play ``scenario`` with one client per pod from ``make_client``; report what happened.

    Publishes the scenario's policy first (through the first pod); ``observer``
    hears every pod's decisions (``--shadow`` counts with it). ``driven``
    plays it in driven time, every round trip taking ``latency`` virtual
    seconds (``ratequota.sim.timing``): the same run on any machine. Raises
    ``BackendUnavailable`` when the backend cannot be reached at start.
    """
    stop = threading.Event()
    timebase: WallTime | DrivenTime = DrivenTime(stop, latency) if driven else WallTime(stop)
    clients: list[QuotaClient] = []
    state = random.getstate()
    try:
        for _ in range(scenario.pods):
            client = make_client()
            client.backend = CountingBackend(client.backend, timebase)
            client.core.clock = PodClock(timebase)
            if driven:
                # Renewals happen in the sampler's turns (a background thread would run
                # outside driven time).
                client.renewer.background = False
            if observer is not None:
                client.core.observer = observer
            # Every refused try of a waiting acquire is counted by meter (sim.tokens).
            client.core.attempt = DecisionTap(client.core.attempt, timebase.now)  # type: ignore[method-assign]
            clients.append(client)
        # Every script loaded first, so no call meets NOSCRIPT (a driven run then makes the
        # same calls whether or not the server has seen the scripts before).
        for client in clients:
            client.load_scripts(strict=False)
        clients[0].apply_policy(scenario.policy)
        for client in clients[1:]:
            client.load_policy()
        if driven:
            random.seed(f"{scenario.seed}:retry-jitter")  # the clients' pauses are jittered
        return _play(scenario, clients, timebase, progress)
    finally:
        if driven:
            random.setstate(state)
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


def _play(
    scenario: Scenario,
    clients: list[QuotaClient],
    timebase: WallTime | DrivenTime,
    progress: TextIO | None,
) -> RunResult:
    stop = timebase.stop
    recorders: list[Recorder] = []
    threads: list[threading.Thread] = []
    me = timebase.enroll()
    slot = 0
    for load in scenario.loads:
        for index in range(load.traffic.concurrency):
            recorder = Recorder()
            recorders.append(recorder)
            pod = clients[slot % len(clients)]
            slot += 1
            token = timebase.enroll()
            threads.append(
                threading.Thread(
                    target=_worker,
                    args=(pod, load, index, scenario, timebase, token, recorder),
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
    timebase.begin(me)
    try:
        while True:
            elapsed = timebase.now()
            if elapsed >= scenario.duration:
                break
            samples += _sample(sampler, scenario, elapsed)
            if timebase.driven:
                for client in clients:
                    client.renewer.renew_due()
            if progress is not None and (
                tty or elapsed - last_draw >= max(1.0, scenario.duration / 10)
            ):
                admitted = sum(1 for r in recorders for o in r.outcomes if o.admitted)
                refused = sum(1 for r in recorders for o in r.outcomes if not o.admitted)
                line = progress_line(elapsed, scenario.duration, admitted, refused)
                progress.write(f"\r{line}" if tty else f"{line}\n")
                progress.flush()
                last_draw = elapsed
            timebase.wait(min(scenario.sample_interval, max(0.0, scenario.duration - elapsed)))
    finally:
        stop.set()
        elapsed = min(timebase.now(), scenario.duration) if timebase.driven else timebase.now()
        timebase.leave()
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
    requests = [rq for r in recorders for rq in r.requests]
    outcomes = [o for r in recorders for o in r.outcomes]
    calls = sum(getattr(c.backend, "calls", 0) for c in clients)
    call_seconds = sum(getattr(c.backend, "seconds", 0.0) for c in clients)
    report = build_report(
        scenario,
        intervals,
        outcomes,
        samples,
        elapsed=elapsed,
        backend=getattr(sampler.backend, "description", "redis"),
        script_calls=calls,
        round_trip=call_seconds / calls if calls else math.nan,
        lost_leases=sum(r.lost for r in recorders),
        left_over_units=left if not stuck else 0,
        requests=requests,
        pending_ttl=sampler.core.settings.pending_ttl,
        bin_width=max(0.1, scenario.duration / 150),
    )
    batches = [b for r in recorders for b in r.batches]
    if any(g.meter("tokens") is not None for g in scenario.policy.groups):
        refusals = [m for r in recorders for m in r.refusals]
        totals = settlement_totals(b for b in batches if b.start < elapsed)
        tokens = token_reports(scenario, batches, refusals, until=elapsed)
        groups = group_tokens(scenario, batches, until=elapsed)
        report = attrs.evolve(
            report,
            tokens=tokens,
            token_groups=groups,
            settlement=totals,
            problems=(
                *report.problems,
                *token_problems(tokens, groups, totals, exempt=_in_shadow(scenario)),
            ),
        )
    errors = [e for r in recorders for e in r.errors]
    problems = list(report.problems)
    if stuck:
        problems.append(f"{stuck} worker threads did not stop in time")
    if errors:
        problems.append(f"{len(errors)} unexpected errors, the first: {errors[0]}")
    if problems != list(report.problems):
        report = attrs.evolve(report, problems=tuple(problems))
    return RunResult(report, tuple(intervals), tuple(samples), tuple(requests), tuple(batches))
