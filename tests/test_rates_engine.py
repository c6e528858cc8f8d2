"""The acquire and settle scripts with rate meters against the reference (ratequota.metered).

Random groups with one or two meters (``tokens`` per second or per minute,
``requests``), listed tenants and strangers, and random histories — acquires
naming random amounts on random meters (some in shadow mode), retries of an
admitted id, settlements above, at and below the estimate (replayed,
conflicting, on a meter the lease did not reserve, with a wrong token, after
release or expiry), releases, and clock steps from 0 ms to far beyond a full
refill — are replayed through the scripts on fakeredis and on a real
redis-server, and through ``MeteredGroup`` (built on ``settlement.MeterBook``).
After every step every field of the reply equals the reference's: the
request's status, reason and retry, each meter's admission, reason, retry,
remaining, reset and path, each settlement's outcome, delta and clipped
ticks; and a refused request holds no lease (all or nothing). The lease's
own fair limit never refuses here (the capacity is far above the demand):
tests/test_differential.py holds that rule.

Steps per backend: ``RATEQUOTA_DIFF_STEPS``, else 2,000 (20,000 with
``RATEQUOTA_HYPOTHESIS_PROFILE=nightly``).
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratequota.decision import LeaseInfo
from ratequota.engine import protocol, replies
from ratequota.engine.keys import KeySpace
from ratequota.engine.scripts import load_scripts
from ratequota.metered import MeteredGroup
from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from tests.redis_state import dump_keys
from tests.test_differential import total_steps
from tests.test_rates_differential import random_group

SEEDS = 8
KS = KeySpace()


def random_metered_group(rnd: random.Random) -> GroupPolicy:
    """``random_group``'s tokens meter, sometimes a ``requests`` meter, room for every lease."""
    base = random_group(rnd)
    meters = list(base.meters)
    tenants = list(base.tenants)
    if rnd.random() < 0.6:
        rate = rnd.choice([1, 5, 50])
        meters.append(MeterPolicy("requests", rate=rate, burst=rnd.choice([1, 3, 10])))
        if rnd.random() < 0.5:
            share = TenantMeter("requests", rate=rate // 2, weight=rnd.choice([1.0, 2.0]))
            tenants[0] = attrs.evolve(tenants[0], meters=(*tenants[0].meters, share))
    return attrs.evolve(
        base,
        capacity=10**6,
        tenants=tuple(tenants),
        meters=tuple(meters),
        unknown_tenants=rnd.choice(["refuse", "default"]),
        max_lease_ttl=60.0,
    )


def _run(conn: Any, call: protocol.ScriptCall) -> Any:
    return conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.define
class Replay:
    """Both sides of one history: the scripts on ``conn`` and the reference ``model``."""

    conn: Any
    rnd: random.Random
    policy: GroupPolicy
    model: MeteredGroup
    now: int
    leases: dict[str, LeaseInfo] = attrs.Factory(dict)
    ids: list[tuple[str, str]] = attrs.Factory(list)  # (id, tenant) of every acquire
    admitted: int = 0
    settled: int = 0
    refused: int = 0

    def purge(self) -> None:
        """The scripts purge every expired lease at an acquire or release (purge is large)."""
        for lease_id, lease in list(self.leases.items()):
            if lease.expires_at * 1000 <= self.now:
                del self.leases[lease_id]
                self.model.end(lease_id)

    def amounts(self) -> dict[str, int]:
        out = {}
        for meter in self.policy.meters:
            if self.rnd.random() < 0.75:
                top = meter.burst + 1
                out[meter.name] = self.rnd.choice([0, 1, 1, 2, self.rnd.randint(0, top), top])
        return out

    def acquire(self) -> None:
        names = [t.name for t in self.policy.tenants]
        if self.ids and self.rnd.random() < 0.1:
            lease_id, tenant = self.rnd.choice(self.ids)  # a retry of an earlier acquire
        else:
            tenant = self.rnd.choice([*names, *names, "stranger"])
            lease_id = f"id{len(self.ids)}"
            self.ids.append((lease_id, tenant))
        amounts = self.amounts()
        shadow = self.rnd.random() < 0.1
        ttl = self.rnd.choice([1_000, 5_000, 30_000])
        call = protocol.acquire_call(
            KS, "g", tenant, 1, lease_id, ttl, wait=False, pending_ms=1000, purge=10_000,
            now_ms=self.now, shadow=shadow, meters=amounts,
        )  # fmt: skip
        reply = _run(self.conn, call)
        self.purge()
        status, reason = int(reply[0]), _text(reply[1])
        if self.policy.tenant(tenant) is None:
            assert (status, reason) == (0, "unknown_tenant")
            return
        if lease_id in self.leases:
            assert status == 1 and int(reply[10]) == 1 and len(reply) == 11, reply
            return
        ok, decisions = self.model.decide(tenant, amounts, self.now, shadow=shadow)
        got = replies.decode_acquire(
            reply, group="g", tenant=tenant, units=1, lease_id=lease_id, meters=amounts
        )
        assert len(got.meters) == len(amounts)
        for result in got.meters:
            want = decisions[result.name]
            assert result.admitted == want.admitted, (result, want)
            assert result.reason == want.reason, (result, want)
            want_retry = None if want.retry_ms is None else want.retry_ms / 1000
            assert result.retry_after == want_retry, (result, want)
            assert result.remaining == want.remaining, (result, want)
            assert result.reset == want.reset_ms / 1000, (result, want)
            assert result.path == want.path, (result, want)
        if not ok and not shadow:
            self.refused += 1
            assert (got.admitted, got.reason) == (False, "meter")
            waits = [d.retry_ms for d in decisions.values() if not d.admitted]
            retry = 0 if None in waits else max(w for w in waits if w is not None)
            assert got.retry_after == retry / 1000
            return
        assert got.admitted and got.lease is not None
        assert got.reason == ("meter" if not ok else "admitted")
        self.admitted += 1
        self.leases[lease_id] = got.lease
        expiry = round(got.lease.expires_at * 1000)
        self.model.admit(lease_id, tenant, got.lease.token, expiry, amounts, decisions)

    def settle(self) -> None:
        if not self.ids:
            return
        lease_id, tenant = self.rnd.choice(self.ids)
        if self.leases and self.rnd.random() < 0.7:  # mostly a live lease
            lease_id = self.rnd.choice(sorted(self.leases))
            tenant = self.leases[lease_id].tenant
        lease = self.leases.get(lease_id) or LeaseInfo(lease_id, tenant, "g", 1, 1, 0.0)
        if self.rnd.random() < 0.1:
            lease = attrs.evolve(lease, token=lease.token + 1)
        record = self.model.leases.get(lease_id)
        actuals = {}
        for meter in self.policy.meters:
            if self.rnd.random() < 0.8:
                estimate = 0
                if record is not None and meter.name in record.records:
                    estimate = record.records[meter.name].estimate
                top = 3 * meter.burst + 2
                actuals[meter.name] = self.rnd.choice(
                    [estimate, estimate, 0, max(0, estimate - 1), self.rnd.randint(0, top)]
                )
        reply = _run(self.conn, protocol.settle_call(KS, lease, actuals, now_ms=self.now))
        got = replies.decode_settle(reply, group="g")
        want = self.model.settle(lease_id, lease.tenant, lease.token, actuals, self.now)
        assert len(got) == len(want)
        raw = list(reply[2])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert (g.name, g.outcome, g.delta) == (w.name, w.outcome, w.delta), (g, w)
            clipped = tuple(int(x) for x in raw[6 * i + 3 : 6 * i + 6])
            assert clipped == w.clipped, (g, w)
            self.settled += g.outcome == "settled"

    def release(self) -> None:
        if not self.leases:
            return
        lease = self.leases[self.rnd.choice(sorted(self.leases))]
        call = protocol.release_call(
            KS, "g", lease.id, tenant=lease.tenant, token=lease.token, purge=10_000,
            now_ms=self.now,
        )  # fmt: skip
        state = replies.decode_release(_run(self.conn, call)).state
        assert state in ("released", "expired")
        del self.leases[lease.id]
        self.model.end(lease.id)
        self.purge()

    def step(self) -> None:
        self.now += self.rnd.choice(
            [0, 0, 1, 7, 100, 1_000, 2_000, 5_000, self.rnd.randint(0, 120_000)]
        )
        kind = self.rnd.random()
        if kind < 0.55:
            self.acquire()
        elif kind < 0.85:
            self.settle()
        else:
            self.release()


def run_history(conn: Any, rnd: random.Random, steps: int) -> Replay:
    """One random group and ``steps`` random steps on an empty ``conn``."""
    conn.flushall()
    for spec in load_scripts().values():
        conn.script_load(spec.source)
    policy = random_metered_group(rnd)
    _run(conn, protocol.apply_policy_call(KS, policy))
    replay = Replay(conn, rnd, policy, MeteredGroup.for_policy(policy), rnd.randint(0, 10**12))
    for _ in range(steps):
        replay.step()
    return replay


@pytest.fixture
def conn(redis_conn: Any) -> Any:
    """An empty fakeredis or the session's real redis-server (conftest's ``redis_conn``)."""
    return redis_conn


def test_metered_scripts_equal_the_reference(conn: Any) -> None:
    """Acquire with meters, settle and release equal ``MeteredGroup`` on random histories."""
    steps = total_steps()
    totals = [0, 0, 0]
    for seed in range(SEEDS):
        replay = run_history(conn, random.Random(seed), steps // SEEDS)
        totals[0] += replay.admitted
        totals[1] += replay.refused
        totals[2] += replay.settled
    # Every kind of outcome must be exercised, not only one.
    assert all(t > steps // 50 for t in totals), totals


def test_histories_exercise_every_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random histories reach every settle outcome and every meter refusal reason."""
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    outcomes: set[str] = set()
    original = MeteredGroup.settle

    def spy(self: MeteredGroup, *args: Any, **kw: Any) -> Any:
        rows = original(self, *args, **kw)
        outcomes.update(r.outcome for r in rows)
        return rows

    monkeypatch.setattr(MeteredGroup, "settle", spy)
    for seed in range(SEEDS):
        run_history(conn, random.Random(seed), 250)
    assert outcomes == {"settled", "replay", "conflict", "closed", "mismatch", "unreserved"}


METERED_MANY = GroupPolicy(
    "g",
    capacity=6,
    tenants=(
        TenantPolicy("a", guarantee=2, meters=(TenantMeter("tokens", rate=10, burst=10),)),
        TenantPolicy("b", guarantee=2),
    ),
    meters=(MeterPolicy("tokens", rate=30, burst=30), MeterPolicy("requests", rate=2, burst=2)),
    unknown_tenants="default",
)

metered_request = st.tuples(
    st.sampled_from(["a", "b", "stranger"]),
    st.integers(1, 3),
    st.sampled_from([f"id-{i}" for i in range(6)]),  # repeats exercise replays
    st.just(30_000),
    st.booleans(),
    st.booleans(),  # shadow
    st.dictionaries(st.sampled_from(["tokens", "requests"]), st.integers(0, 25), max_size=2),
)


@settings(max_examples=30)
@given(batch=st.lists(metered_request, min_size=1, max_size=6), later=st.integers(0, 3_000))
def test_acquire_many_with_meters_decides_like_one_by_one(
    batch: list[tuple[Any, ...]], later: int
) -> None:
    """acquire_many with meter amounts gives the same replies and leaves the same state as the
    same acquires sent one after another (as the async client's coalescing relies on)."""
    one_by_one = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    together = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    for conn in (one_by_one, together):
        for spec in load_scripts().values():
            conn.script_load(spec.source)
        _run(conn, protocol.apply_policy_call(KS, METERED_MANY))
    now = 1_800_000_000_000 + later
    expected = []
    for t, u, i, ttl, w, sh, m in batch:
        call = protocol.acquire_call(
            KS, "g", t, u, i, ttl, wait=w, pending_ms=2000, purge=64, now_ms=now,
            shadow=sh, meters=m,
        )  # fmt: skip
        expected.append(_run(one_by_one, call))
    many = protocol.acquire_many_call(KS, "g", batch, pending_ms=2000, purge=64, now_ms=now)
    assert _run(together, many) == expected
    assert dump_keys(together, expiry=True) == dump_keys(one_by_one, expiry=True)
