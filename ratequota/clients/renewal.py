"""Background renewal of held leases: which are due (pure), and the one batched round trip.

Each client has one renewer (a daemon thread for ``QuotaClient``, a task for
``AsyncQuotaClient``) and one ``RenewalBook``. A lease is renewed every
``renew_fraction`` of its TTL while its holder is inside ``acquire`` or a
``limit``-decorated handler; the holder leaving drops it from the book. Due
leases are renewed together: one pipeline per shard (``renew_many``), so a
thousand held leases cost one round trip per shard, not a thousand.

A renewal that finds its lease gone (or fenced: the id now names another
holder's lease) marks it ``lost``; one that reports the tenant above its fair
limit sets ``over_limit``; one that fails (Redis unreachable) is retried soon,
well before the lease could expire. A renewal granted a shorter lifetime than
asked (the group's ``max_lease_ttl`` was lowered under the lease) schedules the
next one by what was granted, so the lease never lapses between renewals. A
renewal meeting a group whose policy Redis lost goes through the client's
renew flow, which restores the policy and re-asserts the lease.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ratequota.clients.backends import translate_error
from ratequota.clients.core import QuotaCore
from ratequota.clients.shell import LeaseBase
from ratequota.decision import RenewResult
from ratequota.engine.ops import Batch
from ratequota.engine.replies import decode_renew
from ratequota.errors import PolicyMissing, RateQuotaError
from ratequota.observe import LostCause

__all__ = ["RenewOutcome", "RenewalBook", "RenewerBase", "ThreadRenewer", "renew_many"]

RenewOutcome = RenewResult | RateQuotaError

#: While Redis does not answer, retry this fraction of the renewal period later.
_RETRY_FRACTION = 0.25
#: Longest the renewer sleeps when nothing is held (it is woken on the next hold).
IDLE_WAIT = 1.0


class RenewalBook:
    """Held leases and when each is due; no I/O, injected clock, safe across threads.

    The book also knows, on its own clock, when each lease has certainly
    expired: the time a renewal was sent plus the lifetime it was granted
    (Redis started that lifetime no earlier than the send). When renewals keep
    failing (Redis unreachable) past that moment, the lease is marked ``lost``
    instead of being believed held.
    """

    def __init__(self, fraction: float, default_ttl: float, clock: Callable[[], float]) -> None:
        self.fraction = fraction
        self.default_ttl = default_ttl
        self._clock = clock
        self._due: dict[LeaseBase, float] = {}
        self._sent: dict[LeaseBase, float] = {}
        self._ends: dict[LeaseBase, float] = {}
        self._lock = threading.Lock()  # guards the dicts; never held across I/O

    def _ttl(self, lease: LeaseBase) -> float:
        return self.default_ttl if lease.ttl is None else lease.ttl

    def _period(self, lease: LeaseBase) -> float:
        return self._ttl(lease) * self.fraction

    def hold(self, lease: LeaseBase) -> None:
        """Start renewing ``lease`` (synthetic leases have nothing to renew)."""
        if lease.synthetic:
            return
        now = self._clock()
        with self._lock:
            self._due[lease] = now + self._period(lease)
            self._ends[lease] = now + self._ttl(lease)

    def drop(self, lease: LeaseBase) -> None:
        """Stop renewing ``lease`` (its holder is done with it)."""
        with self._lock:
            self._forget(lease)

    def _forget(self, lease: LeaseBase) -> None:
        self._due.pop(lease, None)
        self._sent.pop(lease, None)
        self._ends.pop(lease, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

    def wait(self) -> float:
        """How long the background loop may sleep before a lease falls due (capped)."""
        now = self._clock()
        with self._lock:
            upcoming = min(self._due.values(), default=math.inf)
        return max(0.0, min(upcoming - now, IDLE_WAIT))

    def next(self) -> tuple[list[LeaseBase], float]:
        """Leases due now (marked in flight), and how long to sleep if there are none."""
        now = self._clock()
        with self._lock:
            due = [lease for lease, at in self._due.items() if at <= now]
            for lease in due:
                self._due[lease] = math.inf  # in flight until settled
                self._sent[lease] = now
            upcoming = min(self._due.values(), default=math.inf)
        wait = IDLE_WAIT if due or upcoming == math.inf else upcoming - now
        return due, max(0.0, min(wait, IDLE_WAIT))

    def settle(self, lease: LeaseBase, outcome: RenewOutcome) -> None:
        """Apply a renewal's outcome to a lease still held, and schedule the next one.

        The lease's observer hears the renewal's result (and a loss) after the
        book's lock is released.
        """
        with self._lock:
            settled, lost = self._apply(lease, outcome)
        observer = lease.observer
        if not settled or observer is None:
            return
        observer.renewal(
            lease.info, "error" if isinstance(outcome, RateQuotaError) else outcome.reason
        )
        if lost is not None:
            observer.lease_lost(lease.info, lost)

    def _apply(self, lease: LeaseBase, outcome: RenewOutcome) -> tuple[bool, LostCause | None]:
        """``settle`` under the lock: was the lease still held, and how it was lost if it now is."""
        now = self._clock()
        if lease not in self._due:
            # Released meanwhile: a "lost" answer would be about a lease we gave back.
            return False, None
        if isinstance(outcome, RateQuotaError):
            if now >= self._ends.get(lease, math.inf):
                # No renewal got through before the lease's lifetime ran out.
                newly = not lease.lost
                lease.lost = True
                self._forget(lease)
                return True, "unrenewed" if newly else None
            retry = now + self._period(lease) * _RETRY_FRACTION
            self._due[lease] = min(retry, self._ends.get(lease, math.inf))
            return True, None
        cause = lease.record_renewal(outcome)
        if lease.lost:
            self._forget(lease)
            return True, cause
        period = self._period(lease)
        granted = outcome.ttl if outcome.ttl > 0 else self._ttl(lease)
        # Clamped to a lowered max_lease_ttl: renew within what was granted.
        period = min(period, granted * self.fraction)
        self._ends[lease] = self._sent.get(lease, now) + granted
        self._due[lease] = now + period
        return True, None


def renew_many(
    core: QuotaCore, leases: Sequence[LeaseBase], node_of: Callable[[str], object]
) -> Generator[Any, Any, list[RenewOutcome]]:
    """A flow renewing ``leases``: one ``Batch`` per shard; an outcome per lease, in order."""
    by_node: dict[object, list[int]] = {}
    for i, lease in enumerate(leases):
        by_node.setdefault(node_of(lease.group), []).append(i)
    outcomes: list[RenewOutcome | None] = [None] * len(leases)
    for indices in by_node.values():
        calls = tuple(core.renew_call(leases[i].info, leases[i].ttl) for i in indices)
        try:
            replies = yield Batch(leases[indices[0]].group, calls)
        except RateQuotaError as exc:
            for i in indices:
                outcomes[i] = exc
            continue
        for i, reply in zip(indices, replies, strict=True):
            outcome = _outcome(reply, leases[i].group)
            if isinstance(outcome, PolicyMissing):
                # Redis lost the policy: the single renew flow restores it and re-asserts.
                try:
                    outcome = yield from core.renew(leases[i].info, leases[i].ttl)
                except RateQuotaError as exc:
                    outcome = exc
            elif isinstance(outcome, RenewResult):
                core.count_fenced(outcome.reason == "fenced")
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _outcome(reply: Any, group: str) -> RenewOutcome:
    if isinstance(reply, BaseException):
        return translate_error(reply, "redis")
    try:
        return decode_renew(reply, group=group)
    except RateQuotaError as exc:
        return exc


class RenewerBase:
    """What both renewers share: the book on the client's clock, and settling a round.

    Due times are on the client's ``Clock``, so a test on a ``ManualClock``
    decides when leases fall due (``advance``) and, with ``renew_in_background``
    off, when they are renewed (``renew_due``): no sleeping, no race with a
    background thread. The two subclasses differ only in how a round trip is
    performed (blocking or awaited) and in what runs the background loop.
    """

    def __init__(self, client: Any) -> None:
        core: QuotaCore = client.core
        self._client = client
        self.book = RenewalBook(
            core.settings.renew_fraction, core.settings.lease_ttl, core.clock.monotonic
        )
        self.enabled = core.settings.auto_renew
        self.background = core.settings.renew_in_background

    def drop(self, lease: LeaseBase) -> None:
        """Stop renewing ``lease``."""
        self.book.drop(lease)

    def hold(self, lease: LeaseBase) -> None:
        """Renew ``lease`` until ``drop``; the background loop starts on the first hold."""
        if not self.enabled or self._stopped():
            return
        self.book.hold(lease)
        if self.background:
            self._wake_loop()

    def _stopped(self) -> bool:
        """True once the renewer was closed for good (it then holds nothing new)."""
        return False

    def _wake_loop(self) -> None:
        """Start the background loop if it is not running, and wake it (a thread or a task)."""
        raise NotImplementedError

    def _due(self) -> list[LeaseBase]:
        """The held leases due now, marked in flight (the start of ``renew_due``)."""
        return self.book.next()[0]

    def _flow(self, due: list[LeaseBase]) -> Generator[Any, Any, list[RenewOutcome]]:
        return renew_many(self._client.core, due, self._client._node_of)

    def _settle(self, due: list[LeaseBase], outcomes: Sequence[RenewOutcome]) -> None:
        for lease, outcome in zip(due, outcomes, strict=True):
            self.book.settle(lease, outcome)

    @staticmethod
    def _failed(due: list[LeaseBase], exc: BaseException) -> list[RenewOutcome]:
        """A bug in a round must not kill the renewer: these leases are retried soon."""
        return [RateQuotaError(f"renewal failed: {exc!r}")] * len(due)


class ThreadRenewer(RenewerBase):
    """The sync client's renewer: one daemon thread, started on the first held lease.

    The thread sleeps on an event until the next lease is due (at most
    ``IDLE_WAIT``), renews every due lease with one pipeline per shard, and
    settles the outcomes; ``close`` stops it. It takes no lock across I/O.
    """

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # only guards starting the thread

    def _stopped(self) -> bool:
        return self._stop.is_set()

    def _wake_loop(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="ratequota-renewer", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def renew_due(self) -> int:
        """Renew, in the calling thread, every held lease due now; returns how many."""
        due = self._due()
        if due:
            try:
                outcomes = self._client._run(self._flow(due))
            except Exception as exc:  # see _failed
                outcomes = self._failed(due, exc)
            self._settle(due, outcomes)
        return len(due)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (waiting at most ``timeout`` for a renewal in flight)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self.renew_due():
                self._wake.wait(self.book.wait())
