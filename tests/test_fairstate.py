"""The scripts' incremental fair state always equals the same state recomputed from scratch.

After ANY sequence of acquire, waiting acquire, retry, release, withdrawal,
renew, expiry (purged in small batches), idempotent replay and policy change,
the group's ``g`` field and ``fair`` zset, read back from Redis, must equal
``ratequota.engine.fairstate.recompute`` over the raw units held and waiting:

* the exact sums (Σlo, Σup, Σ G(1-ℓ), units held) bit for bit;
* the level: 0 / all-at-ceiling exactly, else the reference water level
  (``fairness._water_level``) within rounding;
* at the stored level, the split into base and slope bit for bit;
* the breakpoints, member for member (plus the sentinel exactly while the group is in use);
* every active tenant's limit at the stored level equals ``group_allocation``.

Hypothesis draws the policy seed, the purge batch and the operations; the same
run goes against fakeredis and a real redis-server.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota.clients.backends import Backend, embedded_backend, url_backend
from ratequota.clients.sync import QuotaClient
from ratequota.decision import LeaseInfo
from ratequota.engine.fairstate import (
    ANCHOR,
    WIDE_MEMBER,
    FairState,
    breakpoints,
    recompute,
)
from ratequota.errors import UnknownTenant
from ratequota.fairness import group_allocation
from ratequota.policy import GroupPolicy, Policy
from ratequota.testing import ManualClock
from tests.servers import RedisServer
from tests.test_differential import STRANGER, random_policy

GROUP = "state"

operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 8), st.integers(1, 70), st.booleans()),
        st.tuples(st.just("retry"), st.integers(0, 50)),
        st.tuples(st.just("replay"), st.integers(0, 50)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
        st.tuples(st.just("renew"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.sampled_from([1, 400, 1500, 2500, 9000, 40_000])),
        st.tuples(st.just("policy"), st.integers(0, 10**6)),
    ),
    min_size=1,
    max_size=40,
)


def check_state(client: QuotaClient, policy: GroupPolicy) -> None:
    """The stored fair state against a from-scratch recomputation over the raw demand."""
    conn: Any = client.backend.connection(GROUP)
    keys = client.core.keyspace.group(GROUP)
    raw = conn.hgetall(keys.demand)
    used = {k[2:].decode(): int(v) for k, v in raw.items() if k.startswith(b"u:")}
    pending = {k[2:].decode(): int(v) for k, v in raw.items() if k.startswith(b"p:")}
    stored = FairState.decode(raw.get(b"g"))
    fresh = recompute(policy, used, pending)
    context = f"used={used} pending={pending} stored={stored} fresh={fresh}"
    assert (stored.sum_lo, stored.sum_up, stored.reserve, stored.used) == (
        fresh.sum_lo,
        fresh.sum_up,
        fresh.reserve,
        fresh.used,
    ), context
    if fresh.level in (0.0, math.inf):
        assert stored.level == fresh.level, context
    else:
        assert math.isclose(stored.level, fresh.level, rel_tol=1e-9, abs_tol=1e-12), context
    at_stored = recompute(policy, used, pending, level=stored.level)
    assert (stored.base, stored.slope) == (at_stored.base, at_stored.slope), context

    members = {m.decode(): s for m, s in conn.zrange(keys.fair, 0, -1, withscores=True)}
    expected = breakpoints(
        policy, {n: used.get(n, 0) + pending.get(n, 0) for n in {*used, *pending}}
    )
    if b"s:" in raw:  # the group is in use: the fair zset holds its sentinel too
        expected[ANCHOR] = expected[WIDE_MEMBER] = -1.0
    assert members == expected, context

    demand = {n: float(used.get(n, 0) + pending.get(n, 0)) for n in {*used, *pending}}
    reference = group_allocation(policy, demand)
    for name, share in reference.shares.items():
        limit = min(max(stored.level * share.weight, share.lo), share.up)
        assert math.isclose(limit, share.limit, rel_tol=1e-9, abs_tol=1e-6), (name, context)


_RUNS = itertools.count()


def run(
    make_backend: Callable[[], Backend], seed: int, purge: int, ops: list[tuple[Any, ...]]
) -> None:
    """Replays ``ops`` on a fresh group (its own key prefix) and checks the state after each."""
    rnd = random.Random(seed)
    policy = random_policy(rnd, GROUP)
    clock = ManualClock()
    client = QuotaClient(
        backend=make_backend(),
        clock=clock,
        prefix=f"fs{next(_RUNS)}",
        purge_limit=purge,
        pending_ttl=2.0,
        catalog_ttl=3600.0,
    )
    leases: list[LeaseInfo] = []
    waiting: list[tuple[str, str, int]] = []  # (request id, tenant, units)
    serial = 0
    try:
        client.apply_policy(Policy([policy]))
        check_state(client, policy)
        for op in ops:
            kind = op[0]
            names = [t.name for t in policy.tenants] + [STRANGER]
            if kind == "acquire" or (kind == "retry" and waiting):
                if kind == "acquire":
                    serial += 1
                    rid, tenant = f"r{serial}", names[op[1] % len(names)]
                    units, wait = 1 + op[2] % (policy.capacity + 1), op[3]
                else:
                    rid, tenant, units = waiting[op[1] % len(waiting)]
                    wait = True
                flow = client.core.attempt(tenant, units, GROUP, rid, 30_000, wait=wait)
                try:
                    decision = client._run(flow)
                except UnknownTenant:
                    decision = None
                if decision is not None and decision.lease is not None:
                    leases.append(decision.lease)
                    waiting = [w for w in waiting if w[0] != rid]
                elif (
                    decision is not None
                    and wait
                    and decision.reason != "too_large"
                    and all(w[0] != rid for w in waiting)
                ):
                    waiting.append((rid, tenant, units))
            elif kind == "replay" and leases:
                lease = leases[op[1] % len(leases)]
                flow = client.core.attempt(
                    lease.tenant, lease.units, GROUP, lease.id, 30_000, wait=False
                )
                # A lease that ended, of a tenant a policy change removed since, is refused
                # as any request of that tenant would be.
                with contextlib.suppress(UnknownTenant):
                    client._run(flow)
            elif kind == "release" and leases:
                client.release(leases.pop(op[1] % len(leases)))
            elif kind == "withdraw" and waiting:
                rid, tenant, units = waiting.pop(op[1] % len(waiting))
                client.release(LeaseInfo(rid, tenant, GROUP, units, 0, 0.0))
            elif kind == "renew" and leases:
                client.renew(leases[op[1] % len(leases)], 30.0)
            elif kind == "advance":
                clock.advance(op[1] / 1000)
            elif kind == "policy":
                # Another random policy of the same group: tenants come and go, specs change.
                policy = random_policy(random.Random(op[1]), GROUP)
                client.apply_policy(Policy([policy]))
            check_state(client, policy)
    finally:
        client.close()


@given(seed=st.integers(0, 10**6), purge=st.sampled_from([1, 2, 1000]), ops=operations)
def test_incremental_state_equals_recomputation_on_fakeredis(
    seed: int, purge: int, ops: list[tuple[Any, ...]]
) -> None:
    """Any operation sequence on fakeredis leaves exactly the from-scratch state."""
    run(lambda: embedded_backend(shared=False), seed, purge, ops)


@pytest.mark.real_redis
def test_incremental_state_equals_recomputation_on_real_redis(real_redis: RedisServer) -> None:
    """The same property on a real redis-server (its Lua 5.1, its number formatting)."""

    @given(seed=st.integers(0, 10**6), purge=st.sampled_from([1, 2, 1000]), ops=operations)
    def prop(seed: int, purge: int, ops: list[tuple[Any, ...]]) -> None:
        run(lambda: url_backend(real_redis.url, socket_timeout=5.0), seed, purge, ops)

    prop()
