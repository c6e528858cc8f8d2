"""How the rule behaves over time: a lender reclaims its guarantee; contention ends in fair shares.

(a) Reclaim (invariant 13), stepped deterministically with a ``ManualClock``
on every backend: while a lender waits within its guarantee, the borrower
gets nothing new and the lender is admitted exactly when enough borrowed
units have been released.

(b) Contention on a real Redis: tenants with weights 1, 2 and 3 over-demand
one group from several threads; held units sampled from snapshots average to
the weighted fair shares (within 5%), and Jain's fairness index is reported.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from ratequota.clients.sync import QuotaClient
from ratequota.decision import Decision, LeaseInfo
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.conftest import MakeClient
from tests.servers import RedisServer


def attempt(client: QuotaClient, tenant: str, units: int, rid: str, *, wait: bool) -> Decision:
    """One acquire round trip in group ``g`` (``wait`` registers/refreshes pending demand)."""
    flow = client.core.attempt(tenant, units, "g", rid, 60_000, wait=wait)
    return client._run(flow)


def test_reclaim_lender_waits_only_for_released_borrowed_units(make_client: MakeClient) -> None:
    """Invariant 13: the borrower saturates the group; the lender asks within its guarantee.

    From then on the borrower is refused (it is above its new limit), and the
    lender's waiting request is admitted at the release that frees enough units.
    """
    policy = GroupPolicy(
        "g",
        capacity=10,
        tenants=(
            TenantPolicy("lender", guarantee=6),
            TenantPolicy("borrower", guarantee=2, weight=5.0),
        ),
    )
    clock = ManualClock()
    client = make_client(Policy([policy]), clock=clock, pending_ttl=5.0)
    borrowed: list[LeaseInfo] = []
    for i in range(10):
        decision = attempt(client, "borrower", 1, f"b{i}", wait=False)
        assert decision.lease is not None, decision.describe()
        borrowed.append(decision.lease)
    assert client.snapshot("g").used == 10

    asked = 4  # within the lender's guarantee of 6
    first = attempt(client, "lender", asked, "lend", wait=True)
    assert first.reason == "group_full"
    snap = client.snapshot("g", ["lender", "borrower"])
    assert snap.tenants["lender"].pending == asked
    assert snap.tenants["borrower"].limit == pytest.approx(10 - asked)

    for released in range(1, asked + 1):
        client.release(borrowed.pop())
        clock.advance(0.1)  # well within the pending TTL: the registration stays
        greedy = attempt(client, "borrower", 1, f"greedy{released}", wait=False)
        assert not greedy.admitted, f"borrower admitted after {released} releases"
        lender = attempt(client, "lender", asked, "lend", wait=True)
        assert lender.admitted == (released == asked), (released, lender.describe())
    assert client.snapshot("g").tenants["lender"].used == asked
    for lease in borrowed:
        client.release(lease)


def jain(values: list[float]) -> float:
    """Jain's fairness index of ``values`` (1.0 when all are equal)."""
    total = sum(values)
    return total * total / (len(values) * sum(v * v for v in values))


WEIGHTS = {"w1": 1.0, "w2": 2.0, "w3": 3.0}
CAPACITY = 24
THREADS_PER_TENANT = 2


def contender(client: QuotaClient, tenant: str, seed: int, stop: threading.Event) -> None:
    """Keep demand above any fair share: one waiting request always registered, leases held
    for 150-300 ms and refilled at once; bounded by ``stop`` and a hard deadline.
    """
    rnd = random.Random(seed)
    held: list[tuple[float, LeaseInfo]] = []
    serial = 0
    rid = f"{tenant}-{seed}-{serial}"
    deadline = time.monotonic() + 30
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        while held and held[0][0] <= now:
            client.release(held.pop(0)[1])
        decision = attempt(client, tenant, 1, rid, wait=True)
        if decision.lease is not None:
            held.append((now + rnd.uniform(0.15, 0.3), decision.lease))
            held.sort(key=lambda pair: pair[0])
            serial += 1
            rid = f"{tenant}-{seed}-{serial}"
            continue
        time.sleep(0.002)
    for _, lease in held:
        client.release(lease)
    client.release(LeaseInfo(rid, tenant, "g", 1, 0, 0.0))  # withdraw the waiting request


@pytest.mark.real_redis
def test_contention_converges_to_weighted_fair_shares(
    real_redis: RedisServer, request: pytest.FixtureRequest
) -> None:
    """Weights 1:2:3 over-demanding 24 units hold 4, 8 and 12 on average (±5%)."""
    policy = GroupPolicy(
        "g", capacity=CAPACITY, tenants=tuple(TenantPolicy(n, weight=w) for n, w in WEIGHTS.items())
    )
    client = QuotaClient.from_url(real_redis.url, socket_timeout=10.0, pending_ttl=2.0)
    stop = threading.Event()
    sums = dict.fromkeys(WEIGHTS, 0.0)
    samples = 0
    threads: list[threading.Thread] = []
    try:
        client.apply_policy(Policy([policy]))
        threads = [
            threading.Thread(target=contender, args=(client, name, i * 10 + j, stop), daemon=True)
            for i, name in enumerate(WEIGHTS)
            for j in range(THREADS_PER_TENANT)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # warm-up: every tenant reaches its share
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            snap = client.snapshot("g")
            for name in WEIGHTS:
                row = snap.tenants.get(name)
                sums[name] += row.used if row else 0
            samples += 1
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        client.close()
    total_weight = sum(WEIGHTS.values())
    fair = {n: CAPACITY * w / total_weight for n, w in WEIGHTS.items()}
    average = {n: sums[n] / samples for n in WEIGHTS}
    index = jain([average[n] / fair[n] for n in WEIGHTS])
    report = "\n".join(
        [f"{n}: weight {WEIGHTS[n]:g}, fair {fair[n]:.2f}, held {average[n]:.3f}" for n in WEIGHTS]
        + [f"samples {samples}, Jain's index {index:.5f}"]
    )
    print(f"\ncontention on a real Redis:\n{report}")
    request.node.add_report_section("call", "fairness", report)
    assert samples > 50
    for name in WEIGHTS:
        assert abs(average[name] - fair[name]) <= 0.05 * fair[name], report
    assert index > 0.99, report
