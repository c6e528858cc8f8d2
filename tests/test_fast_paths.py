"""The scripts' fast paths decide exactly as their general path (lua/_fast.lua).

Every call runs twice, on two databases holding the same group: once with the
scripts as shipped (their memos switched on, as the function library runs
them), once with a copy whose fast paths are switched off
(``FAST_PATHS = false``). Hypothesis draws the policy and a sequence of
acquires (new ids, retries of a lease's or a waiting request's id, other
tenants' ids, waiting, shadow, metered, too large, unknown tenants), releases
(with the right token, a wrong one, withdrawals), renewals, batches of acquires and of
releases (each of these scripts has a fast path: acquire, release, renew, and the batches
take acquire's and release's request by request), clock steps that
make entries due, policy changes and lost keys; after each call both replies
and both databases, key for key with their expiries, must be equal (the state
keys' expiry values within the window a call may skip refreshing them). The same
property runs on fakeredis and on a real redis-server.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import fakeredis
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from ratequota.decision import LeaseInfo
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.protocol import (
    acquire_call,
    acquire_many_call,
    apply_policy_call,
    release_call,
    release_many_call,
    renew_call,
    settle_call,
)
from ratequota.engine.scripts import FAST_END, keeping_memos, load_scripts
from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from tests.redis_state import dump_keys
from tests.servers import RedisServer
from tests.test_differential import STRANGER, random_policy
from tests.test_rates_engine import random_metered_group

GROUP = "fp"
#: The scripts with a fast path; the random runs show each single call's taken (a batch is
#: answered wholly fast only when every request of it is: test_small_batches_take_...).
FAST_SCRIPTS = ("acquire", "release", "renew", "acquire_many", "release_many")
SINGLE_SCRIPTS = FAST_SCRIPTS[:3]
SWITCH = "local FAST_PATHS = true"
COUNTER = "fast-answers"
START_MS = 1_800_000_000_000
#: How far the two databases' expiries of a state key may differ (ms): half the keys' grace,
#: the window in which a call may skip refreshing them (keep_keys). Within it the paths may
#: choose differently: the general path's expiry also covers mfull when the call happened to
#: read it (a metered request earlier in its batch), the fast path's only when it charged a
#: meter. A refresh that is missed, or one that cuts the expiry short, differs by more.
TTL_SLACK_MS = 60_000


def acquires(extras: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    """Acquire ops: tenant, units, wait, request id (new, a lease's or a waiting request's)
    and one of ``extras`` (shadow, a long ttl, or METERED's meters, by name; "": none)."""
    return st.tuples(
        st.just("acquire"),
        st.integers(0, 8),  # tenant
        st.integers(1, 70),  # units
        st.booleans(),  # wait
        st.sampled_from(["new", "new", "new", "lease", "waiting"]),  # request id
        st.sampled_from(extras),
    )


#: acquire_many's requests: tenant, units, wait, a lease's id (a retry) or a new one, meters
#: (METERED's, by name; mostly none).
_batch_requests = st.lists(
    st.tuples(
        st.integers(0, 8),
        st.integers(1, 70),
        st.booleans(),
        st.booleans(),
        st.sampled_from(["", "", "", "meter", "meter_two", "meter_zero", "meter_bad"]),
    ),
    min_size=1,
    max_size=10,  # across FAST_BATCH (8)
)

operations = st.lists(
    st.one_of(
        acquires(["", "", "", "shadow", "meter", "long_ttl"]),
        st.tuples(st.just("release"), st.integers(0, 50), st.sampled_from(["ok", "ok", "bad"])),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
        st.tuples(st.just("renew"), st.integers(0, 50)),
        st.tuples(st.just("acquire_many"), _batch_requests),
        st.tuples(
            st.just("release_many"),
            st.lists(
                st.tuples(st.integers(0, 50), st.sampled_from(["ok", "ok", "bad"])),
                min_size=1,
                max_size=10,
            ),
        ),
        st.tuples(st.just("advance"), st.sampled_from([1, 400, 2500, 40_000, 700_000])),
        st.tuples(st.just("policy"), st.integers(0, 10**6)),
        st.tuples(st.just("lose"), st.sampled_from(["demand", "exp", "info", "fair", "all"])),
    ),
    min_size=20,
    max_size=60,
)

#: Calls of a group under pressure: acquires that mostly wait, retries of waiting requests (a
#: waiting acquire's polls), releases and withdrawals, a clock moving in small steps. The
#: general mix above seldom registers a request and then retries it; these draw it often, so
#: the refusals' fast path meets its corners (the queue's front, pacing, a retry that fits).
_pressed_acquire = st.tuples(
    st.just("acquire"),
    st.integers(0, 8),  # tenant
    st.integers(1, 60),  # units: mostly 1-3
    st.sampled_from([True, True, True, False]),  # wait
    st.sampled_from(["new", "waiting", "waiting", "waiting"]),  # request id
    st.just(""),
)
pressure = st.lists(
    st.one_of(
        _pressed_acquire,  # three acquires to each other call: the group stays full
        _pressed_acquire,
        _pressed_acquire,
        st.tuples(st.just("release"), st.integers(0, 50), st.just("ok")),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.sampled_from([1, 50, 400])),  # registrations live 2 s
    ),
    min_size=30,
    max_size=60,
)


#: The rate-meter amounts an acquire names, by its op's extra: the policy's ``tokens`` meter
#: (1, none, more than a burst of most policies' shares), with ``requests`` (a meter only some
#: policies have), and a name no policy has.
METERED: dict[str, dict[str, int]] = {
    "meter": {"tokens": 1},
    "meter_zero": {"tokens": 0},
    "meter_big": {"tokens": 40},
    "meter_two": {"tokens": 3, "requests": 1},
    "meter_bad": {"bogus": 1},
}

#: Calls of a group with rate meters that refill slowly: metered acquires (own rate, borrowing,
#: refusals by a meter, amounts of 0, unknown meters), settlements above and below the
#: estimate, releases, clock steps across a refill, lost keys (the meters' lost mark).
metered_operations = st.lists(
    st.one_of(
        acquires(["meter", "meter", "meter_zero", "meter_big", "meter_two", "meter_two"]),
        acquires(["meter_bad", "", "shadow"]),
        st.tuples(st.just("acquire_many"), _batch_requests),
        st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 60)),
        st.tuples(st.just("release"), st.integers(0, 50), st.just("ok")),
        st.tuples(st.just("advance"), st.sampled_from([1, 100, 700, 5_000, 40_000])),
        st.tuples(st.just("policy"), st.integers(0, 10**6)),
        st.tuples(st.just("lose"), st.sampled_from(["demand", "all"])),
    ),
    min_size=20,
    max_size=50,
)


def metered_policy(rnd: random.Random, name: str) -> GroupPolicy:
    """A group whose tenants share a ``tokens`` meter and sometimes a ``requests`` one, on the
    corners of the HTB constraints (tests/test_rates_engine.py), with a small or ample
    capacity for the leases."""
    return attrs.evolve(
        random_metered_group(rnd),
        name=name,
        capacity=rnd.choice([6, 40, 10**6]),
        max_lease_ttl=rnd.choice([30.0, 60.0]),
    )


def general_only(source: str) -> str:
    """A script's source with its fast paths switched off."""
    assert source.count(SWITCH) <= 1
    return source.replace(SWITCH, "local FAST_PATHS = false")


def counted(source: str) -> str:
    """A script's source that counts, in key ``COUNTER``, the calls its fast paths answer (the
    last ``return`` before each ``FAST_END``), so a run shows that the fast paths were taken."""
    end = len(source)
    while FAST_END in source[:end]:
        end = source.rindex(FAST_END, 0, end)
        at = source.rindex("\n  return ", 0, end) + 1
        source = f"{source[:at]}  redis.call('INCR', '{COUNTER}')\n{source[at:]}"
    return source


class Twin:
    """One group on two databases: shipped scripts on ``fast`` (their memos on), general-only
    on ``slow``."""

    def __init__(self, fast: Any, slow: Any) -> None:
        self.fast, self.slow = fast, slow
        self.shas: dict[str, tuple[str, str]] = {}
        self.fast_answers: Counter[str] = Counter()  # by script
        self.fast_refusals: Counter[str] = Counter()  # the fast answers that refused, by script

    def run(self, call: ScriptCall) -> Any:
        """Both replies, held equal, and both databases, held equal."""
        name = call.script.name
        if name not in self.shas:
            source = call.script.source
            self.shas[name] = (
                # The memos on, as the function library runs them: here they last one call,
                # so a batch's later requests find what its earlier ones wrote
                # (tests/test_memos.py holds them across calls).
                self.fast.script_load(keeping_memos(counted(source))),
                self.slow.script_load(general_only(source)),
            )
        fast_sha, slow_sha = self.shas[name]
        replies = []
        for conn, sha in ((self.fast, fast_sha), (self.slow, slow_sha)):
            try:
                replies.append(conn.evalsha(sha, len(call.keys), *call.keys, *call.args))
            except redis.ResponseError as exc:
                # The message without the script's name and line numbers (their texts differ).
                replies.append(("error", re.sub(r"f_[0-9a-f]+|:\d+:", "", str(exc))))
        assert replies[0] == replies[1], (call.script.name, call.args)
        fast_keys = dump_keys(self.fast, expiry=True)
        answered = fast_keys.pop(COUNTER.encode(), None)
        if answered is not None:
            self.fast_answers[name] += int(answered[1])
            if name == "acquire" and call.args[10] != "":
                self.fast_answers["metered"] += 1
            if name == "acquire" and replies[0][0] == 0:
                self.fast_refusals[name] += 1
                if call.args[6] == "1":  # wait: a retry of a waiting request
                    self.fast_refusals["waiting retry"] += 1
            self.fast.delete(COUNTER)
        assert fast_keys == dump_keys(self.slow, expiry=True), call.args
        # The state keys' expiries themselves, while the group's state is whole, within
        # TTL_SLACK_MS (both scripts compute them from the same pinned clock, and Redis runs
        # them down between the two calls by a few ms). With a sentinel lost, a call
        # refreshes the expiry whenever it writes (it cannot tell the keys' common expiry
        # from one key's), and a batch of releases writes on the fast path request by
        # request where the general path writes once what is left; the next check_state
        # refreshes all the keys alike.
        if whole(self.fast):
            state = KeySpace(prefix="fp").group(GROUP)
            for key in (state.demand, state.exp, state.info, state.fair):
                fast_ms, slow_ms = self.fast.pttl(key), self.slow.pttl(key)
                assert abs(fast_ms - slow_ms) <= TTL_SLACK_MS, (key, fast_ms, slow_ms, call.args)
        # The fast acquire counts exp as present when it has any member: it never exists
        # without its sentinel (lua/_fast.lua, acquire_reads).
        exp = KeySpace(prefix="fp").group(GROUP).exp
        for conn in (self.fast, self.slow):
            assert not conn.exists(exp) or conn.zscore(exp, "s:") is not None, call.args
        return replies[0]


def whole(conn: Any) -> bool:
    """True when the group's four state keys hold their sentinels (docs/design.md)."""
    keys = KeySpace(prefix="fp").group(GROUP)
    return (
        conn.hexists(keys.demand, "s:")
        and conn.zscore(keys.exp, "s:") is not None
        and conn.hexists(keys.info, "s:")
        and conn.zscore(keys.fair, "~") is not None
    )


@contextlib.contextmanager
def real_twin(server: RedisServer) -> Iterator[Twin]:
    """A Twin on a real redis-server's databases 0 (fast) and 1 (general only), emptied."""
    fast = redis.Redis(host="127.0.0.1", port=server.port, db=0)
    slow = redis.Redis(host="127.0.0.1", port=server.port, db=1)
    try:
        fast.flushdb()
        slow.flushdb()
        yield Twin(fast, slow)
    finally:
        fast.close()
        slow.close()


def crowded_policy(rnd: random.Random, name: str) -> GroupPolicy:
    """A small group that requests of 1-3 units fill at once: 2-4 tenants with guarantees of
    0-2 (lending all, half or none of them), some with a borrow limit."""
    count = rnd.randint(2, 4)
    tenants = tuple(
        TenantPolicy(
            f"t{i}",
            guarantee=rnd.randint(0, 2),
            lendable=rnd.choice([0.0, 0.5, 1.0]),
            borrow_limit=rnd.choice([None, 1, 2]),
            weight=rnd.choice([1.0, 2.0, 0.5]),
        )
        for i in range(count)
    )
    return GroupPolicy(name, capacity=rnd.randint(2 * count, 3 * count), tenants=tenants)


def run(
    twin: Twin,
    seed: int,
    ops: list[tuple[Any, ...]],
    policy_of: Callable[[random.Random, str], GroupPolicy] = random_policy,
) -> None:
    """Replays ``ops`` on both databases, comparing after every call; the group's policies
    come from ``policy_of``."""
    rnd = random.Random(seed)
    policy = policy_of(rnd, GROUP)
    keyspace = KeySpace(prefix="fp")
    keys = keyspace.group(GROUP)
    now = START_MS
    leases: list[LeaseInfo] = []
    waiting: list[tuple[str, str, int]] = []
    serial = 0
    twin.run(apply_policy_call(keyspace, policy, now_ms=now))
    for op in ops:
        kind = op[0]
        names = [t.name for t in policy.tenants] + [STRANGER]
        if kind == "acquire":
            _, who, amount, wait, id_kind, extra = op
            # Mostly small requests (the fast paths' ground), some up to past the capacity.
            units = 1 + amount % 3 if amount <= 50 else 1 + amount % (policy.capacity + 1)
            tenant = names[who % len(names)]
            serial += 1
            rid = f"r{serial}"
            if id_kind == "lease" and leases:
                held = leases[amount % len(leases)]
                rid, tenant, units = held.id, held.tenant, held.units
                if who % 3 == 0:
                    tenant = names[(who + 1) % len(names)]  # another tenant's id
            elif id_kind == "waiting" and waiting:
                rid, tenant, units = waiting[amount % len(waiting)]
            ttl = int(policy.max_lease_ttl * 1000)
            call = acquire_call(
                keyspace,
                GROUP,
                tenant,
                units,
                rid,
                ttl + 1 if extra == "long_ttl" else ttl,
                wait=wait,
                pending_ms=2000,
                purge=1 + who % 3,
                now_ms=now,
                shadow=extra == "shadow",
                meters=METERED.get(extra),
            )
            reply = twin.run(call)
            if reply[0] == 1 and reply[10] == 0:
                leases.append(LeaseInfo(rid, tenant, GROUP, units, int(reply[3]), reply[2] / 1000))
                waiting = [w for w in waiting if w[0] != rid]
            elif (
                reply[0] == 0
                and wait
                and reply[1] in (b"tenant_limit", b"group_full", b"meter")
                and all(w[0] != rid for w in waiting)
            ):
                waiting.append((rid, tenant, units))
        elif kind == "release" and leases:
            lease = leases.pop(op[1] % len(leases))
            token = lease.token if op[2] == "ok" else lease.token + 1
            twin.run(
                release_call(
                    keyspace, GROUP, lease.id, tenant=lease.tenant, token=token, purge=2, now_ms=now
                )
            )
            if op[2] == "bad":
                leases.append(lease)
        elif kind == "withdraw" and waiting:
            rid, tenant, _ = waiting.pop(op[1] % len(waiting))
            withdrawal = release_call(
                keyspace, GROUP, rid, tenant=tenant, token=0, purge=2, now_ms=now
            )
            twin.run(withdrawal)
        elif kind == "acquire_many":
            requests = []
            for who, amount, wait, retry, extra in op[1]:
                units = 1 + amount % 3 if amount <= 50 else 1 + amount % (policy.capacity + 1)
                tenant = names[who % len(names)]
                serial += 1
                rid = f"r{serial}"
                if retry and leases:
                    held = leases[amount % len(leases)]
                    rid, tenant, units = held.id, held.tenant, held.units
                ttl = int(policy.max_lease_ttl * 1000)
                requests.append((tenant, units, rid, ttl, wait, False, METERED.get(extra)))
            replies = twin.run(
                acquire_many_call(keyspace, GROUP, requests, pending_ms=2000, purge=2, now_ms=now)
            )
            for (tenant, units, rid, _, wait, _, _), reply in zip(requests, replies, strict=True):
                if reply[0] == 1 and reply[10] == 0:
                    leases.append(
                        LeaseInfo(rid, tenant, GROUP, units, int(reply[3]), reply[2] / 1000)
                    )
                    waiting = [w for w in waiting if w[0] != rid]
                elif (
                    reply[0] == 0
                    and wait
                    and reply[1] in (b"tenant_limit", b"group_full")
                    and all(w[0] != rid for w in waiting)
                ):
                    waiting.append((rid, tenant, units))
        elif kind == "release_many" and leases:
            named = []
            for pick, how in op[1]:
                if not leases:
                    break
                lease = leases.pop(pick % len(leases))
                token = lease.token if how == "ok" else lease.token + 1
                named.append((lease.id, lease.tenant, token))
                if how == "bad":
                    leases.append(lease)
            twin.run(release_many_call(keyspace, GROUP, named, purge=2, now_ms=now))
        elif kind == "settle" and leases:
            lease = leases[op[1] % len(leases)]
            twin.run(settle_call(keyspace, lease, {"tokens": op[2]}, now_ms=now))
        elif kind == "renew" and leases:
            lease = leases[op[1] % len(leases)]
            twin.run(renew_call(keyspace, lease, 30_000, purge=2, now_ms=now))
        elif kind == "advance":
            now += op[1]
        elif kind == "policy":
            policy = policy_of(random.Random(op[1]), GROUP)
            twin.run(apply_policy_call(keyspace, policy, now_ms=now))
        elif kind == "lose":
            lost = list(keys.all) if op[1] == "all" else [getattr(keys, op[1])]
            twin.fast.delete(*lost)
            twin.slow.delete(*lost)


def test_fast_paths_equal_general_path_on_fakeredis() -> None:
    """Any sequence of calls: same replies, same keys, fast paths on or off (fakeredis)."""
    answered, refused = [], []

    @given(seed=st.integers(0, 10**6), ops=operations)
    def prop(seed: int, ops: list[tuple[Any, ...]]) -> None:
        fast = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        twin = Twin(fast, fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        run(twin, seed, ops)
        answered.append(twin.fast_answers)
        refused.append(twin.fast_refusals)

    prop()
    taken = sum(answered, Counter())
    assert all(taken[name] > 0 for name in SINGLE_SCRIPTS), f"fast answers by script: {taken}"
    assert sum(refused, Counter())["acquire"] > 0, "no refusal took acquire's fast path"


@pytest.mark.real_redis
def test_fast_paths_equal_general_path_on_real_redis(real_redis: RedisServer) -> None:
    """The same property on a real redis-server, its two databases side by side."""
    fast = redis.Redis(host="127.0.0.1", port=real_redis.port, db=0)
    slow = redis.Redis(host="127.0.0.1", port=real_redis.port, db=1)
    answered, refused = [], []

    @given(seed=st.integers(0, 10**6), ops=operations)
    def prop(seed: int, ops: list[tuple[Any, ...]]) -> None:
        fast.flushdb()
        slow.flushdb()
        twin = Twin(fast, slow)
        run(twin, seed, ops)
        answered.append(twin.fast_answers)
        refused.append(twin.fast_refusals)

    try:
        prop()
    finally:
        fast.close()
        slow.close()
    taken = sum(answered, Counter())
    assert all(taken[name] > 0 for name in SINGLE_SCRIPTS), f"fast answers by script: {taken}"
    assert sum(refused, Counter())["acquire"] > 0, "no refusal took acquire's fast path"


@given(seed=st.integers(0, 10**6), ops=metered_operations)
def test_metered_acquires_equal_general_path(seed: int, ops: list[tuple[Any, ...]]) -> None:
    """Acquires naming rate meters that refill slowly, with their settlements (fakeredis):
    same replies, same keys, fast paths on or off."""
    twin = Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    run(twin, seed, ops, metered_policy)


@pytest.mark.real_redis
def test_metered_acquires_equal_general_path_on_real_redis(real_redis: RedisServer) -> None:
    """The same property on a real redis-server, its two databases side by side."""

    @given(seed=st.integers(0, 10**6), ops=metered_operations)
    def prop(seed: int, ops: list[tuple[Any, ...]]) -> None:
        with real_twin(real_redis) as twin:
            run(twin, seed, ops, metered_policy)

    prop()


def pressed_ops(rnd: random.Random) -> list[tuple[Any, ...]]:
    """A seeded sequence from the same mix as ``pressure``, drawn evenly: hypothesis favours
    its simplest values, and a check that the fast path was taken must not depend on them."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(40):
        kind = rnd.choice(["acquire"] * 3 + ["release", "withdraw", "advance"])
        if kind == "acquire":
            wait = rnd.random() < 0.75
            ops.append((kind, rnd.randint(0, 8), rnd.randint(1, 60), wait,
                        rnd.choice(["new", "waiting", "waiting", "waiting"]), ""))  # fmt: skip
        elif kind == "advance":
            ops.append((kind, rnd.choice([1, 50, 400])))
        elif kind == "release":
            ops.append((kind, rnd.randint(0, 50), "ok"))
        else:
            ops.append((kind, rnd.randint(0, 50)))
    return ops


def under_pressure(twin_of: Callable[[], contextlib.AbstractContextManager[Twin]]) -> Counter[str]:
    """Twenty seeded crowded runs (``pressed_ops``), each on a fresh twin from ``twin_of``,
    held equal call by call; the fast refusals they took."""
    refused: Counter[str] = Counter()
    for seed in range(20):
        with twin_of() as twin:
            run(twin, seed, pressed_ops(random.Random(seed)), crowded_policy)
            refused.update(twin.fast_refusals)
    return refused


@given(seed=st.integers(0, 10**6), ops=pressure)
def test_fast_paths_equal_general_path_under_pressure(
    seed: int, ops: list[tuple[Any, ...]]
) -> None:
    """Waiting acquires and their polls in a crowded group (fakeredis): same replies, same
    keys, fast paths on or off."""
    twin = Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    run(twin, seed, ops, crowded_policy)


def test_polls_of_waiting_requests_take_the_fast_path_in_crowded_runs() -> None:
    """In seeded crowded runs the refused retries of waiting requests are answered by the
    fast path, and every call equals the general path's (fakeredis)."""

    def fresh() -> contextlib.AbstractContextManager[Twin]:
        return contextlib.nullcontext(
            Twin(
                fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()),
            )
        )

    assert under_pressure(fresh)["waiting retry"] >= 20


@pytest.mark.real_redis
def test_polls_of_waiting_requests_take_the_fast_path_in_crowded_runs_on_real_redis(
    real_redis: RedisServer,
) -> None:
    """The same seeded runs on a real redis-server, its two databases side by side."""
    assert under_pressure(lambda: real_twin(real_redis))["waiting retry"] >= 20


def test_every_fast_path_can_be_switched_off() -> None:
    """The scripts with a fast path carry the switch this test flips, exactly once."""
    for name in FAST_SCRIPTS:
        assert load_scripts()[name].source.count(SWITCH) == 1, name


def plain_acquire(keyspace: KeySpace, tenant: str, rid: str) -> ScriptCall:
    """One unit for ``tenant`` under request id ``rid``, not waiting, at ``START_MS``."""
    return acquire_call(
        keyspace, GROUP, tenant, 1, rid, 30_000, wait=False, pending_ms=1, purge=1, now_ms=START_MS
    )


def test_plain_acquire_renew_and_release_take_the_fast_paths() -> None:
    """An acquire with room to spare, its renewal and its release are each answered by a fast
    path."""
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    keyspace = KeySpace(prefix="fp")
    policy = random_policy(random.Random(7), GROUP)
    tenant = policy.tenants[0].name
    scripts = load_scripts()

    def call(made: ScriptCall) -> Any:
        source = counted(made.script.source)
        return conn.eval(source, len(made.keys), *made.keys, *made.args)

    call(apply_policy_call(keyspace, policy, now_ms=START_MS))
    for _ in range(2):  # the first acquire writes the group's sentinels: the general path
        reply = call(plain_acquire(keyspace, tenant, "a"))
        assert reply[0] == 1
        lease = LeaseInfo("a", tenant, GROUP, 1, int(reply[3]), reply[2] / 1000)
        renewed = call(renew_call(keyspace, lease, 40_000, purge=1, now_ms=START_MS + 5))
        assert (renewed[0], renewed[1], renewed[2]) == (1, b"renewed", START_MS + 40_005)
        call(
            release_call(
                keyspace, GROUP, "a", tenant=tenant, token=int(reply[3]), purge=1, now_ms=START_MS
            )
        )
    assert int(conn.get(COUNTER) or 0) == 5, scripts["acquire"].sha


def test_state_written_by_the_previous_release_is_served_and_upgraded() -> None:
    """Pods of the previous release (same key schema) write the sentinels as "0" and no
    policy field ``wide``: the new scripts take that state as whole, answer exactly as on
    their own state, and replace the sentinels' values (the hashes become hashtables)."""
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    keyspace = KeySpace(prefix="fp")
    keys = keyspace.group(GROUP)
    policy = random_policy(random.Random(11), GROUP)
    tenant = policy.tenants[0].name

    def run(made: ScriptCall) -> Any:
        return conn.evalsha(made.script.sha, len(made.keys), *made.keys, *made.args)

    for spec in load_scripts().values():
        conn.script_load(spec.source)
    run(apply_policy_call(keyspace, policy, now_ms=START_MS))
    first = run(plain_acquire(keyspace, tenant, "a"))
    assert first[0] == 1
    conn.hset(keys.demand, "s:", 0)
    conn.hset(keys.info, "s:", 0)
    conn.hdel(keys.policy, "wide")
    second = run(plain_acquire(keyspace, tenant, "b"))
    assert (second[0], second[1], second[4]) == (1, b"admitted", 2)  # not "recovering"
    assert conn.hget(keys.demand, "s:") == conn.hget(keys.info, "s:")
    assert len(conn.hget(keys.info, "s:") or b"") > 64


def two_tenants(capacity: int) -> GroupPolicy:
    """The shapes' group: "a" lends half its guarantee of 4 and weighs 2, "b" lends all of its
    4; leases live up to a minute."""
    return GroupPolicy(
        GROUP,
        capacity=capacity,
        tenants=(
            TenantPolicy("a", guarantee=4, lendable=0.5, weight=2.0),
            TenantPolicy("b", guarantee=4),
        ),
        max_lease_ttl=60.0,
    )


def shapes(twin: Twin) -> list[tuple[str, Any]]:
    """The shapes the fast paths write in their own way, each call held equal to the general
    path by ``twin``: an admission that moves the tenant's breakpoints (it borrows) and its
    release, a release that leaves units held, the release of the group's last lease (the
    state's text goes), an acquire in a new hour (the ledger's keys not marked yet: it falls
    through) and the release of an expired lease (it falls through). Returns the replies."""
    keyspace = KeySpace(prefix="fp")
    policy = two_tenants(capacity=20)
    out: list[tuple[str, Any]] = []

    def acquire(rid: str, units: int, now: int, ttl: int = 30_000) -> int:
        made = acquire_call(
            keyspace, GROUP, "a", units, rid, ttl, wait=False, pending_ms=1, purge=1, now_ms=now
        )
        reply = twin.run(made)
        out.append((rid, reply))
        assert reply[0] == 1, reply
        return int(reply[3])

    def release(rid: str, token: int, now: int) -> None:
        made = release_call(keyspace, GROUP, rid, tenant="a", token=token, purge=1, now_ms=now)
        out.append((rid, twin.run(made)))

    twin.run(apply_policy_call(keyspace, policy, now_ms=START_MS))
    first = acquire("first", 1, START_MS)  # writes the sentinels: the general path
    second = acquire("second", 1, START_MS)
    borrowed = acquire("borrowed", 5, START_MS)  # 7 > the guarantee: breakpoints
    release("borrowed", borrowed, START_MS)
    release("second", second, START_MS)  # one unit still held
    release("first", first, START_MS)  # the last lease: no state left
    hour = START_MS + 3_600_000
    short = acquire("short", 2, hour, ttl=1_000)  # a new hour's ledger keys
    release("short", short, hour + 5_000)  # expired
    return out


def test_the_fast_paths_write_what_the_general_path_writes() -> None:
    """The fast paths' own writes (breakpoints moved both ways, units left, the state gone)
    and their fall-throughs (a new hour, an expired lease) equal the general path's."""
    fast = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    twin = Twin(fast, fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    replies = dict(shapes(twin))
    assert replies["short"][0] == b"expired"
    assert [replies[r][0] for r in ("borrowed", "second", "first")] == [b"released"] * 3
    # second, borrowed and their releases, first's release; not first, short's acquire or
    # short's release.
    assert twin.fast_answers == Counter(acquire=2, release=3)


@pytest.mark.real_redis
def test_the_fast_paths_write_what_the_general_path_writes_on_real_redis(
    real_redis: RedisServer,
) -> None:
    """The same calls on a real redis-server, its two databases side by side."""
    with real_twin(real_redis) as twin:
        replies = dict(shapes(twin))
        assert replies["short"][0] == b"expired"
        assert twin.fast_answers == Counter(acquire=2, release=3)


def renewal_shapes(twin: Twin) -> dict[str, Any]:
    """Renewals the fast path answers in its own way, each held equal to the general path by
    ``twin``: at a level of INF (the tenant borrows, nobody else asks), with a TTL above the
    policy's (clamped), and at a level a walk set (another tenant waits beyond the capacity:
    the renewed tenant is above its fair limit); and two it hands over, a wrong token and a
    lease already expired. Returns the replies by name."""
    keyspace = KeySpace(prefix="fp")
    policy = two_tenants(capacity=10)
    out: dict[str, Any] = {}
    now = START_MS

    def acquire(tenant: str, rid: str, units: int, *, wait: bool = False, ttl: int = 30_000) -> Any:
        made = acquire_call(
            keyspace, GROUP, tenant, units, rid, ttl, wait=wait, pending_ms=50_000, purge=1,
            now_ms=now,
        )  # fmt: skip
        return twin.run(made)

    def renew(name: str, lease: LeaseInfo, ttl: int) -> None:
        out[name] = twin.run(renew_call(keyspace, lease, ttl, purge=1, now_ms=now))

    twin.run(apply_policy_call(keyspace, policy, now_ms=now))
    acquire("a", "x", 1)  # writes the sentinels: the general path
    reply = acquire("a", "y", 6)  # 7 units for a, more than its guarantee
    lease = LeaseInfo("y", "a", GROUP, 6, int(reply[3]), reply[2] / 1000)
    renew("at_inf", lease, 30_000)
    renew("clamped", lease, 10**9)
    renew("fenced", attrs.evolve(lease, token=lease.token + 1), 30_000)
    short = acquire("a", "z", 1, ttl=1_000)
    assert short[0] == 1
    waits = acquire("b", "w", 8, wait=True)  # b waits: demand 15 > 10, a walked level
    assert waits[:2] in ([0, b"tenant_limit"], [0, b"group_full"]), waits
    now += 10
    renew("walked", lease, 30_000)
    now += 2_000
    renew("expired", LeaseInfo("z", "a", GROUP, 1, int(short[3]), short[2] / 1000), 30_000)
    return out


def test_the_fast_renewal_answers_what_the_general_path_answers() -> None:
    """Renewals at both levels the sums give and at a walked one, clamped, fenced and expired:
    the same replies and keys as the general path, the first four answered fast."""
    twin = Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    out = renewal_shapes(twin)
    assert out["at_inf"][:4] == [1, b"renewed", START_MS + 30_000, 0]
    assert out["clamped"][8] == 60_000  # the policy's max_lease_ttl
    assert out["fenced"][:2] == [0, b"fenced"]
    assert out["walked"][:2] == [1, b"renewed"]
    assert out["walked"][3] == 1, out["walked"]  # a holds 7, above its fair limit now
    assert float(out["walked"][5]) < 7
    assert out["expired"][:2] == [0, b"lost"]
    assert twin.fast_answers["renew"] == 3  # at_inf, clamped, walked


@pytest.mark.real_redis
def test_the_fast_renewal_answers_what_the_general_path_answers_on_real_redis(
    real_redis: RedisServer,
) -> None:
    """The same renewals on a real redis-server, its two databases side by side."""
    with real_twin(real_redis) as twin:
        out = renewal_shapes(twin)
        assert out["walked"][3] == 1
        assert twin.fast_answers["renew"] == 3


def refusal_shapes(twin: Twin) -> dict[str, Any]:
    """The refusals acquire's second fast path answers, each held equal to the general path by
    ``twin``, beside the ones it leaves to the general path. Capacity 8; "a" guarantees 4 and
    may borrow 2 more (ceiling 6), "b" guarantees 4; both lend what they do not use. Returns
    the replies by name."""
    keyspace = KeySpace(prefix="fp")
    policy = GroupPolicy(
        GROUP,
        capacity=8,
        tenants=(TenantPolicy("a", guarantee=4, borrow_limit=2), TenantPolicy("b", guarantee=4)),
        max_lease_ttl=60.0,
    )
    out: dict[str, Any] = {}
    now = START_MS

    def acquire(
        name: str, tenant: str, units: int, *, wait: bool = False, rid: str = "",
        shadow: bool = False,
    ) -> Any:  # fmt: skip
        made = acquire_call(keyspace, GROUP, tenant, units, rid or name, 30_000, wait=wait,
                            pending_ms=5_000, purge=2, now_ms=now, shadow=shadow)  # fmt: skip
        out[name] = twin.run(made)
        return out[name]

    twin.run(apply_policy_call(keyspace, policy, now_ms=now))
    acquire("a1", "a", 1)  # writes the sentinels: the general path
    acquire("a5", "a", 5)  # a holds its ceiling, 6; the level is INF
    acquire("over_ceiling", "a", 1)  # fresh, at INF: tenant_limit (fast)
    acquire("b2", "b", 2)  # the group is full: 8 of 8
    acquire("over_guarantee", "b", 3)  # fresh, at level 0: tenant_limit (fast)
    acquire("group_full", "b", 2)  # fresh, within b's limit of 4: group_full (fast)
    requests = [("a", 1, "m1", 30_000, False), ("b", 2, "m2", 30_000, False)]
    out["batch"] = twin.run(
        acquire_many_call(keyspace, GROUP, requests, pending_ms=5_000, purge=2, now_ms=now)
    )  # the same two refusals in one acquire_many, both on its fast paths
    acquire("w1", "b", 2, wait=True)  # registers: the general path
    now += 1_000
    acquire("w1_retry", "b", 2, wait=True, rid="w1")  # still group_full (fast), first in line
    acquire("w2", "b", 1, wait=True)  # registers behind w1: the general path
    now += 1_000
    # Redis's clock, not the pinned one, runs key expiries down: shorten them by hand, so the
    # retry's refresh of the keys' expiry (the queue's too) shows.
    keys = keyspace.group(GROUP)
    for conn in (twin.fast, twin.slow):
        for key in (keys.demand, keys.exp, keys.info, keys.queue, keys.fair):
            conn.pexpire(key, 10_000)
    acquire("w2_retry", "b", 1, wait=True, rid="w2")  # room kept for w1: tenant_limit (fast)
    for conn in (twin.fast, twin.slow):  # refreshed to max_lease_ttl and the grace, or more
        assert all(conn.pttl(key) > 60_000 for key in (keys.demand, keys.queue)), conn
    acquire("w2_try", "b", 1, rid="w2")  # a retry that does not wait: the general path
    acquire("b_fresh", "b", 1)  # b has requests waiting: the general path
    acquire("a_wait", "a", 1, wait=True)  # registers: the general path
    now += 1_000
    acquire("a_wait_retry", "a", 1, wait=True, rid="a_wait")  # tenant_limit (fast)
    acquire("shadowed", "a", 1, shadow=True)  # shadow mode admits: the general path
    token = int(out["a5"][3])
    twin.run(release_call(keyspace, GROUP, "a5", tenant="a", token=token, purge=2, now_ms=now))
    acquire("w1_fits", "b", 2, wait=True, rid="w1")  # now it fits: admitted by the general path
    return out


def test_refusals_that_need_no_walk_take_the_fast_path() -> None:
    """try_acquire refusals at a level of 0 or INF and refused retries of waiting requests are
    answered by acquire's second fast path, with the general path's replies and writes (the
    ledger's refusal counts, the registration's new expiry, the retry hints paced by place in
    line); the rest fall through."""
    twin = Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    out = refusal_shapes(twin)
    reasons = {name: (reply[0], reply[1]) for name, reply in out.items()}
    assert reasons["over_ceiling"] == (0, b"tenant_limit")
    assert reasons["over_guarantee"] == (0, b"tenant_limit")
    assert reasons["group_full"] == (0, b"group_full")
    assert reasons["w1_retry"] == (0, b"group_full")
    assert reasons["w2_retry"] == (0, b"tenant_limit")
    assert reasons["a_wait_retry"] == (0, b"tenant_limit")
    assert out["w1_retry"][8] == 20  # first in line: NEXT_IN_LINE_RETRY_MS
    assert reasons["shadowed"] == (1, b"tenant_limit")
    assert reasons["w1_fits"] == (1, b"admitted")
    assert [reply[1] for reply in out["batch"]] == [b"tenant_limit", b"group_full"]
    assert twin.fast_refusals["acquire"] == 6
    assert twin.fast_answers["acquire_many"] == 1


@pytest.mark.real_redis
def test_refusals_that_need_no_walk_take_the_fast_path_on_real_redis(
    real_redis: RedisServer,
) -> None:
    """The same calls on a real redis-server, its two databases side by side."""
    with real_twin(real_redis) as twin:
        out = refusal_shapes(twin)
        assert out["w1_fits"][:2] == [1, b"admitted"]
        assert twin.fast_refusals["acquire"] == 6
        assert twin.fast_answers["acquire_many"] == 1


def metered_shapes(twin: Twin) -> dict[str, Any]:
    """Metered acquires that acquire's fast path for meters answers, each held equal to the
    general path by ``twin``, beside the ones it leaves to the general path. The group's
    ``tokens`` meter refills 100 a second, ``requests`` 10 a minute; "a" owns half of each,
    "b" owns none (it only borrows), as strangers (the default share) and "c" (it may hold 1
    unit) do. Returns the replies by name."""
    keyspace = KeySpace(prefix="fp")
    policy = GroupPolicy(
        GROUP,
        capacity=100,
        tenants=(
            TenantPolicy(
                "a",
                guarantee=10,
                meters=(TenantMeter("tokens", rate=50), TenantMeter("requests", rate=5)),
            ),
            TenantPolicy("b", guarantee=10),
            TenantPolicy("c", borrow_limit=1),
        ),
        unknown_tenants="default",
        meters=(
            MeterPolicy("tokens", rate=100, burst=100),
            MeterPolicy("requests", rate=10, burst=10, per="minute"),
        ),
        max_lease_ttl=60.0,
    )
    out: dict[str, Any] = {}
    now = START_MS

    def acquire(
        name: str, tenant: str, meters: dict[str, int] | None, *, shadow: bool = False
    ) -> Any:
        made = acquire_call(keyspace, GROUP, tenant, 1, name, 30_000, wait=False, pending_ms=5_000,
                            purge=2, now_ms=now, meters=meters, shadow=shadow)  # fmt: skip
        out[name] = twin.run(made)
        return out[name]

    twin.run(apply_policy_call(keyspace, policy, now_ms=now))
    acquire("plain", "a", None)  # writes the sentinels: the general path
    acquire("own", "a", {"tokens": 10, "requests": 1})  # on a's own rate (fast)
    keys = keyspace.group(GROUP)
    for conn in (twin.fast, twin.slow):  # kept until a's requests bucket is full again (mfull:
        assert conn.pttl(keys.demand) > 300_000  # 3 min and a minute's slack), not 60 s + grace
    acquire("zero", "a", {"tokens": 0})  # nothing to charge (fast)
    acquire("borrow", "b", {"tokens": 10})  # b owns no rate: a borrow (fast)
    acquire("unknown_meter", "a", {"bogus": 1})  # bad_meter (general)
    acquire("too_large", "a", {"tokens": 1_000})  # above every bucket: refused (fast)
    # a has 40 of its own left: a borrow, refused (the group keeps a's guarantee) and marked
    acquire("past_own", "a", {"tokens": 45})  # as contending (fast)
    now += 200
    # a still contends from that borrow: admitted on its own rate again, its mark refreshed
    acquire("own_contending", "a", {"tokens": 5})  # (fast)
    acquire("stranger", "s", {"tokens": 0})  # the default share, nothing to charge (fast)
    acquire("stranger_borrow", "s", {"tokens": 2})  # borrowing behind a and b (fast)
    # Redis's clock, not the pinned one, runs key expiries down: shorten them by hand, so the
    # refusal's refresh of the keys' expiry (it writes b's contention mark) shows.
    for conn in (twin.fast, twin.slow):
        for key in (keys.demand, keys.exp, keys.info, keys.fair):
            conn.pexpire(key, 10_000)
    acquire("refused", "b", {"tokens": 45})  # the group keeps a's guarantee: refused (fast)
    acquire("shadowed", "b", {"tokens": 45}, shadow=True)  # admitted: the general path
    twin.run(release_call(keyspace, GROUP, "own", tenant="a", token=int(out["own"][3]), purge=2,
                          now_ms=now))  # fmt: skip
    for conn in (twin.fast, twin.slow):
        conn.delete(keys.demand)  # the buckets are lost before they are full again
    acquire("lost", "a", {"tokens": 1})  # recovering: the general path notes the loss (ml)
    now += 31_000  # past the recovery window
    acquire("after_loss", "a", {"tokens": 5})  # buckets from their debt floor at ml (fast)
    acquire("after_loss_zero", "b", {"tokens": 0})  # (fast)
    # A batch (at most FAST_METER_BATCH): unmetered first, then metered, on acquire_many's
    # two fast parts (its second taking over the first's reads of the request it stopped at).
    requests = [
        ("a", 1, "mb1", 30_000, False),
        ("a", 1, "mb2", 30_000, False, False, {"tokens": 2}),
        ("b", 1, "mb3", 30_000, False, False, {"tokens": 1}),
    ]
    made = acquire_many_call(keyspace, GROUP, requests, pending_ms=5_000, purge=2, now_ms=now)
    out["batch"] = twin.run(made)
    # A request naming a meter the policy lacks is refused for it (bad_meter) before its
    # lease is decided, even when the lease would not fit (c at its ceiling of 1): the
    # general path's answer.
    requests = [
        ("c", 1, "mb5", 30_000, False, False, {"tokens": 0}),
        ("c", 1, "mb6", 30_000, False, False, {"bogus": 1}),
        ("c", 1, "mb7", 30_000, False, False, {"tokens": 0}),
    ]
    made = acquire_many_call(keyspace, GROUP, requests, pending_ms=5_000, purge=2, now_ms=now)
    out["bad_batch"] = twin.run(made)
    return out


def meter_rows(reply: Any) -> list[tuple[Any, ...]]:
    """Each meter's (name, admitted, reason, path) in an acquire's reply."""
    rows = reply[11] if len(reply) > 11 else []
    return [(rows[i], rows[i + 1], rows[i + 2], rows[i + 6]) for i in range(0, len(rows), 9)]


@pytest.fixture(params=["fakeredis", pytest.param("real", marks=pytest.mark.real_redis)])
def twin(request: pytest.FixtureRequest) -> Iterator[Twin]:
    """A Twin on two fakeredis servers, or on a real redis-server's databases 0 and 1."""
    if request.param == "fakeredis":
        yield Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                   fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    else:
        with real_twin(request.getfixturevalue("real_redis")) as made:
            yield made


def test_metered_acquires_take_the_fast_path(twin: Twin) -> None:
    """Acquires whose lease fits are answered by acquire's fast path for meters, admitted
    (on their own rate, borrowing, or charging nothing) or refused by a meter, with the
    general path's replies and writes (buckets, contention marks, mfull, the reservations,
    the ledger's tokens reserved or its refusal count, the keys' expiry, lost buckets
    restarting at their debt floor); unknown meters and shadow mode's admissions of a
    refusal fall through. On fakeredis and on a real redis-server."""
    out = metered_shapes(twin)
    assert meter_rows(out["own"]) == [(b"tokens", 1, b"admitted", b"rate"),
                                      (b"requests", 1, b"admitted", b"rate")]  # fmt: skip
    assert meter_rows(out["zero"]) == [(b"tokens", 1, b"admitted", b"")]
    assert meter_rows(out["borrow"]) == [(b"tokens", 1, b"admitted", b"borrow")]
    assert out["unknown_meter"][:2] == [-1, b"bad_meter"]
    assert out["too_large"][:2] == [0, b"meter"]
    assert meter_rows(out["past_own"]) == [(b"tokens", 0, b"group", b"")]
    assert meter_rows(out["own_contending"]) == [(b"tokens", 1, b"admitted", b"rate")]
    assert meter_rows(out["stranger"]) == [(b"tokens", 1, b"admitted", b"")]
    assert meter_rows(out["stranger_borrow"]) == [(b"tokens", 1, b"admitted", b"borrow")]
    assert meter_rows(out["refused"]) == [(b"tokens", 0, b"group", b"")]
    assert out["refused"][8] > 0  # the retry hint
    assert out["shadowed"][:2] == [1, b"meter"]
    assert out["lost"][:2] == [0, b"recovering"]
    assert meter_rows(out["after_loss"]) == [(b"tokens", 1, b"admitted", b"rate")]
    assert meter_rows(out["after_loss_zero"]) == [(b"tokens", 1, b"admitted", b"")]
    assert [reply[:2] for reply in out["batch"]] == [[1, b"admitted"]] * 3
    assert meter_rows(out["batch"][1]) == [(b"tokens", 1, b"admitted", b"rate")]
    assert meter_rows(out["batch"][2]) == [(b"tokens", 1, b"admitted", b"borrow")]
    assert [reply[:2] for reply in out["bad_batch"]] == [
        [1, b"admitted"],
        [-1, b"bad_meter"],
        [0, b"tenant_limit"],
    ]
    assert twin.fast_answers["metered"] == 11
    assert twin.fast_answers["acquire_many"] == 1


def test_small_batches_take_the_fast_paths() -> None:
    """A batch of small acquires and one of their releases are answered wholly by the fast
    paths; a batch above FAST_BATCH, and one whose second request is a retry, by the general
    path from the request it cannot answer on; every call equal to the general path alone."""
    twin = Twin(fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                fakeredis.FakeRedis(server=fakeredis.FakeServer()))  # fmt: skip
    keyspace = KeySpace(prefix="fp")
    policy = GroupPolicy(GROUP, capacity=100, tenants=(TenantPolicy("a", guarantee=50),))
    twin.run(apply_policy_call(keyspace, policy, now_ms=START_MS))

    def batch(ids: list[str]) -> list[Any]:
        requests = [("a", 1, rid, 30_000, False) for rid in ids]
        made = acquire_many_call(keyspace, GROUP, requests, pending_ms=1, purge=1, now_ms=START_MS)
        replies = twin.run(made)
        assert [r[0] for r in replies] == [1] * len(ids), replies
        return list(replies)

    batch(["first"])  # writes the sentinels: the general path
    small = batch(["b1", "b2", "b3"])
    assert twin.fast_answers["acquire_many"] == 1
    batch([f"c{i}" for i in range(9)])  # above FAST_BATCH: the general path
    retried = batch(["d1", "b2", "d2"])  # b2's retry: the fast path answers d1 only
    assert retried[1][10] == 1  # the replay flag
    assert twin.fast_answers["acquire_many"] == 1
    leases = [(rid, "a", int(r[3])) for rid, r in zip(["b1", "b2", "b3"], small, strict=True)]
    made = release_many_call(keyspace, GROUP, leases, purge=1, now_ms=START_MS)
    assert [r[0] for r in twin.run(made)] == [b"released"] * 3
    assert twin.fast_answers["release_many"] == 1
