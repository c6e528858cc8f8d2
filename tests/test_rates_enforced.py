"""The rate-meter properties of docs/rates.md, checked on the scripts that enforce them.

tests/test_rates_properties.py proves them on the pure reference and
tests/test_rates_engine.py holds the scripts equal to it; these run the same
properties through acquire.lua and settle.lua themselves (fakeredis; the
1:2:3 shares on a real redis-server), with time pinned through the scripts'
clock argument (``now_ms``), never the wall clock:

* over any interval of length T a tenant is admitted at most ceil·T + cburst
  and the group at most rate·T + burst;
* a tenant asking within its own rate is never refused on that meter, and borrowers take
  only what the others leave unused;
* a request refused by one meter charges no other meter and holds no lease
  (all or nothing);
* settlement never loses or doubles tokens, whatever the order of settle,
  retry, release and expiry;
* three borrowers with weights 1/2/3 share a fixed spare rate 1:2:3 (± 5 %).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import attrs
import fakeredis
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from ratequota.decision import Decision, LeaseInfo
from ratequota.engine import protocol, replies
from ratequota.engine.keys import KeySpace
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from ratequota.rates import (
    TICKS_PER_TOKEN,
    GroupBucket,
    TenantBuckets,
    group_at,
    meter_limits,
    share_limits,
    tenant_at,
)
from tests.servers import RedisServer
from tests.strategies import MeterStep, meter_histories

KS = KeySpace()
T = TICKS_PER_TOKEN
START = 1_800_000_000_000
#: Steps of 10 ms in the 1:2:3 run (20 s of Redis time, pinned).
STEPS = 2_000


class Scripts:
    """One group's scripts on a connection, with the clock pinned by the caller."""

    def __init__(self, conn: Any, policy: GroupPolicy) -> None:
        self.conn = conn
        self.policy = policy
        conn.flushall()
        for spec in load_scripts().values():
            conn.script_load(spec.source)
        self.run(protocol.apply_policy_call(KS, policy))
        self.count = 0

    def run(self, call: protocol.ScriptCall) -> Any:
        return self.conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)

    def acquire(
        self, tenant: str, amounts: Mapping[str, int], now: int, ttl: int = 60_000
    ) -> Decision:
        self.count += 1
        lease_id = f"id{self.count}"
        call = protocol.acquire_call(
            KS, self.policy.name, tenant, 1, lease_id, ttl, wait=False, pending_ms=1000,
            purge=64, now_ms=now, meters=amounts,
        )  # fmt: skip
        reply = self.run(call)
        return replies.decode_acquire(
            reply, group=self.policy.name, tenant=tenant, units=1, lease_id=lease_id, meters=amounts
        )

    def group_level(self, meter: str, now: int) -> int:
        """The group bucket of ``meter`` as stored, refilled to ``now`` (ticks)."""
        raw = self.conn.hget(KS.group(self.policy.name).demand, f"mg:{meter}")
        limits = meter_limits(self.policy, meter)
        if raw is None:
            return group_at(limits, None, now).level
        level, stamp = (int(x) for x in raw.decode().split(":"))
        return group_at(limits, GroupBucket(level, stamp), now).level


def assert_within_rates(policy: GroupPolicy, admitted: list[tuple[int, str, int]]) -> None:
    """Over any interval of the admissions ``(ms, tenant, ticks)`` of the ``tokens`` meter, each
    tenant got at most ceil·T + cburst and the group at most rate·T + burst."""
    limits = meter_limits(policy, "tokens")
    for tenant in policy.tenants:
        mine = share_limits(policy, tenant, "tokens")
        events = [(t, n) for t, who, n in admitted if who == tenant.name]
        for i, (first, _) in enumerate(events):
            total = 0
            for last, ticks in events[i:]:
                total += ticks
                assert total <= mine.ceil * (last - first) + mine.ccap, (tenant.name, first, last)
    for i, (first, _, _) in enumerate(admitted):
        total = 0
        for last, _, ticks in admitted[i:]:
            total += ticks
            assert total <= limits.rate * (last - first) + limits.cap, (first, last)


def _fake() -> Any:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@settings(max_examples=15)
@given(meter_histories(max_steps=30))
def test_scripts_admit_within_ceil_and_group_rate_over_any_interval(
    case: tuple[GroupPolicy, list[MeterStep]],
) -> None:
    """Over any interval of length T the scripts admit a tenant at most ceil·T + cburst tokens and
    the group at most rate·T + burst; a request within the tenant's own rate is never refused."""
    policy, steps = case
    policy = attrs.evolve(policy, capacity=10**6)  # only the meters refuse
    scripts = Scripts(_fake(), policy)
    names = [t.name for t in policy.tenants]
    now = START
    admitted: list[tuple[int, str, int]] = []
    for dt, index, amount, _extra in steps:
        now += dt
        decision = scripts.acquire(names[index], {"tokens": amount}, now)
        result = decision.meter("tokens")
        assert result is not None
        if result.admitted:
            admitted.append((now, names[index], amount * T))
    assert_within_rates(policy, admitted)


@settings(max_examples=15)
@given(meter_histories(min_tenants=2, max_steps=30))
def test_scripts_borrow_only_what_others_leave_unused(
    case: tuple[GroupPolicy, list[MeterStep]],
) -> None:
    """After every borrow the scripts admit, the group bucket as stored still holds every
    tenant's unspent guaranteed tokens (their buckets as stored, refilled to now)."""
    policy, steps = case
    policy = attrs.evolve(policy, capacity=10**6)
    scripts = Scripts(_fake(), policy)
    names = [t.name for t in policy.tenants]
    shares = {t.name: share_limits(policy, t, "tokens") for t in policy.tenants}
    demand = KS.group("g").demand
    now = START
    for dt, index, amount, _extra in steps:
        now += dt
        result = scripts.acquire(names[index], {"tokens": amount}, now).meter("tokens")
        if result is None or result.path != "borrow":
            continue
        claims = 0
        for name, share in shares.items():
            raw = scripts.conn.hget(demand, f"mu:tokens:{name}")
            state = None
            if raw is not None:
                own, ceil, stamp, tag, _until = raw.decode().split(":")
                state = TenantBuckets(int(own), int(ceil), int(stamp), float(tag))
            claims += max(0, tenant_at(share, state, now).own)
        assert scripts.group_level("tokens", now) >= claims


def test_scripts_never_refuse_a_tenant_within_its_own_rate() -> None:
    """A tenant asking at its guaranteed rate passes every time, while a borrower with a higher
    weight asks for everything it can get and another tenant overruns its estimates."""
    group = MeterPolicy("tokens", rate=100, burst=100)
    policy = GroupPolicy(
        "g",
        10**6,
        (
            TenantPolicy("steady", meters=(TenantMeter("tokens", rate=40, burst=40),)),
            TenantPolicy("greedy", meters=(TenantMeter("tokens", rate=0, weight=1000.0),)),
            TenantPolicy("sloppy", meters=(TenantMeter("tokens", rate=20, burst=20),)),
        ),
        meters=(group,),
    )
    scripts = Scripts(_fake(), policy)
    now = START
    for step in range(120):
        now += 25  # 40 tokens/s is one token per 25 ms
        assert scripts.acquire("steady", {"tokens": 1}, now).admitted, step
        scripts.acquire("greedy", {"tokens": 5}, now)
        sloppy = scripts.acquire("sloppy", {"tokens": 1}, now)
        if sloppy.lease is not None:
            scripts.run(protocol.settle_call(KS, sloppy.lease, {"tokens": 3}, now_ms=now))


def test_a_refusing_meter_charges_nothing_else_and_holds_no_lease() -> None:
    """All or nothing: a request refused on ``requests`` leaves ``tokens`` and the units as they
    were, and its id names no lease (a settlement finds it closed)."""
    policy = GroupPolicy(
        "g",
        10,
        (TenantPolicy("a"),),
        meters=(MeterPolicy("tokens", rate=1000, burst=1000), MeterPolicy("requests", 1, burst=1)),
    )
    scripts = Scripts(_fake(), policy)
    first = scripts.acquire("a", {"tokens": 100, "requests": 1}, START)
    assert first.admitted
    level = scripts.group_level("tokens", START)
    demand = KS.group("g").demand
    own = scripts.conn.hget(demand, "mu:tokens:a")  # a borrower: its ceiling bucket and tag
    second = scripts.acquire("a", {"tokens": 100, "requests": 1}, START)
    assert not second.admitted and second.reason == "meter"
    tokens, requests = second.meter("tokens"), second.meter("requests")
    assert tokens is not None and tokens.admitted  # it would have passed on its own
    assert requests is not None and requests.reason == "ceil" and requests.retry_after == 1.0
    assert second.retry_after == 1.0
    assert scripts.group_level("tokens", START) == level
    assert scripts.conn.hget(demand, "mu:tokens:a") == own
    assert second.used == 1  # only the first lease's unit
    ghost = LeaseInfo("id2", "a", "g", 1, 1, 0.0)
    reply = scripts.run(protocol.settle_call(KS, ghost, {"tokens": 5}, now_ms=START))
    assert [s.outcome for s in replies.decode_settle(reply, group="g")] == ["closed"]


Event = tuple[str, int, int, int]  # (kind, lease index, amount, ms)


@settings(max_examples=40)
@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=5),
    st.lists(
        st.tuples(
            st.sampled_from(["settle", "settle", "retry", "release", "wrong_token", "expire"]),
            st.integers(0, 4),
            st.integers(0, 40),
            st.integers(0, 50),
        ),
        max_size=30,
    ),
)
def test_settlement_through_the_scripts_never_loses_or_doubles(
    estimates: list[int], events: list[Event]
) -> None:
    """Whatever the order of settle, retried settle, release, expiry and wrong tokens, each lease
    costs its first settlement's actual amount, else its estimate, once: the group bucket (kept
    deep in its debt room, so nothing is clipped) holds the exact balance."""
    meter = MeterPolicy("tokens", rate=1, burst=10_000, debt=10_000)
    policy = GroupPolicy("g", 100, (TenantPolicy("a"),), meters=(meter,))
    scripts = Scripts(_fake(), policy)
    now = START
    assert scripts.acquire("a", {"tokens": 9_000}, now).admitted  # deep, not at the bottom
    leases: list[LeaseInfo] = []
    for estimate in estimates:
        decision = scripts.acquire("a", {"tokens": estimate}, now, ttl=1_000)
        assert decision.lease is not None
        leases.append(decision.lease)
    start = scripts.group_level("tokens", now)
    finals: dict[int, int] = {}
    ended: set[int] = set()
    for kind, index, amount, dt in events:
        now += dt
        index %= len(leases)
        lease = leases[index]
        if kind == "expire":
            now = max(now, round(lease.expires_at * 1000))
            ended.add(index)
            continue
        if now >= round(lease.expires_at * 1000):
            ended.add(index)
        if kind == "release":
            call = protocol.release_call(
                KS, "g", lease.id, tenant="a", token=lease.token, purge=64, now_ms=now
            )
            scripts.run(call)
            ended.add(index)
            continue
        if kind == "retry":
            amount = finals.get(index, amount)
        if kind == "wrong_token":
            lease = attrs.evolve(lease, token=lease.token + 1)
        reply = scripts.run(protocol.settle_call(KS, lease, {"tokens": amount}, now_ms=now))
        (got,) = replies.decode_settle(reply, group="g")
        if got.outcome == "settled":
            assert index not in finals and index not in ended and kind != "wrong_token"
            finals[index] = amount
            assert got.delta == amount - estimates[index]
        else:
            assert got.delta == 0
    owed = sum(finals.get(i, e) - e for i, e in enumerate(estimates))
    rate = meter_limits(policy, "tokens").rate  # ticks per ms
    assert scripts.group_level("tokens", now) == start + (now - START) * rate - owed * T


def weighted_shares(conn: Any) -> dict[str, int]:
    """Three borrowers with weights 1/2/3 asking every 10 ms over a spare of 300 tokens/s (a
    lender holds the other half of 600/s all along); tokens each was admitted over STEPS × 10 ms."""
    lender = TenantPolicy("lender", meters=(TenantMeter("tokens", rate=300, ceil=300, burst=30),))
    borrowers = [
        TenantPolicy(f"w{w}", meters=(TenantMeter("tokens", rate=0, weight=float(w)),))
        for w in (1, 2, 3)
    ]
    meter = MeterPolicy("tokens", rate=600, burst=60)
    policy = GroupPolicy("g", 10**6, (lender, *borrowers), meters=(meter,))
    scripts = Scripts(conn, policy)
    got: dict[str, int] = defaultdict(int)
    now = START
    order = [b.name for b in borrowers]
    for _ in range(STEPS):
        now += 10
        assert scripts.acquire("lender", {"tokens": 3}, now, ttl=1_000).admitted
        order = order[1:] + order[:1]  # nobody always asks first
        for name in order:
            # Each asks for up to its whole 10 ms of the spare, in tokens of 1, until refused.
            for _ in range(3):
                if not scripts.acquire(name, {"tokens": 1}, now, ttl=1_000).admitted:
                    break
                got[name] += 1
    return dict(got)


def test_weighted_borrowers_share_the_spare_1_2_3_on_real_redis(real_redis: RedisServer) -> None:
    """On a real Redis, through acquire.lua: borrowers weighted 1/2/3 get 1:2:3 of the spare
    rate within 5 %, and the spare is used, not wasted."""
    conn = redis.Redis.from_url(real_redis.url)
    try:
        got = weighted_shares(conn)
    finally:
        conn.close()
    total = sum(got.values())
    assert total >= 300 * (STEPS / 100) * 0.97, got
    for weight in (1, 2, 3):
        expected = total * weight / 6
        assert abs(got[f"w{weight}"] - expected) <= 0.05 * expected, got


def test_a_refused_lease_decides_and_charges_no_meter() -> None:
    """The lease is decided first: refused for the tenant's limit (or too large), the request
    reports no meter, charges none, and marks no contention."""
    policy = GroupPolicy(
        "g",
        2,
        (TenantPolicy("a", guarantee=1, borrow_limit=0), TenantPolicy("b", guarantee=1)),
        meters=(MeterPolicy("tokens", rate=10, burst=10),),
    )
    scripts = Scripts(_fake(), policy)
    held = scripts.acquire("a", {"tokens": 1}, START)
    assert held.admitted
    level = scripts.group_level("tokens", START)
    contention = KS.group("g").contention[0]
    marks = scripts.conn.zrange(contention, 0, -1, withscores=True)
    for units in (1, 5):  # over its limit; larger than the group
        scripts.count += 1
        call = protocol.acquire_call(
            KS, "g", "a", units, f"x{units}", 60_000, wait=False, pending_ms=1000, purge=64,
            now_ms=START, meters={"tokens": 3},
        )  # fmt: skip
        reply = scripts.run(call)
        refused = replies.decode_acquire(
            reply, group="g", tenant="a", units=units, lease_id="x", meters={"tokens": 3}
        )
        assert not refused.admitted and refused.reason in ("tenant_limit", "too_large")
        assert refused.meters == ()
    assert scripts.group_level("tokens", START) == level
    assert scripts.conn.zrange(contention, 0, -1, withscores=True) == marks


def test_a_metered_group_keeps_its_contention_sets_in_existence() -> None:
    """Publishing meters writes each contention set with the sentinel "~" and no expiry (a Redis
    Cluster refuses a script naming a missing key while the slot migrates); the sentinel is never
    a contender; publishing the group without meters removes them."""
    meter = MeterPolicy("tokens", rate=10, burst=10)
    policy = GroupPolicy("g", 4, (TenantPolicy("a"),), meters=(meter,))
    scripts = Scripts(_fake(), policy)
    keys = KS.group("g").contention
    for key in keys:
        assert scripts.conn.zrange(key, 0, -1) == [b"~"]
        assert scripts.conn.pttl(key) == -1
    first = scripts.acquire("a", {"tokens": 4}, START).meter("tokens")
    assert first is not None and first.path == "borrow"  # nobody contended: the sentinel isn't
    assert scripts.conn.zrange(keys[0], 0, -1) == [b"a", b"~"]
    assert scripts.conn.pttl(keys[0]) == -1
    scripts.run(protocol.apply_policy_call(KS, attrs.evolve(policy, meters=())))
    assert not any(scripts.conn.exists(key) for key in keys)
