"""Several rate meters decided with a lease, all or nothing, and settled once: the reference.

``ratequota.rates`` is the rule for one meter; this module is what the
scripts do with it (``lua/_metered.lua``), in memory and in plain Python, so
that tests/test_rates_engine.py can hold the scripts to it step by step and
the properties of docs/rates.md can be checked on it:

* a request names amounts on some meters; each is decided with
  ``rates.decide`` on the state before the request. If every meter admits,
  all commit; if one refuses, only the refusing meters' contention marks are
  written (a refused borrower still counts as contending), and nothing is
  charged. In shadow mode a refusing meter is charged as a borrow would be
  (ceiling and group buckets, down to the debt bound) and the request admitted.
* an admitted lease keeps one ``settlement.Reservation`` per meter it named;
  ``settle`` charges ``actual - estimate`` once per reservation, whatever the
  order of settlements, retries and the lease's end; a lease that ended
  (released, expired, purged) keeps its estimate.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ratequota.policy import GroupPolicy, TenantPolicy
from ratequota.rates import CONTEND_MS, MeterDecision, decide, share_limits
from ratequota.settlement import MeterBook, Reservation, Settlement, settle, settle_reservation

__all__ = ["MeteredGroup", "SettleRow"]


@attrs.frozen
class SettleRow:
    """One meter of one settlement: the outcome, the delta charged, the ticks clipped."""

    name: str
    outcome: str
    delta: int = 0
    clipped: tuple[int, int, int] = (0, 0, 0)


@attrs.define
class _Lease:
    tenant: str
    token: int
    expiry: int
    records: dict[str, Reservation]


@attrs.define
class MeteredGroup:
    """One group's meters (a ``MeterBook`` each) and its leases' reservations."""

    policy: GroupPolicy
    books: dict[str, MeterBook]
    leases: dict[str, _Lease] = attrs.Factory(dict)

    @classmethod
    def for_policy(cls, policy: GroupPolicy) -> MeteredGroup:
        """Fresh meters for ``policy`` (strangers get the default tenant's share on demand)."""
        books = {m.name: MeterBook.for_policy(policy, m.name) for m in policy.meters}
        return cls(policy, books)

    def _share_of(self, book: MeterBook, meter: str, tenant: str) -> None:
        if tenant not in book.shares:
            who: TenantPolicy = self.policy.tenant(tenant) or self.policy.default_tenant
            book.shares = {**book.shares, tenant: share_limits(self.policy, who, meter)}

    def decide(
        self, tenant: str, amounts: Mapping[str, int], now: int, *, shadow: bool = False
    ) -> tuple[bool, dict[str, MeterDecision]]:
        """Decide and commit one request's meters; (all admitted, each meter's decision).

        Call it only for a request whose lease the concurrency rule admits (the
        scripts decide meters after the lease).
        """
        decisions: dict[str, MeterDecision] = {}
        for name, amount in amounts.items():
            book = self.books[name]
            self._share_of(book, name, tenant)
            decisions[name] = decide(
                book.meter,
                book.shares[tenant],
                book.group,
                book.tenants.get(tenant),
                amount,
                now,
                book.floor(now),
                book.contends(tenant, now),
            )
        ok = all(d.admitted for d in decisions.values())
        for name, d in decisions.items():
            book = self.books[name]
            if d.admitted and (ok or shadow):
                book.group, book.tenants[tenant] = d.group, d.tenant
            elif shadow:
                amount = amounts[name]
                done = settle(
                    book.meter, book.shares[tenant], d.group, d.tenant, "borrow", amount, now
                )
                book.group, book.tenants[tenant] = done.group, done.tenant
            elif not d.admitted and d.contending:
                # A refused borrower still contends, from where it starts; a meter that would
                # have admitted writes nothing when another refused.
                book.tenants[tenant] = d.tenant
            else:
                continue
            if d.contending:
                book.contending[tenant] = now + CONTEND_MS
        return ok, decisions

    def admit(
        self,
        lease_id: str,
        tenant: str,
        token: int,
        expiry: int,
        amounts: Mapping[str, int],
        decisions: Mapping[str, MeterDecision],
    ) -> None:
        """Record the reservations of a lease admitted with ``decisions``."""
        records = {}
        for name, amount in amounts.items():
            d = decisions[name]
            path = d.path if d.admitted and d.path is not None else "rate"
            if not d.admitted:
                path = "borrow"  # shadow mode charged it as a borrow
            records[name] = Reservation(lease_id, token, tenant, amount, path)
        self.leases[lease_id] = _Lease(tenant, token, expiry, records)

    def end(self, lease_id: str) -> None:
        """The lease was released or purged: its reservations keep what they have."""
        self.leases.pop(lease_id, None)

    def settle(
        self, lease_id: str, tenant: str, token: int, actuals: Mapping[str, int], now: int
    ) -> list[SettleRow]:
        """settle.lua's rows: charge each named meter its delta once, or say why not."""
        lease = self.leases.get(lease_id)
        state = "open"
        if lease is None:
            state = "closed"
        elif lease.tenant != tenant or lease.token != token:
            state = "mismatch"
        elif lease.expiry <= now:
            state = "closed"
        rows = []
        for name, actual in actuals.items():
            if state != "open":
                rows.append(SettleRow(name, state))
                continue
            assert lease is not None
            record = lease.records.get(name)
            if record is None:
                rows.append(SettleRow(name, "unreserved"))
                continue
            new, delta, outcome = settle_reservation(record, lease_id, token, actual)
            lease.records[name] = new
            if delta is None:
                rows.append(SettleRow(name, outcome))
                continue
            book = self.books[name]
            done: Settlement = book.settle(tenant, record.path, delta, now)
            rows.append(SettleRow(name, outcome, delta, done.clipped))
        return rows
