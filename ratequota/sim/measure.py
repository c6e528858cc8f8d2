"""Entitlement from the demand the clients really had, and every gap split into its causes.

The simulation's workers record each request they made (``Request``): when
it was asked for, when Redis had it registered as waiting demand (from the
first refused try until admission or withdrawal, unless a registration
expired between two tries), when it was admitted and when it ended. From
these this module rebuilds, for every instant of the run and every tenant:

* ``m`` — units held back by a rate meter: waiting requests whose last
  refused try was refused by a meter (``reason == "meter"``), from that
  refusal until the next try's answer;
* ``d`` — outstanding unit demand as the clients knew it: units waiting +
  running, less ``m``;
* ``h`` — units held;
* ``s`` — the demand Redis saw: units held + units registered as waiting;

and, with the reference rule (``ratequota.fairness``):

* ``L = limit(d)`` — the fair limit for the true demand, ``e = min(d, L)``
  the entitlement; its integral is what a tenant was owed;
* ``Ls = limit(s)`` — the limit Redis could compute, ``es = min(d, Ls)``.

A meter refuses only a lease the concurrency rule would have admitted, and
neither registers nor refreshes it as waiting demand (``lua/_lib.lua``):
demand a meter holds back is not demand the fair-share rule could serve, so
it is owed nothing. Its integral is reported beside the gap as its own cause
(``meter``), and ``asked = meter + ∫ d`` adds up the same way.

A tenant's gap ``∫ (e − h)`` is split, instant by instant, into four parts
that add up to it exactly (a telescoping sum, so nothing is lost or counted
twice):

* **unseen** ``e − es``: demand Redis did not see (a request between being
  asked for and its first refusal, a registration that expired) moved the
  limit;
* then, with ``r = es − h``:

  - ``r < 0`` — the tenant holds above its limit: leases granted while its
    limit was higher have not ended yet. **Reclaim lag**, negative (a
    surplus), bounded by the hold times because leases are never preempted;
  - ``r ≥ 0`` — a deficit. Let ``u`` be its batch size, ``a = u·⌊r/u⌋`` the
    whole batches its limit still allows and ``free`` the group's free
    units. ``r − a`` is **granularity** (less than a batch of room left in
    its limit); of ``a``, the part the group has no free units for is
    **reclaim lag** (others hold above their limits: borrowed leases that
    must end first), the part of the free units too small for one batch is
    **granularity** again, and whole batches that fit both its limit and
    the free units, yet were not admitted, are **unexplained** (a waiting
    request asleep between two tries, a slow round trip).

Reclaim episodes — stretches of time where a tenant's reclaim lag is not
zero — are bounded by the longest batch of the group: the report gives the
longest episode beside that bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ratequota.fairness import EPSILON, group_allocation
from ratequota.policy import GroupPolicy

__all__ = [
    "Gap",
    "Request",
    "demand_steps",
    "measure_group",
    "meter_spans",
    "registration_spans",
]


@attrs.frozen
class Request:
    """One request of one worker, as the client saw it (seconds since the run started).

    ``refusals``: when each refused try that registered the request as
    waiting demand returned. ``got``: when it was admitted (None: it gave
    up). ``end``: when it was released, or when the worker gave up.
    ``tries``: every refused try as ``(when it returned, why)``, ``why``
    being ``"meter"`` when a rate meter refused it (else the concurrency
    rule's reason); empty when not recorded (no demand counts as meter-held).
    """

    tenant: str
    group: str
    units: int
    asked: float
    end: float
    got: float | None = None
    refusals: tuple[float, ...] = ()
    tries: tuple[tuple[float, str], ...] = ()


def registration_spans(request: Request, pending_ttl: float) -> list[tuple[float, float]]:
    """When Redis held ``request`` as waiting demand: ``[(from, to), ...]``.

    A refused waiting try registers (or refreshes) the request for
    ``pending_ttl``; admission, or the withdrawal when the worker gives up,
    drops it. A gap between tries longer than ``pending_ttl`` lets it expire.
    A try a rate meter refused neither registers nor refreshes it: the pauses
    that follow one (by ``tries``) do not count.
    """
    refusals = [at for at in request.refusals if _last_try(request, at) != "meter"]
    if not refusals:
        return []
    stop = request.got if request.got is not None else request.end
    spans: list[tuple[float, float]] = []
    start = refusals[0]
    last = start
    for at in refusals[1:]:
        if at - last > pending_ttl:
            spans.append((start, last + pending_ttl))
            start = at
        last = at
    spans.append((start, min(stop, last + pending_ttl)))
    return [(a, b) for a, b in spans if b > a]


def _last_try(request: Request, at: float) -> str | None:
    """Why the last refused try answered at or before ``at`` was refused (None: none yet)."""
    why = None
    for when, reason in request.tries:
        if when > at:
            break
        why = reason
    return why


def meter_spans(request: Request) -> list[tuple[float, float]]:
    """When a rate meter held ``request`` back: ``[(from, to), ...]``.

    From each try a meter refused until the next try's answer (whatever it
    is), admission, or giving up; consecutive meter refusals make one span.
    """
    stop = request.got if request.got is not None else request.end
    spans: list[tuple[float, float]] = []
    for i, (at, why) in enumerate(request.tries):
        if why != "meter" or at >= stop:
            continue
        until = min(stop, request.tries[i + 1][0]) if i + 1 < len(request.tries) else stop
        if spans and spans[-1][1] >= at:
            spans[-1] = (spans[-1][0], max(spans[-1][1], until))
        else:
            spans.append((at, until))
    return [(a, b) for a, b in spans if b > a]


@attrs.frozen
class Gap:
    """One tenant over a run: what it held, what it was owed, and why the two differ.

    All in unit-seconds; ``entitled − got = unseen + reclaim + granularity +
    unexplained`` exactly. ``longest_reclaim`` is the longest stretch during
    which reclaim lag was not zero, ``reclaim_bound`` the bound it must stay
    within (the group's longest batch). ``meter``: demand rate meters held
    back, owed nothing; ``asked``: all outstanding demand, ``asked = meter +
    unit demand`` (the unit demand being what ``entitled`` was computed from).
    """

    tenant: str
    got: float
    entitled: float
    unseen: float
    reclaim: float
    granularity: float
    unexplained: float
    longest_reclaim: float
    reclaim_bound: float
    times: tuple[float, ...] = ()
    held: tuple[float, ...] = ()
    owed: tuple[float, ...] = ()
    meter: float = 0.0
    asked: float = 0.0

    @property
    def share(self) -> float:
        """Got / entitlement (NaN when nothing was owed)."""
        return self.got / self.entitled if self.entitled > 0 else math.nan

    @property
    def gap(self) -> float:
        """Entitlement minus units held, in unit-seconds (negative: got more)."""
        return self.entitled - self.got

    @property
    def meter_share(self) -> float:
        """Meter-held demand / all demand asked (NaN when nothing was asked)."""
        return self.meter / self.asked if self.asked > 0 else math.nan

    def parts(self) -> dict[str, float]:
        """The four causes by name, in unit-seconds."""
        return {
            "unseen": self.unseen,
            "reclaim": self.reclaim,
            "granularity": self.granularity,
            "unexplained": self.unexplained,
        }


_Step = tuple[float, dict[str, int], dict[str, int], dict[str, int], dict[str, int]]


def demand_steps(requests: Iterable[Request], pending_ttl: float) -> list[_Step]:
    """``(time, d, h, s, m)`` per tenant after every change, in time order (see the
    module docstring: ``d`` is unit demand, meter-held ``m`` already taken out)."""
    events: list[tuple[float, str, str, int]] = []
    for r in requests:
        events.append((r.asked, "d", r.tenant, r.units))
        events.append((r.end, "d", r.tenant, -r.units))
        if r.got is not None:
            events.append((r.got, "h", r.tenant, r.units))
            events.append((r.end, "h", r.tenant, -r.units))
        for start, stop in registration_spans(r, pending_ttl):
            events.append((start, "p", r.tenant, r.units))
            events.append((stop, "p", r.tenant, -r.units))
        for start, stop in meter_spans(r):
            events.append((start, "m", r.tenant, r.units))
            events.append((stop, "m", r.tenant, -r.units))
            events.append((start, "d", r.tenant, -r.units))
            events.append((stop, "d", r.tenant, r.units))
    events.sort(key=lambda e: e[0])
    level: dict[str, dict[str, int]] = {"d": {}, "h": {}, "p": {}, "m": {}}
    out: list[_Step] = []
    for i, (at, kind, tenant, delta) in enumerate(events):
        level[kind][tenant] = level[kind].get(tenant, 0) + delta
        if i + 1 < len(events) and events[i + 1][0] == at:
            continue
        held = dict(level["h"])
        seen = {t: held.get(t, 0) + level["p"].get(t, 0) for t in set(held) | set(level["p"])}
        out.append((at, dict(level["d"]), held, seen, dict(level["m"])))
    return out


def measure_group(
    group: GroupPolicy,
    requests: Sequence[Request],
    units: Mapping[str, int],
    holds: Mapping[str, float],
    *,
    until: float,
    pending_ttl: float,
    bin_width: float = 0.0,
) -> dict[str, Gap]:
    """Entitlement and the split of its gap for every tenant of ``units`` (its batch size).

    ``holds``: the longest batch of each tenant, in seconds (the reclaim
    bound is the largest of them). With ``bin_width > 0`` every ``Gap``
    also carries held and owed units averaged over bins, for the picture.
    """
    names = list(units)
    acc = {
        n: dict.fromkeys(
            ("got", "owed", "unseen", "reclaim", "gran", "unexpl", "meter", "asked"), 0.0
        )
        for n in names
    }
    episode_start: dict[str, float | None] = dict.fromkeys(names)
    longest = dict.fromkeys(names, 0.0)
    count = max(1, math.ceil(until / bin_width)) if bin_width > 0 else 0
    held_bins = {n: [0.0] * count for n in names}
    owed_bins = {n: [0.0] * count for n in names}
    cache: dict[tuple[tuple[str, int], ...], dict[str, float]] = {}

    def limits(demand: Mapping[str, int], asking: Sequence[str]) -> dict[str, float]:
        key = tuple(sorted((t, v) for t, v in demand.items() if v > 0)) + tuple(
            (t, -1) for t in sorted(asking)
        )
        if key not in cache:
            allocation = group_allocation(group, {t: float(v) for t, v in demand.items()}, asking)
            cache[key] = {t: allocation.limit(t) for t in asking if t in allocation.shares}
        return cache[key]

    steps = demand_steps(requests, pending_ttl)
    for k, (at, d, h, s, m) in enumerate(steps):
        t0 = max(0.0, at)
        t1 = min(until, steps[k + 1][0]) if k + 1 < len(steps) else until
        dt = t1 - t0
        if dt <= 0:
            continue
        asking = [n for n in names if d.get(n, 0) > 0]
        true_limit = limits(d, asking)
        seen_limit = limits(s, asking)
        free = group.capacity - sum(h.values())
        for n in names:
            a = acc[n]
            dn, hn, u = d.get(n, 0), h.get(n, 0), units[n]
            e = min(dn, true_limit.get(n, 0.0)) if dn > 0 else 0.0
            es = min(dn, seen_limit.get(n, 0.0)) if dn > 0 else 0.0
            a["got"] += hn * dt
            a["owed"] += e * dt
            a["meter"] += m.get(n, 0) * dt
            a["asked"] += (dn + m.get(n, 0)) * dt
            a["unseen"] += (e - es) * dt
            r = es - hn
            lag = 0.0
            if r < 0:
                lag = r
            else:
                whole = u * math.floor((r + EPSILON) / u)
                roomy = min(whole, max(0.0, float(free)))
                fits = min(whole, u * math.floor(max(0, free) / u))
                lag = whole - roomy
                a["gran"] += (r - whole + roomy - fits) * dt
                a["unexpl"] += fits * dt
            a["reclaim"] += lag * dt
            if abs(lag) > EPSILON:
                if episode_start[n] is None:
                    episode_start[n] = t0
                longest[n] = max(longest[n], t1 - (episode_start[n] or t0))
            else:
                episode_start[n] = None
            if count:
                _spread(held_bins[n], t0, t1, hn, bin_width)
                _spread(owed_bins[n], t0, t1, e, bin_width)
    bound = max(holds.values(), default=0.0)
    centres = tuple(min(until, (i + 0.5) * bin_width) for i in range(count))
    return {
        n: Gap(
            tenant=n,
            got=acc[n]["got"],
            entitled=acc[n]["owed"],
            unseen=acc[n]["unseen"],
            reclaim=acc[n]["reclaim"],
            granularity=acc[n]["gran"],
            unexplained=acc[n]["unexpl"],
            longest_reclaim=longest[n],
            reclaim_bound=bound,
            times=centres,
            held=tuple(v / bin_width for v in held_bins[n]) if count else (),
            owed=tuple(v / bin_width for v in owed_bins[n]) if count else (),
            meter=acc[n]["meter"],
            asked=acc[n]["asked"],
        )
        for n in names
    }


def _spread(bins: list[float], t0: float, t1: float, level: float, width: float) -> None:
    """Add ``level × overlap`` of ``[t0, t1)`` to every bin of ``width`` it touches."""
    if level == 0:
        return
    first = int(t0 // width)
    last = min(len(bins) - 1, int(t1 // width))
    for i in range(first, last + 1):
        lo, hi = max(t0, i * width), min(t1, (i + 1) * width)
        if hi > lo:
            bins[i] += level * (hi - lo)
