"""The Lua engine against the pure reference (DESIGN §3): same decisions, same limits.

Random policies (half of them with a rate meter that always admits, which
metered acquires name) and random sequences of acquire, waiting acquire (pending
demand), retry, replay, mismatched replay (another tenant or other units under
a used request id), release, withdraw, renew (some above the group's
max_lease_ttl: clamped), fenced release and renew (another tenant or token),
loss of the group's state (its keys deleted, as an eviction or an empty
restart does) and expiry are replayed on fakeredis and on a real
redis-server. The test keeps its own model of the group (leases and waiting
registrations with their expiry and token; the recovery window and the leases
its holders may re-assert) and, after every step, asserts that the script's
decision equals ``ratequota.fairness.decide`` on the model's state (or the
model's ``id_mismatch`` / ``recovering`` refusal), that tokens only grow, and
that every tenant's limit in a snapshot equals ``group_allocation`` (within
1e-6). Time is a ``ManualClock`` pinning the Redis time the scripts see, so
expiry is deterministic.

Steps per backend: ``RATEQUOTA_DIFF_STEPS``, else 2,000 (20,000 with
``RATEQUOTA_HYPOTHESIS_PROFILE=nightly``).
"""

from __future__ import annotations

import math
import os
import random

import attrs
import pytest

from ratequota.clients.backends import SingleBackend, embedded_backend, url_backend
from ratequota.clients.sync import QuotaClient
from ratequota.decision import Decision, LeaseInfo
from ratequota.errors import UnknownTenant
from ratequota.fairness import EPSILON, GroupDecision, decide, group_allocation
from ratequota.policy import (
    MAX_METER,
    GroupPolicy,
    MeterPolicy,
    Policy,
    TenantPolicy,
    UnknownTenants,
)
from ratequota.rates import policy_horizon
from ratequota.testing import ManualClock
from tests.conftest import MakeClient
from tests.servers import RedisServer

PENDING_TTL = 2.0
STRANGER = "stranger"
SEEDS = 8


def total_steps() -> int:
    """Steps per backend for this run."""
    explicit = os.environ.get("RATEQUOTA_DIFF_STEPS")
    if explicit:
        return int(explicit)
    nightly = os.environ.get("RATEQUOTA_HYPOTHESIS_PROFILE") == "nightly"
    return 20_000 if nightly else 2_000


def random_policy(rnd: random.Random, name: str) -> GroupPolicy:
    """A valid group policy on the corners: exact guarantees, ℓ 0/1, B None/0, w 1e-3/1e3."""
    capacity = rnd.choice([1, 2, 3, 5, 8, 12, 24, 40, 64, rnd.randint(1, 200)])
    count = rnd.choice([1, 2, 3, 3, 4, 5, 8])
    total = capacity if rnd.random() < 0.5 else rnd.randint(0, capacity)
    cuts = sorted(rnd.randint(0, total) for _ in range(count - 1))
    bounds = [0, *cuts, total]
    tenants = []
    for i in range(count):
        tenants.append(
            TenantPolicy(
                f"t{i}",
                guarantee=bounds[i + 1] - bounds[i],
                lendable=rnd.choice([0.0, 1.0, 1.0, 1 / 3, 0.5, rnd.random()]),
                borrow_limit=rnd.choice([None, None, 0, rnd.randint(0, capacity)]),
                weight=rnd.choice([1.0, 1.0, 2.0, 3.0, 1e-3, 1e3, rnd.uniform(0.01, 100)]),
                max_units=rnd.choice([None, None, None, rnd.randint(1, capacity + 1)]),
            )
        )
    unknown: UnknownTenants = "default" if rnd.random() < 0.3 else "refuse"
    default = TenantPolicy(
        "*",
        borrow_limit=rnd.choice([None, rnd.randint(0, capacity)]),
        weight=rnd.choice([1.0, 0.5]),
    )
    return GroupPolicy(
        name,
        capacity=capacity,
        tenants=tuple(tenants),
        unknown_tenants=unknown,
        default_tenant=default,
        # Short enough that recovery windows after a lost state end within a run.
        max_lease_ttl=rnd.choice([30.0, 60.0, 600.0]),
        # A rate meter that always admits: metered acquires must decide their leases exactly
        # as unmetered ones (tests/test_rates_engine.py holds the meters' own decisions).
        meters=(MeterPolicy("tokens", rate=MAX_METER, burst=MAX_METER),)
        if rnd.random() < 0.5
        else (),
    )


@attrs.define
class Entry:
    """A lease or a waiting registration in the model: whose, how many units, until when (ms)."""

    tenant: str
    units: int
    expiry: int
    order: int = 0
    token: int = 0


@attrs.define
class Model:
    """What the group's keys should hold, independently of the scripts.

    Entries stay until a purging call (acquire, release, renew) runs at or after
    their expiry, exactly as in Redis; the *live* view ignores expired ones, as
    the snapshot script does.
    """

    policy: GroupPolicy
    now: int
    leases: dict[str, Entry] = attrs.Factory(dict)
    waiting: dict[str, Entry] = attrs.Factory(dict)
    registrations: int = 0
    #: Latest expiry ever granted (the policy hash's busy), the recovery window's end, whether
    #: the state was deleted and no writing call has found out yet, and the leases that were
    #: live when it was lost (their holders may re-assert them).
    busy: int = 0
    recover: int = 0
    undetected: bool = False
    lost: dict[str, Entry] = attrs.Factory(dict)
    top_token: int = 0
    #: When a writing call last found the state lost: the rate meter's buckets restart at
    #: their debt floor then (docs/rates.md, "When Redis loses the meters"), so the meter that
    #: otherwise always admits here may refuse until they have refilled (policy_horizon).
    meters_lost_at: int | None = None

    def lose_state(self) -> None:
        """The group's keys are gone; its policy hash (busy, fence) survives."""
        live = {k: e for k, e in self.leases.items() if e.expiry > self.now}
        self.lost = {**{k: e for k, e in self.lost.items() if e.expiry > self.now}, **live}
        self.leases, self.waiting = {}, {}
        self.undetected = True

    def detect(self) -> None:
        """What a writing call (acquire, renew) does first: find the loss, open the window."""
        if self.undetected and self.busy > self.now:
            self.recover = max(self.recover, self.busy)
        if self.undetected:
            self.meters_lost_at = self.now
        self.undetected = False

    @property
    def recovering(self) -> bool:
        """True while new work is refused."""
        return self.recover > self.now

    def purge(self) -> None:
        """Drop expired entries, as every mutating script does first (or last)."""
        self.leases = {k: e for k, e in self.leases.items() if e.expiry > self.now}
        self.waiting = {k: e for k, e in self.waiting.items() if e.expiry > self.now}

    def used(self) -> dict[str, int]:
        """Live units held per tenant."""
        out: dict[str, int] = {}
        for e in self.leases.values():
            if e.expiry > self.now:
                out[e.tenant] = out.get(e.tenant, 0) + e.units
        return out

    def pending(self) -> dict[str, int]:
        """Live units waiting per tenant."""
        out: dict[str, int] = {}
        for e in self.waiting.values():
            if e.expiry > self.now:
                out[e.tenant] = out.get(e.tenant, 0) + e.units
        return out

    def reference(self, tenant: str, units: int, request_id: str) -> GroupDecision:
        """The reference decision for an acquire on the current (purged) state.

        The single place the oracle is called, so a change of ``decide``'s
        signature is adapted here only.
        """
        mine = [(e.order, rid, e) for rid, e in self.waiting.items() if e.tenant == tenant]
        oldest = min(mine, key=lambda row: row[0], default=None)
        # Waiting requests of a tenant are served in arrival order: any other request of the
        # tenant must leave room for its oldest waiting one.
        reserve = oldest[2].units if oldest is not None and oldest[1] != request_id else 0
        return decide(
            self.policy,
            self.used(),
            self.pending(),
            tenant,
            units,
            already_pending=request_id in self.waiting,
            reserve=reserve,
        )

    def limits(self, names: list[str]) -> dict[str, tuple[float, float, float]]:
        """Reference (limit, lo, up) of ``names`` and of every active tenant."""
        demand: dict[str, float] = {}
        for source in (self.used(), self.pending()):
            for name, units in source.items():
                demand[name] = demand.get(name, 0.0) + units
        alloc = group_allocation(self.policy, demand, extra=names)
        return {n: (s.limit, s.lo, s.up) for n, s in alloc.shares.items()}


def model_live(model: Model) -> list[Entry]:
    """Leases whose holders may still be running: counted by Redis, or lost and not expired."""
    entries = [*model.leases.values(), *model.lost.values()]
    return [e for e in entries if e.expiry > model.now]


class Replay:
    """Drives one client and the model side by side, checking after every step."""

    def __init__(self, client: QuotaClient, clock: ManualClock, policy: GroupPolicy, seed: int):
        self.client, self.clock, self.policy = client, clock, policy
        self.rnd = random.Random(seed)
        self.model = Model(policy, clock.redis_ms())
        self.names = [t.name for t in policy.tenants]
        if policy.unknown_tenants == "default":
            self.names.append(STRANGER)
        self.ids = (f"r{seed}-{i}" for i in range(10**9))
        self.log: list[str] = []
        self.admitted_ids: list[str] = []

    # -- operations ------------------------------------------------------------

    def acquire(self, tenant: str, units: int, rid: str, *, wait: bool) -> None:
        """One acquire round trip, checked against the reference."""
        ttl_ms = self.rnd.choice([1000, 3000, 10_000, 30_000])
        model = self.model
        model.detect()
        model.purge()
        replay = rid in model.leases
        original = model.leases.get(rid) or model.waiting.get(rid)
        mismatch = original is not None and (original.tenant, original.units) != (tenant, units)
        expected = model.reference(tenant, units, rid)
        self.log.append(f"acquire {tenant} {units} {rid} wait={wait} -> expect {expected}")
        amounts = {"tokens": self.rnd.randint(0, 10**6)} if self.policy.meters else None
        flow = self.client.core.attempt(
            tenant, units, self.policy.name, rid, ttl_ms, wait=wait, meters=amounts
        )
        try:
            got: Decision = self.client._run(flow)
        except UnknownTenant:
            assert not mismatch and expected.reason == "unknown_tenant", self.trace()
            return
        if mismatch:  # refused, nothing charged, nothing registered
            assert (got.admitted, got.reason) == (False, "id_mismatch"), self.trace(got)
            assert got.group_used == sum(model.used().values()), self.trace(got)
            return
        if replay:
            assert got.admitted, self.trace(got)
            assert got.lease is not None, self.trace(got)
            assert got.lease.replay, self.trace(got)
            assert got.lease.token == model.leases[rid].token, self.trace(got)
            return
        if model.recovering and expected.reason != "too_large":
            assert (got.admitted, got.reason) == (False, "recovering"), self.trace(got)
            assert got.retry_after == (model.recover - model.now) / 1000, self.trace(got)
            return
        if got.reason == "meter" and expected.admitted and self.meter_may_refuse():
            # The lease fits; the meter refused, writing nothing but its contention mark.
            assert not got.admitted and amounts, self.trace(got)
            return
        assert (got.admitted, got.reason) == (expected.admitted, expected.reason), self.trace(got)
        assert math.isclose(got.limit, expected.limit, rel_tol=1e-9, abs_tol=1e-6), self.trace(got)
        held = expected.group_used + (units if got.admitted else 0)
        assert got.group_used == held, self.trace(got)
        # The meter is decided only with an admitted lease, and always admits here.
        assert [m.admitted for m in got.meters] == ([True] if amounts and got.admitted else [])
        if got.admitted:
            assert got.lease is not None
            # Tokens only grow, across a loss of the state too; at least now_ms x 1000.
            assert got.lease.token > model.top_token, self.trace(got)
            assert got.lease.token >= model.now * 1000, self.trace(got)
            model.top_token = got.lease.token
            model.waiting.pop(rid, None)
            expiry = model.now + ttl_ms
            model.leases[rid] = Entry(tenant, units, expiry, token=got.lease.token)
            model.busy = max(model.busy, expiry)
            self.admitted_ids.append(rid)
        elif wait and got.reason != "too_large":
            entry = self.model.waiting.get(rid)
            if entry is None:
                self.model.registrations += 1
                entry = Entry(tenant, units, 0, self.model.registrations)
                self.model.waiting[rid] = entry
            entry.expiry = self.model.now + round(PENDING_TTL * 1000)

    def meter_may_refuse(self) -> bool:
        """Within the meter's refill from its debt floor after a loss was found: its buckets
        may be below the amount asked (how far below is the meters' own tests' concern,
        tests/test_rates_loss.py); outside it the meter here always admits."""
        lost_at = self.model.meters_lost_at
        return lost_at is not None and self.model.now < lost_at + policy_horizon(self.policy)

    def held_as(self, rid: str, entry: Entry | None, *, forge: bool = False) -> LeaseInfo:
        """The lease a holder names: its own facts, or (``forge``) another tenant or token."""
        if entry is None:
            return LeaseInfo(rid, "?", self.policy.name, 1, 0, 0.0)
        tenant, token = entry.tenant, entry.token
        if forge:
            if self.rnd.random() < 0.5:
                tenant = entry.tenant + "-other"
            else:
                token = entry.token + self.rnd.choice([-1, 1])
        return LeaseInfo(rid, tenant, self.policy.name, entry.units, token, entry.expiry / 1000)

    def release(self, rid: str, *, forge: bool = False) -> None:
        """Release a lease (or withdraw a waiting request) and check the reported state; a
        forged release (another tenant or token) is refused as fenced and changes nothing."""
        model = self.model
        entry = model.leases.get(rid)
        holder = entry or model.waiting.get(rid) or model.lost.get(rid)
        info = self.held_as(rid, holder, forge=forge)
        expected = ("unknown", 0)
        if entry is not None and forge:
            expected = ("fenced", 0)
        elif entry is not None:
            model.leases.pop(rid)
            expected = ("expired" if entry.expiry <= model.now else "released", entry.units)
        else:
            model.waiting.pop(rid, None)
            model.lost.pop(rid, None)  # its holder gives it up: it will not re-assert it
        model.purge()
        self.log.append(f"release {rid} forge={forge} -> expect {expected}")
        fenced_before = self.client.stats().fenced_refusals
        got = self.client.release(info)
        assert (got.state, got.units) == expected, self.trace(got)
        counted = self.client.stats().fenced_refusals - fenced_before
        assert counted == (1 if got.state == "fenced" else 0), self.trace(got)

    def renew(self, rid: str, *, forge: bool = False) -> None:
        """Renew a lease: lost if expired, fenced if forged, re-asserted while the group
        recovers, clamped to max_lease_ttl and never shortened, else the over-limit hint of
        the reference."""
        model = self.model
        ttl = self.rnd.choice([1.0, 5.0, 30.0, 30.0, 4000.0])  # 4000 s: above max_lease_ttl
        model.detect()
        entry = model.leases.get(rid)
        live = entry is not None and entry.expiry > model.now
        claim = entry if entry is not None else model.lost.get(rid)
        reassert = (
            entry is None
            and claim is not None
            and not forge
            and model.recovering
            and claim.expiry > model.now
            and self.fits(claim)
        )
        model.purge()
        self.log.append(f"renew {rid} live={live} forge={forge} reassert={reassert}")
        got = self.client.renew(self.held_as(rid, claim, forge=forge), ttl)
        if forge and entry is not None:
            assert (got.renewed, got.reason) == (False, "fenced"), self.trace(got)
            return
        assert got.renewed == (live or reassert), self.trace(got)
        if not got.renewed:
            assert got.reason == "lost", self.trace(got)
            return
        assert claim is not None
        assert got.reason == ("reasserted" if reassert else "renewed"), self.trace(got)
        granted = min(ttl, self.policy.max_lease_ttl)
        assert got.ttl == granted, self.trace(got)
        # Never shorter than the lease's expiry (a re-assert's claim capped at what a renewal
        # now could set): an expiry the holder learned earlier is never past the true one.
        held = claim.expiry
        if reassert:
            held = min(held, model.now + round(self.policy.max_lease_ttl * 1000))
        claim.expiry = max(model.now + round(granted * 1000), held)
        assert round(got.expires_at * 1000) == claim.expiry, self.trace(got)
        model.busy = max(model.busy, claim.expiry)
        if reassert:
            model.leases[rid] = model.lost.pop(rid)
        limit = model.limits([claim.tenant])[claim.tenant][0]
        used = model.used().get(claim.tenant, 0)
        assert got.used == used, self.trace(got)
        assert math.isclose(got.limit, limit, rel_tol=1e-9, abs_tol=1e-6), self.trace(got)
        assert got.over_limit == (used > limit + EPSILON), self.trace(got)

    def fits(self, claim: Entry) -> bool:
        """A re-asserted lease must fit in the capacity and its tenant's ceiling."""
        used = self.model.used()
        spec = self.policy.tenant(claim.tenant)
        if spec is None:
            return False
        group_ok = sum(used.values()) + claim.units <= self.policy.capacity
        return group_ok and used.get(claim.tenant, 0) + claim.units <= spec.ceiling

    def lose_state(self) -> None:
        """Delete the group's state keys (eviction, or a restart that kept the policy)."""
        keys = self.client.core.keyspace.group(self.policy.name)
        self.client.backend.connection(self.policy.name).delete(
            keys.demand, keys.exp, keys.info, keys.queue
        )
        self.model.lose_state()
        self.log.append(f"lose state; live leases {sorted(self.model.lost)}")

    def advance(self) -> None:
        """Move the pinned Redis time (sometimes exactly onto an expiry)."""
        expiries = [e.expiry for e in (*self.model.leases.values(), *self.model.waiting.values())]
        if expiries and self.rnd.random() < 0.3:
            target = self.rnd.choice(expiries) + self.rnd.choice([-1, 0, 0, 1])
            ms = max(0, target - self.model.now)
        else:
            ms = self.rnd.choice([1, 50, 500, 2000, 5000, 20_000])
        self.clock.advance(ms / 1000)
        self.model.now = self.clock.redis_ms()
        self.log.append(f"advance {ms}ms -> {self.model.now}")

    # -- checks ----------------------------------------------------------------

    def check_snapshot(self) -> None:
        """Every tenant's used, pending and limit/lo/up as the reference says, at one moment."""
        snap = self.client.snapshot(self.policy.name, self.names)
        used, pending = self.model.used(), self.model.pending()
        reference = self.model.limits(self.names)
        assert snap.used == sum(used.values()), self.trace(snap)
        for name, tenant in snap.tenants.items():
            assert tenant.used == used.get(name, 0), self.trace(snap)
            assert tenant.pending == pending.get(name, 0), self.trace(snap)
            if name in reference:
                got = (tenant.limit, tenant.lo, tenant.up)
                for a, b in zip(got, reference[name], strict=True):
                    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6), self.trace(snap)
        assert sum(used.values()) <= self.policy.capacity
        # The safety that matters after a loss: the leases holders may still be running (the
        # ones Redis counts, and the lost ones not re-asserted but not expired) never exceed
        # the capacity, because nothing new is admitted while a lost lease can be live.
        running = sum(e.units for e in model_live(self.model))
        assert running <= self.policy.capacity, self.trace(snap)

    def trace(self, got: object = None) -> str:
        """The last steps, for a failure message."""
        tail = "\n".join(self.log[-15:])
        return f"policy={self.policy}\n{tail}\ngot={got}"

    # -- the run ---------------------------------------------------------------

    def lease_pool(self) -> list[str]:
        """Ids to release or renew: mostly known leases, sometimes any id ever admitted."""
        if self.model.leases and self.rnd.random() < 0.9:
            return sorted(self.model.leases)
        return self.admitted_ids

    def step(self) -> None:
        """One random operation, then a snapshot check."""
        rnd, model = self.rnd, self.model
        roll = rnd.random()
        capacity = self.policy.capacity
        units = rnd.choice([1, 1, 2, 3, max(1, capacity // 4), max(1, capacity // 2), capacity + 1])
        units = max(1, min(units, rnd.randint(1, capacity + 1)))
        tenant = rnd.choice(self.names)
        if roll < 0.28:
            self.acquire(tenant, units, next(self.ids), wait=False)
        elif roll < 0.43:
            self.acquire(tenant, units, next(self.ids), wait=True)
        elif roll < 0.58 and model.waiting:
            rid = rnd.choice(sorted(model.waiting))
            entry = model.waiting[rid]
            self.acquire(entry.tenant, entry.units, rid, wait=True)
        elif roll < 0.61 and model.leases:
            rid = rnd.choice(sorted(model.leases))
            entry = model.leases[rid]
            self.acquire(entry.tenant, entry.units, rid, wait=False)
        elif roll < 0.63 and (model.leases or model.waiting):
            # A used id under another tenant or other units: refused, nothing changes.
            rid = rnd.choice(sorted({**model.leases, **model.waiting}))
            entry = model.leases.get(rid) or model.waiting[rid]
            if rnd.random() < 0.5:
                self.acquire(rnd.choice(self.names), entry.units + 1, rid, wait=rnd.random() < 0.5)
            else:
                other = [n for n in self.names if n != entry.tenant] or [entry.tenant]
                self.acquire(rnd.choice(other), entry.units, rid, wait=False)
        elif roll < 0.74 and (model.leases or self.admitted_ids):
            self.release(rnd.choice(self.lease_pool()))
        elif roll < 0.76 and model.leases:
            self.release(rnd.choice(sorted(model.leases)), forge=True)
        elif roll < 0.79 and model.waiting:
            self.release(rnd.choice(sorted(model.waiting)))
        elif roll < 0.86 and (model.leases or self.admitted_ids or model.lost):
            pool = self.lease_pool() + sorted(model.lost) * 3
            self.renew(rnd.choice(pool or sorted(model.lost)))
        elif roll < 0.88 and model.leases:
            self.renew(rnd.choice(sorted(model.leases)), forge=True)
        elif roll < 0.883:
            self.lose_state()
        else:
            self.advance()
        self.check_snapshot()


def replay_many(make_backend: object, steps: int) -> None:
    """Replays ``SEEDS`` random policies of ``steps // SEEDS`` steps each."""
    assert callable(make_backend)
    per_seed = max(1, steps // SEEDS)
    base = int(os.environ.get("RATEQUOTA_DIFF_SEED", "1"))
    for seed in range(base, base + SEEDS):
        rnd = random.Random(seed)
        policy = random_policy(rnd, f"diff-{seed}")
        clock = ManualClock()
        client = QuotaClient(
            backend=make_backend(),
            clock=clock,
            purge_limit=1000,  # the most allowed; far above the entries a seed ever holds
            pending_ttl=PENDING_TTL,
            catalog_ttl=3600.0,
        )
        try:
            client.apply_policy(Policy([policy]))
            replay = Replay(client, clock, policy, seed)
            for _ in range(per_seed):
                replay.step()
        finally:
            client.close()


@pytest.fixture
def fake_backends() -> object:
    """A factory of private fakeredis backends."""
    return lambda: embedded_backend(shared=False)


def test_lua_matches_reference_on_fakeredis(fake_backends: object) -> None:
    """Random operation sequences on fakeredis: every decision and limit equals the reference."""
    replay_many(fake_backends, total_steps())


@pytest.mark.real_redis
@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_lua_matches_reference_on_real_redis(real_redis: RedisServer, functions: bool) -> None:
    """The same random sequences on a real redis-server (its Lua, its float formatting), the
    scripts called as a function library and by ``EVALSHA`` (docs/design.md)."""

    def backend() -> SingleBackend:
        return url_backend(real_redis.url, socket_timeout=5.0, functions=functions)

    replay_many(backend, total_steps())


def test_tied_breakpoints_match_reference(make_client: MakeClient) -> None:
    """Many tenants sharing breakpoints (equal lo/w or up/w, weights 0.1/0.2/0.3 whose sums do not
    cancel exactly in floats): the script merges equal breakpoints before sorting, and its limits
    still equal the reference's, contended and not.
    """
    weights = [0.1, 0.2, 0.3, 1.0, 1.0, 2.0]
    tenants = tuple(
        TenantPolicy(f"t{i}", guarantee=i % 3, weight=weights[i % len(weights)]) for i in range(30)
    )
    for capacity in (60, 400):
        policy = GroupPolicy(f"ties{capacity}", capacity=capacity, tenants=tenants)
        clock = ManualClock()
        client = make_client(Policy([policy]), clock=clock, pending_ttl=60.0)
        demand: dict[str, float] = {}
        for i, tenant in enumerate(tenants):
            units = 1 + (i % 4) * 3
            flow = client.core.attempt(tenant.name, units, policy.name, f"w{i}", 60_000, wait=True)
            decision = client._run(flow)
            demand[tenant.name] = float(units)
            assert decision.reason in ("admitted", "tenant_limit", "group_full")
        names = [t.name for t in tenants]
        snap = client.snapshot(policy.name, names)
        alloc = group_allocation(policy, demand, extra=names)
        for name in names:
            assert snap.tenants[name].limit == pytest.approx(alloc.limit(name), abs=1e-6)
