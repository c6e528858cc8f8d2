"""An independent checker of fault-run histories: reads JSON lines, reports violated properties.

It imports nothing from ratequota (only ``records`` for reading files): the
rules below are re-derived from the documented contract, so a bug shared by
the library's own code and its reference cannot hide here.

What is checked (``Violation.kind``):

* ``over_capacity`` / ``over_ceiling`` — at the Redis instant of every
  admission, the units of the group's *certainly valid* leases (admitted,
  not yet released, not yet past the last expiry the library reported) exceed
  the capacity in force (or the admitted tenant's ``min(C, G + B)``). Both
  bounds of a policy change count while it is being applied. A lease's
  validity ends at the *start* of its release call, so a lease is never
  counted longer than it surely lived: a reported overshoot is real.
  Inside a state-loss window (a Redis restart without persistence, eviction)
  an overshoot is also reported as ``state_loss_overshoot``; it counts as a
  violation beyond ``state_loss_bound`` units per loss (0 since the library
  has a recovery window; None only reports).
* ``token_order`` — fencing tokens strictly increase per group in admission
  order (and never repeat). Pairs separated by a state loss are reported as
  ``token_after_state_loss``.
* ``release_not_reflected`` — a lease whose release was acknowledged appears
  in a later snapshot; ``accounting`` — a snapshot's units held differ from
  the units of the leases it lists; ``lease_vanished`` — a lease that must be
  live (by its reported expiry) is missing from a snapshot, or its renewal or
  release said it was gone (``vanished_after_state_loss`` in a loss window).
* ``released_after_expiry`` — a release said "released" for a lease whose
  reported expiry had already passed when the release started
  (``released_after_state_loss`` in a loss window: with its expiry lost, the
  lease's entry still there, the library frees the units and says "released").
* ``late_call`` — a call returned later than its deadline plus ``margin_s``.
* ``held_at_end`` — the end snapshot (pinned after every possible expiry)
  still counts units or pending demand, or lists a lease;
  ``key_without_ttl`` — a state key was left without an expiry;
  ``stray_lease`` — the final snapshot lists a lease nobody could hold.
* ``known_tenant_refused`` — a call raised ``UnknownTenant`` for a tenant
  every policy in force lists (``unknown_after_state_loss`` inside a
  state-loss window);
  ``replay_mismatch`` — a retried request id was answered with a lease of
  another tenant, or of other units, than the original;
  ``forgery_accepted`` — a release or renewal naming a lease's id with
  another tenant or token was applied (``forgery_after_state_loss`` in a
  state-loss window, where a renewal re-asserts a lease Redis forgot).
* ``over_rate`` / ``over_tenant_rate`` — over some interval of Redis time, a
  group's admitted requests named more ``tokens`` than its rate meter's bucket
  lets through (``burst + rate·T``), or a tenant's more than its ceiling
  bucket does (``cburst + ceil·T``); no state loss excuses it.
* ``foreign_error`` — a call raised something that is not a ratequota error;
  ``exit_raised`` — leaving ``acquire``'s block raised; ``pod_hung`` — a pod
  still ran long after the stop time; ``pod_crashed`` — a pod exited with an
  error status (not a pod the driver killed).
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.records import read_jsonl

__all__ = ["CheckOptions", "Lease", "Report", "Violation", "check", "check_run", "complete_calls"]


@dataclass(frozen=True)
class CheckOptions:
    """Tolerances and bounds, all documented in docs/failure-modes.md ("Fault harness").

    ``margin_s``: a call may return this much after its deadline.
    ``clock_slack_ms``: pods and Redis read the same host clock, but at
    different moments of one call; comparisons of a pod's clock with Redis
    times allow this much. ``loss_window_ms``: how long after a state loss
    leases the library forgot may still be held (the longest lease TTL a pod
    uses). ``state_loss_bound``: the most units a group (or tenant) may hold
    above its bound per state loss in a window; None: any (only reported).
    """

    margin_s: float = 1.0
    clock_slack_ms: int = 5
    loss_window_ms: int = 3000
    state_loss_bound: int | None = None


@dataclass(frozen=True)
class Violation:
    """One broken property, with enough context to find it in the histories."""

    kind: str
    group: str
    at_ms: int
    detail: str


@dataclass
class Lease:
    """One admitted lease as the histories tell it (units on Redis time)."""

    id: str
    pod: str
    tenant: str
    group: str
    units: int
    token: int
    admit_ms: int
    known_at_ms: int  # pod's clock when the admission was reported
    expiries: list[tuple[int, int]]  # (pod clock when reported, expiry reported)
    kind: str  # "try" or "context"
    release_start_ms: int | None = None
    released_ack_ms: int | None = None  # pod clock when "released" was reported
    gone_at_ms: int | None = None  # start of a renew/release that found it gone
    gone_reported_ms: int | None = None  # and when its answer came back
    #: A renewal that got no answer may still have run (a timeout under a paused server):
    #: from then on the expiry is only known to be at least its start plus its TTL.
    uncertain_ms: int | None = None

    def live_until(self, wall_ms: int) -> int:
        """Until when the lease is surely live, as known at ``wall_ms`` (pod clock)."""
        known = self.expiry_known_before(wall_ms)
        return known if self.uncertain_ms is None else min(known, self.uncertain_ms)

    def expiry_known_before(self, wall_ms: int) -> int:
        """The expiry last reported before ``wall_ms`` (pod clock).

        The last one, not the largest: a renewal sets the expiry to its own
        time plus the new TTL, which may be sooner than the old expiry.
        """
        known = [e for at, e in sorted(self.expiries) if at <= wall_ms]
        return known[-1] if known else self.expiries[0][1]

    @property
    def end_ms(self) -> int:
        """End of the certainly-valid interval ``[admit_ms, end_ms)``.

        Every successful renewal happened while the lease was valid, so the
        lease was valid without a gap until the expiry reported last.
        """
        end = sorted(self.expiries)[-1][1]
        for cut in (self.release_start_ms, self.gone_at_ms, self.uncertain_ms):
            if cut is not None:
                end = min(end, cut)
        return end


@dataclass
class Report:
    """Violations and the figures of a run."""

    violations: list[Violation] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> Counter[str]:
        """How many violations of each kind."""
        return Counter(v.kind for v in self.violations)

    def hard(self, allowed: Iterable[str] = ()) -> list[Violation]:
        """Violations whose kind is not in ``allowed``."""
        skip = set(allowed)
        return [v for v in self.violations if v.kind not in skip]

    def summary(self) -> str:
        """A few lines for logs and test failures."""
        lines = [f"{k}: {v}" for k, v in sorted(self.figures.items())]
        for kind, count in sorted(self.kinds().items()):
            first = next(v for v in self.violations if v.kind == kind)
            lines.append(f"VIOLATION {kind} x{count}; first: [{first.group}] {first.detail}")
        return "\n".join(lines)


# -- policy and fault windows --------------------------------------------------------------------


@dataclass(frozen=True)
class _Bounds:
    """A group's capacity and tenant ceilings over time (the driver's policy records)."""

    changes: list[tuple[int, int, dict[str, Any]]]  # (start ms, end ms, groups spec), in order

    def at(self, group: str, t_ms: int) -> tuple[int, dict[str, int]]:
        """Capacity and ceilings in force at ``t_ms``; while a change is applied, the larger."""
        current: dict[str, Any] | None = None
        for start, end, spec in self.changes:
            if start > t_ms:
                break
            if end >= t_ms and current is not None:  # being applied: old and new both hold
                return _merge(current, spec, group)
            current = spec
        if current is None:
            return 0, {}
        g = current.get(group)
        if g is None:
            return 0, {}
        return int(g["capacity"]), {t: int(s["ceiling"]) for t, s in g["tenants"].items()}

    def knows(self, tenant: str, t_ms: int) -> bool:
        """True if every policy in force at ``t_ms`` (two while one is applied) lists ``tenant``."""
        current: dict[str, Any] | None = None
        for start, end, spec in self.changes:
            if start > t_ms:
                break
            if end >= t_ms and current is not None and not _knows(current, tenant):
                return False
            current = spec
        return current is not None and _knows(current, tenant)


def _knows(spec: Mapping[str, Any], tenant: str) -> bool:
    return any(tenant in g["tenants"] for g in spec.values())


def _merge(
    old: Mapping[str, Any], new: Mapping[str, Any], group: str
) -> tuple[int, dict[str, int]]:
    a, b = old.get(group), new.get(group)
    caps = [int(x["capacity"]) for x in (a, b) if x]
    ceilings: dict[str, int] = {}
    for x in (a, b):
        if x:
            for t, s in x["tenants"].items():
                ceilings[t] = max(ceilings.get(t, 0), int(s["ceiling"]))
    return max(caps, default=0), ceilings


def _loss_windows(faults: list[dict[str, Any]], window_ms: int) -> list[tuple[int, int, str]]:
    """(start, end, server) of every state loss: from the fault until forgotten leases ended."""
    out = []
    for f in faults:
        if f.get("state_loss"):
            start = int(f["wall_start"] * 1000)
            end = int(f["wall_end"] * 1000) + window_ms
            out.append((start, end, str(f.get("server", ""))))
    return out


def _losses_at(windows: list[tuple[int, int, str]], t_ms: int) -> int:
    return sum(1 for s, e, _ in windows if s <= t_ms <= e)


def _loss_between(windows: list[tuple[int, int, str]], a_ms: int, b_ms: int) -> bool:
    """True if a state loss began in ``[a_ms, b_ms]`` (or was under way at either end)."""
    return any(s <= b_ms and a_ms <= e for s, e, _ in windows)


# -- building leases from calls -----------------------------------------------------------------


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def build_leases(calls: list[dict[str, Any]]) -> dict[str, list[Lease]]:
    """Every admitted lease and what its renewals and releases reported, by lease id.

    One id may name several leases in turn (a retry after the first lease
    ended is admitted afresh); a renewal or release belongs to the latest
    lease of its id that the pod knew of when the call started.
    """
    leases: dict[str, list[Lease]] = defaultdict(list)
    for c in sorted(calls, key=lambda c: c["wall_end"]):
        op = c["op"]
        if op in ("try_acquire", "acquire") and c.get("outcome") == "admitted":
            if c.get("synthetic") or c.get("replay") or "admit_ms" not in c:
                continue  # synthetic: no units in Redis; replay: the lease is already known
            leases[c["lease_id"]].append(
                Lease(
                    id=c["lease_id"],
                    pod=c["pod"],
                    tenant=c["tenant"],
                    group=c["group"],
                    units=int(c["units"]),
                    token=int(c["token"]),
                    admit_ms=int(c["admit_ms"]),
                    known_at_ms=_ms(c["wall_end"]),
                    expiries=[(_ms(c["wall_end"]), int(c["expiry_ms"]))],
                    kind="try" if op == "try_acquire" else "context",
                )
            )
    for c in sorted(calls, key=lambda c: c["wall_start"]):
        if c["op"] not in ("renew", "release"):
            continue
        start = _ms(c["wall_start"])
        lease = lease_at(leases, c.get("lease_id", ""), start)
        if lease is None:
            continue
        if c["op"] == "release":
            if lease.release_start_ms is None:
                lease.release_start_ms = start
            if c.get("outcome") == "ok" and c.get("state") == "released":
                lease.released_ack_ms = _ms(c["wall_end"])
            if c.get("outcome") == "ok" and c.get("state") != "released":
                _gone(lease, c)
        elif c.get("outcome") == "error":
            cut = start + int(c.get("ttl_ms", 0))
            lease.uncertain_ms = cut if lease.uncertain_ms is None else min(lease.uncertain_ms, cut)
        elif c.get("outcome") == "ok":
            if c.get("renewed"):
                lease.expiries.append((_ms(c["wall_end"]), int(c["new_expiry_ms"])))
            else:
                _gone(lease, c)
        if c["op"] == "release" and c.get("via") == "context":
            # The context manager's lease may have been renewed in the background.
            lease.expiries.append((_ms(c["wall_start"]), int(c["expiry_ms"])))
    return leases


def lease_at(leases: Mapping[str, list[Lease]], lease_id: str, wall_ms: int) -> Lease | None:
    """The latest lease named ``lease_id`` that was known by ``wall_ms`` (pod clock)."""
    known = [x for x in leases.get(lease_id, ()) if x.known_at_ms <= wall_ms]
    return known[-1] if known else None


def _gone(lease: Lease, call: Mapping[str, Any]) -> None:
    """The first call that found the lease gone (expired or unknown)."""
    if lease.gone_at_ms is None:
        lease.gone_at_ms = _ms(call["wall_start"])
        lease.gone_reported_ms = _ms(call["wall_end"])


# -- the checks -----------------------------------------------------------------------------------


def check(
    calls: list[dict[str, Any]],
    policies: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    snapshots: list[dict[str, Any]],
    options: CheckOptions | None = None,
) -> Report:
    """Check one run's records (see the module docstring for the properties)."""
    opts = options or CheckOptions()
    report = Report()
    bounds = _Bounds([(_ms(p["wall_start"]), _ms(p["wall_end"]), p["groups"]) for p in policies])
    windows = _loss_windows(faults, opts.loss_window_ms)
    named = build_leases(calls)
    leases = [x for same_id in named.values() for x in same_id]
    by_group: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        by_group[lease.group].append(lease)
    max_over = 0
    for group, group_leases in sorted(by_group.items()):
        max_over = max(
            max_over, _check_capacity(group, group_leases, bounds, windows, opts, report)
        )
        _check_tokens(group, group_leases, windows, report)
    _check_releases(leases, windows, opts, report)
    _check_replays(named, calls, report)
    _check_snapshots(leases, calls, snapshots, windows, opts, report)
    _check_calls(calls, bounds, windows, opts, report)
    metered = _check_rates(calls, policies, report)
    admitted = [c for c in calls if c.get("outcome") == "admitted"]
    report.figures.update(
        {
            "calls": len(calls),
            "admissions": len(admitted),
            "leases": len(leases),
            "refusals": dict(
                Counter(str(c.get("reason")) for c in calls if c.get("outcome") == "refused")
            ),
            "renewals": dict(
                Counter(
                    str(c.get("reason", "renewed" if c.get("renewed") else "lost"))
                    for c in calls
                    if c["op"] == "renew" and c.get("outcome") == "ok"
                )
            ),
            "forged_calls": sum(1 for c in calls if c["op"].startswith("forged_")),
            "errors": dict(Counter(c["error"] for c in calls if c.get("outcome") == "error")),
            "faults": dict(Counter(f["fault"] for f in faults)),
            "max_overshoot_units": max_over,
            "tokens_admitted": metered,
            "max_late_s": round(
                max((_lateness(c) for c in calls if "deadline_s" in c), default=0.0), 3
            ),
            "violations": dict(report.kinds()),
        }
    )
    return report


def _check_rates(
    calls: list[dict[str, Any]], policies: list[dict[str, Any]], report: Report
) -> dict[str, int]:
    """No interval admits more tokens than a token bucket lets through (docs/rates.md).

    Over any interval of Redis time ``[a, b]``, the ``tokens`` of the requests a group
    admitted stay within ``burst + rate·(b - a)`` (``over_rate``), and each tenant's within
    ``cburst + ceil·(b - a)`` (``over_tenant_rate``): the most a bucket of that size and
    rate ever lets through, whatever it held at ``a``. A rate meter never refills faster and
    never holds more, a loss restarts it at its debt floor, and the pods never settle above
    their estimates, so no state loss excuses an excess. The largest rate and burst of any
    policy of the run count (the driver keeps the meter the same in all of them). Admission
    times are exact: the library reports expiry = its Redis time + the TTL. Admissions whose
    answer was lost (a killed pod, a timeout) are not counted: an excess found is real.
    Returns the tokens admitted per group.
    """
    limits: dict[str, dict[str, Any]] = {}
    for p in policies:
        for group, spec in p["groups"].items():
            meter = spec.get("meters", {}).get("tokens")
            if meter is None:
                continue
            have = limits.setdefault(group, {"rate": 0, "burst": 0, "tenants": {}})
            have["rate"] = max(have["rate"], int(meter["rate"]))
            have["burst"] = max(have["burst"], int(meter["burst"]))
            for tenant, share in meter["tenants"].items():
                ceil, cburst = have["tenants"].get(tenant, (0, 0))
                have["tenants"][tenant] = (
                    max(ceil, int(share["ceil"])),
                    max(cburst, int(share["cburst"])),
                )
    admitted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_tenant: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for c in calls:
        if c["op"] not in ("try_acquire", "acquire") or c.get("outcome") != "admitted":
            continue
        if "tokens" not in c or c.get("replay") or c.get("synthetic") or "admit_ms" not in c:
            continue
        admitted[c["group"]].append((int(c["admit_ms"]), int(c["tokens"])))
        by_tenant[(c["group"], c["tenant"])].append((int(c["admit_ms"]), int(c["tokens"])))
    for group, spec in sorted(limits.items()):
        excess = _bucket_excess(admitted.get(group, []), spec["rate"], spec["burst"])
        if excess is not None:
            report.violations.append(Violation("over_rate", group, excess[1], excess[2]))
        for tenant, (ceil, cburst) in sorted(spec["tenants"].items()):
            excess = _bucket_excess(by_tenant.get((group, tenant), []), ceil, cburst)
            if excess is not None:
                detail = f"tenant {tenant!r}: {excess[2]}"
                report.violations.append(Violation("over_tenant_rate", group, excess[1], detail))
    return {group: sum(n for _, n in rows) for group, rows in sorted(admitted.items())}


def _bucket_excess(
    admissions: list[tuple[int, int]], rate: int, burst: int
) -> tuple[int, int, str] | None:
    """The interval whose tokens most exceed ``burst + rate·(b - a)`` (rate per second),
    as (a, b, detail), or None when none does.

    In whole numbers (ms and tokens·1000): an interval from the admission ``i`` to the
    admission ``j`` holds ``S_j - S_(i-1)`` tokens, so it exceeds the bound exactly when
    ``(1000·S_j - rate·t_j) - (1000·S_(i-1) - rate·t_i) > 1000·burst``: one pass with the
    least second term so far finds the largest excess over every interval.
    """
    worst: tuple[int, int, int] | None = None  # (excess, a, b)
    before = 0  # tokens admitted before the current admission
    low: tuple[int, int] | None = None  # least 1000·S_(i-1) - rate·t_i so far, and its t_i
    for t, tokens in sorted(admissions):
        start = 1000 * before - rate * t
        if low is None or start < low[0]:
            low = (start, t)
        before += tokens
        excess = (1000 * before - rate * t) - low[0] - 1000 * burst
        if excess > 0 and (worst is None or excess > worst[0]):
            worst = (excess, low[1], t)
    if worst is None:
        return None
    _, a, b = worst
    held = sum(n for t, n in admissions if a <= t <= b)
    detail = (
        f"{held} tokens admitted in [{a}, {b}] ms ({b - a} ms): above {burst} + "
        f"{rate}/s over it ({burst + rate * (b - a) / 1000:g})"
    )
    return a, b, detail


def _lateness(call: Mapping[str, Any]) -> float:
    return float(call["mono_end"] - call["mono_start"] - call["deadline_s"])


def _check_capacity(
    group: str,
    leases: list[Lease],
    bounds: _Bounds,
    windows: list[tuple[int, int, str]],
    opts: CheckOptions,
    report: Report,
) -> int:
    """At each admission instant: valid units of the group and of the tenant within bounds.

    A sweep over admission times: leases enter at ``admit_ms`` and leave at
    ``end_ms``; between admissions the units held can only fall, so the
    admission instants are where any overshoot shows.
    """
    max_over = 0
    starts = sorted(leases, key=lambda x: x.admit_ms)
    active: list[tuple[int, int, Lease]] = []  # heap by end_ms
    total = 0
    per_tenant: Counter[str] = Counter()
    i = 0
    while i < len(starts):
        t = starts[i].admit_ms
        batch = []
        while i < len(starts) and starts[i].admit_ms == t:
            batch.append(starts[i])
            i += 1
        while active and active[0][0] <= t:
            _, _, gone = heapq.heappop(active)
            total -= gone.units
            per_tenant[gone.tenant] -= gone.units
        for x in batch:  # admitted at t: counted at t even if its validity is empty
            heapq.heappush(active, (max(x.end_ms, t + 1), id(x), x))
            total += x.units
            per_tenant[x.tenant] += x.units
        capacity, ceilings = bounds.at(group, t)
        for new in batch:
            ceiling = ceilings.get(new.tenant, capacity)
            for kind, held, bound in (
                ("over_capacity", total, capacity),
                ("over_ceiling", per_tenant[new.tenant], ceiling),
            ):
                over = held - bound
                if over <= 0:
                    continue
                if kind == "over_capacity":
                    max_over = max(max_over, over)
                losses = _losses_at(windows, t)
                valid = sorted(x.id for _, _, x in active)
                detail = (
                    f"{held} units valid at {t} (bound {bound}) when {new.id} of "
                    f"{new.tenant!r} was admitted; valid: {valid}"
                )
                if losses:
                    report.violations.append(Violation("state_loss_overshoot", group, t, detail))
                    if opts.state_loss_bound is not None and over > opts.state_loss_bound * losses:
                        report.violations.append(
                            Violation(kind, group, t, f"beyond the state-loss bound: {detail}")
                        )
                else:
                    report.violations.append(Violation(kind, group, t, detail))
    return max_over


def _check_tokens(
    group: str, leases: list[Lease], windows: list[tuple[int, int, str]], report: Report
) -> None:
    """Tokens strictly increase with the admission time (ties in one ms cannot be ordered)."""
    ordered = sorted(leases, key=lambda x: (x.admit_ms, x.token))
    times = [x.admit_ms for x in ordered]
    best: list[Lease] = []  # best[i]: the lease with the largest token among ordered[: i + 1]
    for x in ordered:
        best.append(x if not best or x.token > best[-1].token else best[-1])
    seen: dict[int, Lease] = {}
    for x in ordered:
        other = seen.get(x.token)
        if other is not None and other.id != x.id:
            _token_violation(group, other, x, windows, report, "repeats the token of")
        seen[x.token] = x
        i = bisect.bisect_left(times, x.admit_ms) - 1
        if i >= 0 and best[i].token >= x.token and best[i].token != x.token:
            _token_violation(group, best[i], x, windows, report, "goes back below")


def _token_violation(
    group: str,
    earlier: Lease,
    later: Lease,
    windows: list[tuple[int, int, str]],
    report: Report,
    what: str,
) -> None:
    lost = _loss_between(windows, earlier.admit_ms, later.admit_ms)
    kind = "token_after_state_loss" if lost else "token_order"
    detail = (
        f"token {later.token} of {later.id} (admitted {later.admit_ms}) {what} token "
        f"{earlier.token} of {earlier.id} (admitted {earlier.admit_ms})"
    )
    report.violations.append(Violation(kind, group, later.admit_ms, detail))


def _check_replays(
    named: Mapping[str, list[Lease]], calls: list[dict[str, Any]], report: Report
) -> None:
    """A replayed acquire returns the original lease: same tenant, units and token."""
    for c in calls:
        if c.get("outcome") != "admitted" or not c.get("replay"):
            continue
        start = _ms(c["wall_start"])
        original = lease_at(named, c["lease_id"], start)
        if original is None:
            continue  # the first attempt's answer was lost: nothing to compare with
        asked = (c["tenant"], int(c["units"]), int(c["token"]))
        if asked != (original.tenant, original.units, original.token):
            detail = (
                f"{c['lease_id']} replayed as tenant {c['tenant']!r}, {c['units']} units, token "
                f"{c['token']}; the lease is {original.tenant!r}'s, {original.units} units, "
                f"token {original.token}"
            )
            report.violations.append(Violation("replay_mismatch", original.group, start, detail))


def _check_releases(
    leases: list[Lease],
    windows: list[tuple[int, int, str]],
    opts: CheckOptions,
    report: Report,
) -> None:
    """Releases and renewals agree with the expiries the library reported."""
    for lease in leases:
        start = lease.release_start_ms
        exact = lease.kind == "try" and lease.uncertain_ms is None
        if exact and lease.released_ack_ms is not None and start is not None:
            expiry = lease.expiry_known_before(start)
            if start > expiry + opts.clock_slack_ms:
                lost = _losses_at(windows, start) > 0
                report.violations.append(
                    Violation(
                        "released_after_state_loss" if lost else "released_after_expiry",
                        lease.group,
                        start,
                        f"{lease.id} reported released at {start}, expired at {expiry}",
                    )
                )
        gone, answered = lease.gone_at_ms, lease.gone_reported_ms
        if gone is not None and answered is not None:
            # Redis decided somewhere between the call's start and its answer.
            expiry = lease.live_until(gone)
            if answered + opts.clock_slack_ms < expiry:
                lost = _losses_at(windows, gone) > 0
                kind = "vanished_after_state_loss" if lost else "lease_vanished"
                detail = f"{lease.id} reported gone at {gone}, but it expires at {expiry}"
                report.violations.append(Violation(kind, lease.group, gone, detail))


def _check_snapshots(
    leases: list[Lease],
    calls: list[dict[str, Any]],
    snapshots: list[dict[str, Any]],
    windows: list[tuple[int, int, str]],
    opts: CheckOptions,
    report: Report,
) -> None:
    """Snapshots reflect acknowledged releases, list every surely-live lease, add up."""
    requested = {c.get("request_id") for c in calls}
    known = {x.id for x in leases}
    killed_or_failed = {c["pod"] for c in calls if c.get("killed")}
    for snap in snapshots:
        group = snap["group"]
        start, end, now = _ms(snap["wall_start"]), _ms(snap["wall_end"]), int(snap["now_ms"])
        listed = {x["id"]: x for x in snap["leases"]}
        lossy = _losses_at(windows, now) > 0
        if snap.get("pinned"):
            if snap["used"] or snap.get("pending", 0) or snap["leases"]:
                detail = (
                    f"after every lease expired: used {snap['used']}, "
                    f"pending {snap.get('pending', 0)}, leases {sorted(listed)[:5]}"
                )
                report.violations.append(Violation("held_at_end", group, now, detail))
            for key in snap.get("keys_without_ttl", []):
                report.violations.append(Violation("key_without_ttl", group, now, key))
            continue
        if not snap.get("truncated") and snap["used"] != sum(
            int(x["units"]) for x in listed.values()
        ):
            kind = "vanished_after_state_loss" if lossy else "accounting"
            held = sum(int(x["units"]) for x in listed.values())
            detail = f"snapshot used {snap['used']} but its leases hold {held}"
            report.violations.append(Violation(kind, group, now, detail))
        for lease in leases:
            if lease.group != group:
                continue
            entry = listed.get(lease.id)
            shown = entry is not None and int(entry["token"]) == lease.token
            if (
                lease.released_ack_ms is not None
                and lease.released_ack_ms + opts.clock_slack_ms < start
            ):
                if shown:
                    acked = lease.released_ack_ms
                    detail = f"{lease.id} released (acknowledged at {acked}) but listed at {now}"
                    report.violations.append(Violation("release_not_reflected", group, now, detail))
                continue
            surely_live = (
                lease.known_at_ms + opts.clock_slack_ms < start
                and (
                    lease.release_start_ms is None
                    or lease.release_start_ms > end + opts.clock_slack_ms
                )
                and lease.live_until(start) > now + opts.clock_slack_ms
            )
            if surely_live and not shown and not snap.get("truncated"):
                kind = "vanished_after_state_loss" if lossy else "lease_vanished"
                detail = f"{lease.id} live until {lease.live_until(start)} missing at {now}"
                report.violations.append(Violation(kind, group, now, detail))
        if snap.get("final"):
            for lease_id in listed:
                if lease_id not in known and lease_id not in requested:
                    pod = lease_id.split(".", 1)[0]
                    if pod not in killed_or_failed:
                        detail = f"{lease_id} listed at the end, but no pod asked for it"
                        report.violations.append(Violation("stray_lease", group, now, detail))


def _check_calls(
    calls: list[dict[str, Any]],
    bounds: _Bounds,
    windows: list[tuple[int, int, str]],
    opts: CheckOptions,
    report: Report,
) -> None:
    """Deadlines, foreign errors, leaving ``acquire`` without raising, known tenants served."""
    for c in calls:
        at = _ms(c["wall_start"])
        group = str(c.get("group", ""))
        if c.get("error") == "UnknownTenant" and bounds.knows(str(c.get("tenant")), at):
            lost = _losses_at(windows, at) > 0
            kind = "unknown_after_state_loss" if lost else "known_tenant_refused"
            detail = f"{c['op']} of {c.get('tenant')!r}: {c.get('message', '')}"
            report.violations.append(Violation(kind, group, at, detail))
        if "deadline_s" in c and _lateness(c) > opts.margin_s:
            detail = (
                f"{c['op']} {c.get('request_id') or c.get('lease_id')} took "
                f"{c['mono_end'] - c['mono_start']:.3f}s for a deadline of {c['deadline_s']}s"
            )
            report.violations.append(Violation("late_call", group, at, detail))
        if str(c.get("error", "")).startswith("foreign:"):
            detail = f"{c['op']} raised {c['error']}: {c.get('message', '')}"
            report.violations.append(Violation("foreign_error", group, at, detail))
        forged = c["op"] in ("forged_release", "forged_renew") and c.get("outcome") == "ok"
        if forged and (c.get("state") == "released" or c.get("renewed")):
            detail = (
                f"{c['op']} of {c.get('lease_id')} as tenant {c.get('tenant')!r}, token "
                f"{c.get('token')} (the lease's: {c.get('true_token')}) was accepted"
            )
            lost = _losses_at(windows, at) > 0
            kind = "forgery_after_state_loss" if lost else "forgery_accepted"
            report.violations.append(Violation(kind, group, at, detail))
        if c["op"] == "exit" and c.get("outcome") == "error" and c["error"] != "unfinished":
            detail = f"leaving acquire {c.get('lease_id')} raised {c['error']}: {c.get('message')}"
            report.violations.append(Violation("exit_raised", group, at, detail))


def complete_calls(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The call records of pod files, plus one for every intent whose call never reported.

    A pod killed during a call leaves only the call's intent: the call may
    have run in Redis (a release that freed the units, a renewal that moved
    the expiry). It becomes an ``unfinished`` error, which the checks treat as
    a call without an answer; it has no end, so no deadline is checked.
    """
    records = list(records)
    calls = [r for r in records if r.get("kind") == "call"]
    done = {c.get("call") for c in calls}
    for r in records:
        if r.get("kind") == "intent" and r.get("call") not in done:
            unfinished = dict(r, kind="call", outcome="error", error="unfinished")
            unfinished["wall_end"] = r["wall_start"]
            calls.append(unfinished)
    return calls


# -- files ----------------------------------------------------------------------------------------


def check_run(run_dir: Path, options: CheckOptions | None = None) -> Report:
    """Check a run directory written by the driver: ``pods/*.jsonl`` and ``driver.jsonl``."""
    records: list[dict[str, Any]] = []
    killed: set[str] = set()
    driver = list(read_jsonl(run_dir / "driver.jsonl"))
    for r in driver:
        if r.get("kind") == "fault" and r.get("fault") == "pod_kill":
            killed.add(str(r["pod"]))
    for path in sorted((run_dir / "pods").glob("*.jsonl")):
        records.extend(read_jsonl(path))
    calls = complete_calls(records)
    for c in calls:
        if c.get("pod") in killed:
            c["killed"] = True
    policies = [r for r in driver if r.get("kind") == "policy"]
    faults = [r for r in driver if r.get("kind") == "fault"]
    snapshots = [r for r in driver if r.get("kind") == "snapshot"]
    report = check(calls, policies, faults, snapshots, options)
    exits = [r for r in driver if r.get("kind") == "pod_exit"]
    for r in exits:
        if r.get("hung"):
            detail = f"pod {r['pod']} still ran 20 s after the stop time; SIGKILLed"
            report.violations.append(Violation("pod_hung", "", _ms(r["wall"]), detail))
        elif r.get("returncode") != 0:
            detail = f"pod {r['pod']} exited with status {r.get('returncode')}"
            report.violations.append(Violation("pod_crashed", "", _ms(r["wall"]), detail))
    report.figures["pods_hung"] = sum(1 for r in exits if r.get("hung"))
    report.figures["fault_errors"] = [
        f"{r['fault']}: {r['error']}" for r in driver if r.get("kind") == "fault_error"
    ]
    report.figures["violations"] = dict(report.kinds())
    report.figures["duration_s"] = round(
        max((r["wall"] for r in driver if "wall" in r), default=0.0)
        - min((r["wall"] for r in driver if "wall" in r), default=0.0),
        1,
    )
    return report
