"""What a simulated pod does with token meters, and the records it leaves for the report.

A pod acquires a metered batch with its estimates (``tokens=estimate``, and
``requests=1`` when the group meters requests), and settles it, when the
batch ends, at what it really used; each admitted batch leaves a ``Batch``.
``DecisionTap`` notes every refused try of a waiting acquire as a
``MeterRefusal``: the blocking ``acquire`` retries until its deadline and
reports only its last decision, but the report counts refusals by meter over
every try. ``ratequota.sim.tokens`` computes the statistics; the same rows
tell the unit measure (``ratequota.sim.measure``) when a meter, not the
concurrency rule, held a request back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs

from ratequota.clients.sync import Lease
from ratequota.decision import Decision
from ratequota.errors import RateQuotaError
from ratequota.sim.measure import Request
from ratequota.sim.scenario import Scenario, TenantLoad

__all__ = [
    "Batch",
    "DecisionTap",
    "MeterRefusal",
    "estimates",
    "refused_tries",
    "request_record",
    "settle_batch",
]


@attrs.frozen
class Batch:
    """One admitted metered batch: held from ``start`` to ``end``, its estimate and actual.

    ``outcome`` is the settlement's (``settled``, or why nothing was charged:
    the lease then keeps its estimate); ``delta`` the tokens charged
    (actual − estimate), ``clipped`` what the debt bound forgave (> 0) or a
    full bucket could not take back (< 0).
    """

    tenant: str
    group: str
    start: float
    end: float
    estimate: int
    actual: int
    outcome: str = "settled"
    delta: int = 0
    clipped: float = 0.0

    @property
    def settled(self) -> bool:
        """True when the actual amount was charged (else the estimate stands)."""
        return self.outcome == "settled"

    @property
    def charged(self) -> float:
        """Tokens the meters let through for this batch: what it used, less what the debt
        bound forgave. A refund a full bucket could not take back is not counted back, so
        over a run this is at most the ceiling bucket's net charge (the bounds hold on it)."""
        return self.used - max(0.0, self.clipped)

    @property
    def used(self) -> int:
        """Tokens the batch counts as having used: the actual once settled, else the estimate."""
        return self.actual if self.settled else self.estimate


@attrs.frozen
class MeterRefusal:
    """One refused try of a waiting acquire: the meter that refused (``lease`` when the
    concurrency rule did) and why."""

    tenant: str
    at: float
    meter: str
    reason: str


class DecisionTap:
    """Wraps a client's ``attempt`` so each refused try of a watched thread is noted.

    The blocking ``acquire`` retries a refused try until its deadline and
    reports only the last decision; the report's refusals by meter count
    every try. Like ``PodClock.watch``, each worker thread points the tap at
    its own list (no lock needed).
    """

    def __init__(self, attempt: Callable[..., Any], now: Callable[[], float]) -> None:
        self._attempt = attempt
        self._now = now
        self._local = threading.local()

    def watch(self, tenant: str, into: list[MeterRefusal] | None) -> None:
        """Append the calling thread's refused tries to ``into`` (None: stop)."""
        self._local.into = into
        self._local.tenant = tenant

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        decision = yield from self._attempt(*args, **kwargs)
        into = getattr(self._local, "into", None)
        if into is not None and isinstance(decision, Decision) and not decision.admitted:
            at = self._now()
            tenant = self._local.tenant
            refusing = [m for m in decision.meters if not m.admitted]
            if decision.reason == "meter" and refusing:
                into += [MeterRefusal(tenant, at, m.name, m.reason) for m in refusing]
            else:
                into.append(MeterRefusal(tenant, at, "lease", decision.reason))
        return decision


def refused_tries(refused: list[MeterRefusal]) -> tuple[tuple[float, str], ...]:
    """Each refused try once, as ``(when, why)``: ``"meter"`` when rate meters refused it
    (the tap notes one row per refusing meter), else the concurrency rule's reason."""
    tries: list[tuple[float, str]] = []
    for row in refused:
        if tries and tries[-1][0] == row.at:
            continue
        tries.append((row.at, "meter" if row.meter != "lease" else row.reason))
    return tuple(tries)


def request_record(
    load: TenantLoad,
    asked: float,
    end: float,
    got: float | None,
    pauses: list[float],
    refused: list[MeterRefusal],
) -> Request:
    """One request as the measure needs it: its times, the pauses after refused tries
    (``PodClock``) and why each try was refused (``DecisionTap``)."""
    return Request(
        load.tenant,
        load.group,
        load.traffic.units,
        asked,
        end,
        got,
        tuple(pauses),
        refused_tries(refused),
    )


def estimates(scenario: Scenario, load: TenantLoad) -> dict[str, int]:
    """The meter amounts a batch of ``load`` asks for: its token estimate, and one request
    when the group meters requests (empty: the batch names no meter)."""
    group = scenario.policy.group(load.group)
    amounts = {}
    if load.traffic.tokens:
        amounts["tokens"] = load.traffic.tokens
    if group is not None and group.meter("requests") is not None:
        amounts["requests"] = 1
    return amounts


def settle_batch(
    lease: Lease, load: TenantLoad, got: float, actual: int, now: Callable[[], float]
) -> tuple[Batch, str | None]:
    """Settle a batch at the tokens it really used: its record, and an error if any.

    A settlement that fails (Redis unreachable) leaves the lease its
    estimate, as a crashed pod's would; the record says ``closed``.
    """
    outcome, delta, clipped, error = "closed", 0, 0.0, None
    try:
        for row in lease.settle(tokens=actual):
            outcome, delta, clipped = row.outcome, row.delta, row.clipped
    except RateQuotaError as exc:
        error = f"{load.tenant}: settle: {exc}"
    batch = Batch(
        load.tenant, load.group, got, now(), load.traffic.tokens, actual, outcome, delta, clipped
    )
    return batch, error
