"""The usage ledger (docs/usage.md) written by the lease scripts, checked against a model.

The scripts run on fakeredis and on a real redis-server with a pinned clock,
so expiry and hour boundaries are exact. A model of the group's leases says
when each one ended (released: at the release, if still live; expired: at its
expiry, learned by the next call that purges) and so what every hour of the
ledger must hold: per tenant the unit·ms and the number of the leases that
ended in it, and the refusals by reason. Histories mix fenced, repeated and
late releases, renewals of lost leases, release_many with duplicates and
replayed acquires: whatever the order, each lease is counted exactly once,
with exactly its duration. (The admission time is read from the fencing
token, exact below 1000 tokens per ms: the last test pins what happens
above.)
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter, defaultdict
from typing import Any

import attrs
import fakeredis
import pytest
from hypothesis import given, settings

from ratequota.engine import protocol
from ratequota.engine.keys import KeySpace
from ratequota.engine.ledger import HOUR_MS, ledger_hours, ledger_keys, usage_rows
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.servers import RedisServer
from tests.strategies import ledger_histories

# An hour boundary plus a little: histories start near one.
NOW = 500_000 * HOUR_MS - 5_000
TENANTS = ("a", "b", "c")
POLICY = GroupPolicy(
    "g",
    capacity=6,
    tenants=(TenantPolicy("a", guarantee=2), TenantPolicy("b", guarantee=2)),
    unknown_tenants="default",
    max_lease_ttl=1800.0,
)
PURGE = 1000  # every expired entry is purged by every call: the model's rule


@attrs.define
class Lease:
    """A lease of the model: admitted at ``start``, live until ``expiry`` unless ended."""

    id: str
    tenant: str
    units: int
    token: int
    start: int
    expiry: int
    ended: bool = False


@attrs.define
class Ledger:
    """The model: the group's live leases and what each ledger hour must hold."""

    conn: Any
    keyspace: KeySpace
    group: str
    now: int = NOW
    leases: list[Lease] = attrs.Factory(list)
    expect: dict[tuple[int, str], Counter[str]] = attrs.Factory(lambda: defaultdict(Counter))
    held_ms: int = 0  # Σ units × duration over the leases that ended
    ids: itertools.count[int] = attrs.Factory(itertools.count)

    def run(self, call: protocol.ScriptCall) -> Any:
        """One script call at the model's time."""
        return self.conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)

    def end(self, lease: Lease, at: int) -> None:
        """``lease`` ended at ``at``, as learned by a call at the model's time."""
        lease.ended = True
        held = lease.units * (at - lease.start)
        self.held_ms += held
        row = self.expect[(self.now // HOUR_MS, lease.tenant)]
        row["rq"] += 1
        if held:
            row["us"] += held

    def purge(self) -> None:
        """What every call does: the expired leases end at their expiry."""
        for lease in self.leases:
            if not lease.ended and lease.expiry <= self.now:
                self.end(lease, lease.expiry)

    def pick(self, index: int) -> Lease | None:
        return self.leases[index % len(self.leases)] if self.leases else None

    def acquire(self, tenant: str, units: int, ttl: int, shadow: bool) -> None:
        lease_id = f"l{next(self.ids)}"
        call = protocol.acquire_call(
            self.keyspace,
            self.group,
            tenant,
            units,
            lease_id,
            ttl,
            wait=False,
            pending_ms=2000,
            purge=PURGE,
            now_ms=self.now,
            shadow=shadow,
        )
        self.purge()
        reply = self.run(call)
        status, reason = int(reply[0]), reply[1].decode()
        row = self.expect[(self.now // HOUR_MS, tenant)]
        if status == 1:
            self.leases.append(
                Lease(lease_id, tenant, units, int(reply[3]), self.now, self.now + ttl)
            )
            if reason != "admitted":
                row[f"sh:{reason}"] += 1
        else:
            row[f"rf:{reason}"] += 1

    def replay(self, lease: Lease) -> None:
        """The same acquire again (its reply was lost): the same lease, nothing counted."""
        self.purge()
        call = protocol.acquire_call(
            self.keyspace,
            self.group,
            lease.tenant,
            lease.units,
            lease.id,
            60_000,
            wait=False,
            pending_ms=2000,
            purge=PURGE,
            now_ms=self.now,
        )
        reply = self.run(call)
        if all(x.ended for x in self.leases if x.id == lease.id):
            # The id is free again: a new lease under the old id.
            status, reason = int(reply[0]), reply[1].decode()
            if status == 1:
                self.leases.append(
                    Lease(
                        lease.id,
                        lease.tenant,
                        lease.units,
                        int(reply[3]),
                        self.now,
                        self.now + 60_000,
                    )
                )
            else:
                self.expect[(self.now // HOUR_MS, lease.tenant)][f"rf:{reason}"] += 1
        else:
            assert int(reply[10]) == 1

    def release(self, lease: Lease, right_token: bool) -> None:
        token = lease.token if right_token else lease.token + 1
        call = protocol.release_call(
            self.keyspace,
            self.group,
            lease.id,
            tenant=lease.tenant,
            token=token,
            purge=PURGE,
            now_ms=self.now,
        )
        self.run(call)
        self._released(lease, token)
        self.purge()

    def _released(self, lease: Lease, token: int) -> None:
        # The lease under this id now (a replay may have reused it).
        live = [x for x in self.leases if x.id == lease.id and not x.ended]
        for current in live:
            if current.token == token:
                self.end(current, min(self.now, current.expiry))

    def release_many(self, picked: list[Lease]) -> None:
        named = [(x.id, x.tenant, x.token) for x in picked]
        call = protocol.release_many_call(
            self.keyspace, self.group, named, purge=PURGE, now_ms=self.now
        )
        self.run(call)
        for x in picked:
            self._released(x, x.token)
            self.purge()

    def renew(self, lease: Lease, ttl: int) -> None:
        call = protocol.renew_call(
            self.keyspace,
            attrs.evolve(_info(lease), group=self.group),
            ttl,
            purge=PURGE,
            now_ms=self.now,
        )
        self.purge()
        reply = self.run(call)
        live = [x for x in self.leases if x.id == lease.id and not x.ended]
        if int(reply[0]) == 1:
            (current,) = live
            # A renewal never moves an expiry earlier (renew.lua).
            current.expiry = max(current.expiry, self.now + int(reply[8]))

    def stored(self) -> dict[tuple[int, str], Counter[str]]:
        """Every ledger hour of the group, as the model's counters."""
        out: dict[tuple[int, str], Counter[str]] = defaultdict(Counter)
        pattern = f"{self.keyspace.ledger(self.group, 0)[:-1]}*"
        for key in self.conn.scan_iter(match=pattern):
            hour = int(key.decode().rsplit(":", 1)[1])
            for field, value in self.conn.hgetall(key).items():
                if field == b"~":  # the placeholder keeping both declared hours in existence
                    continue
                tenant, _, counter = field.decode().rpartition("|")
                out[(hour, tenant)][counter] += int(value)
        return out


def _info(lease: Lease) -> Any:
    from ratequota.decision import LeaseInfo

    return LeaseInfo(lease.id, lease.tenant, "g", lease.units, lease.token, lease.expiry / 1000)


def _load(conn: Any) -> None:
    for spec in load_scripts().values():
        conn.script_load(spec.source)


def _play(conn: Any, history: list[tuple[Any, ...]]) -> Ledger:
    keyspace = KeySpace(prefix=f"t{uuid.uuid4().hex[:8]}")
    model = Ledger(conn, keyspace, "g")
    model.run(protocol.apply_policy_call(keyspace, POLICY, now_ms=NOW))
    for step in history:
        kind = step[0]
        if kind == "acquire":
            _, tenant, units, ttl, shadow = step
            model.acquire(TENANTS[tenant], units, ttl, shadow)
        elif kind == "advance":
            model.now += step[1] if step[1] >= 0 else HOUR_MS - model.now % HOUR_MS
        elif kind == "release_many":
            picked = [x for x in (model.pick(i) for i in step[1]) if x is not None]
            if picked:
                model.release_many(picked)
        else:
            lease = model.pick(step[1])
            if lease is None:
                continue
            if kind == "release":
                model.release(lease, step[2])
            elif kind == "renew":
                model.renew(lease, step[2])
            else:
                model.replay(lease)
    # Every lease ends: an hour later, one call purges what is still live.
    model.now += 2 * HOUR_MS
    model.acquire("a", 1, 1, False)
    model.now += 2
    model.acquire("a", 1, 1, False)
    return model


def _check(model: Ledger) -> None:
    expect = {k: +v for k, v in model.expect.items() if +v}
    assert model.stored() == expect
    assert all(x.ended for x in model.leases[:-1])
    # The ledger's unit·ms are exactly the leases' durations, each lease once.
    stored = model.stored()
    assert sum(c["us"] for c in stored.values()) == model.held_ms
    ended = [x for x in model.leases if x.ended]
    assert sum(c["rq"] for c in stored.values()) == len(ended)
    # The ledger stores nothing beside a lease: info holds the live leases and its sentinel.
    info = model.keyspace.group(model.group).info
    fields = {f.decode() for f in model.conn.hkeys(info)}
    assert fields == {"s:"} | {f"L{x.id}" for x in model.leases if not x.ended}


@given(history=ledger_histories())
def test_ledger_counts_every_lease_once_with_its_duration_fake(
    history: list[tuple[Any, ...]],
) -> None:
    """On fakeredis: per hour and tenant the ledger holds exactly the leases that ended in
    that hour, with their unit·ms, and the refusals by reason; in all, each lease once."""
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    _load(conn)
    _check(_play(conn, history))


@pytest.mark.real_redis
@settings(max_examples=25)
@given(history=ledger_histories())
def test_ledger_counts_every_lease_once_with_its_duration_real(
    real_redis: RedisServer, history: list[tuple[Any, ...]]
) -> None:
    """The same on a real redis-server (each example under its own key prefix)."""
    conn = real_redis.client()
    try:
        _load(conn)
        _check(_play(conn, history))
    finally:
        conn.close()


# -- the hour boundary, waiting requests, retention, ledger_add ------------------------------


def _fresh() -> tuple[Any, KeySpace]:
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    _load(conn)
    keyspace = KeySpace()
    conn.evalsha(*_wire(protocol.apply_policy_call(keyspace, POLICY, now_ms=NOW)))
    return conn, keyspace


def _wire(call: protocol.ScriptCall, keys: list[str] | None = None) -> list[Any]:
    named = list(call.keys) if keys is None else keys
    return [call.script.sha, len(named), *named, *call.args]


def _hours(conn: Any) -> dict[int, dict[bytes, bytes]]:
    """Every ledger hour with counts, without the "~" placeholders."""
    out = {}
    for key in conn.scan_iter(match="*:led:*"):
        fields = {f: v for f, v in conn.hgetall(key).items() if f != b"~"}
        if fields:
            out[int(key.decode().rsplit(":", 1)[1])] = fields
    return out


@pytest.mark.parametrize("skew_s", [-1799, -60, -1, 0, 1, 60, 1799])
@pytest.mark.parametrize("offset_ms", [-1, 0, 1])
def test_the_script_files_under_its_own_hour_whatever_the_callers_clock(
    skew_s: int, offset_ms: int
) -> None:
    """Around an hour boundary, a caller whose clock is up to half an hour off names the
    script's hour among its two keys: the refusal lands in the hour of the script's time."""
    conn, keyspace = _fresh()
    at = 500_001 * HOUR_MS + offset_ms  # the script's time
    call = protocol.acquire_call(
        keyspace, "g", "a", 99, "x", 1000, wait=False, pending_ms=2000, purge=8, now_ms=at
    )
    keys = [*call.keys[:-2], *ledger_keys(keyspace, "g", at + skew_s * 1000)]
    assert conn.evalsha(*_wire(call, keys))[1] == b"too_large"
    assert _hours(conn) == {at // HOUR_MS: {b"a|rf:too_large": b"1"}}


def test_a_clock_off_by_more_than_half_an_hour_files_under_the_nearest_named_hour() -> None:
    """Beyond half an hour of skew neither key names the script's hour: the nearer one is
    used (documented; a pod that far off is misconfigured)."""
    conn, keyspace = _fresh()
    at = 500_001 * HOUR_MS + 10
    call = protocol.acquire_call(
        keyspace, "g", "a", 99, "x", 1000, wait=False, pending_ms=2000, purge=8, now_ms=at
    )
    caller = at + 100 * 60_000  # 100 minutes ahead: it names hours +1 and +2
    assert ledger_hours(caller) == (at // HOUR_MS + 1, at // HOUR_MS + 2)
    conn.evalsha(*_wire(call, [*call.keys[:-2], *ledger_keys(keyspace, "g", caller)]))
    assert list(_hours(conn)) == [at // HOUR_MS + 1]


def test_a_waiting_request_is_counted_once_and_shadow_admissions_apart() -> None:
    """A waiting acquire retried under the same id is one refusal, not one per retry; a
    would-be refusal admitted in shadow mode is counted as sh:<reason>, not as a refusal."""
    conn, keyspace = _fresh()
    hold = protocol.acquire_call(
        keyspace, "g", "b", 6, "full", 60_000, wait=False, pending_ms=2000, purge=8, now_ms=NOW
    )
    assert int(conn.evalsha(*_wire(hold))[0]) == 1
    for retry in range(3):
        call = protocol.acquire_call(
            keyspace,
            "g",
            "a",
            1,
            "w",
            60_000,
            wait=True,
            pending_ms=2000,
            purge=8,
            now_ms=NOW + retry,
        )
        assert int(conn.evalsha(*_wire(call))[0]) == 0
    shadow = protocol.acquire_call(
        keyspace,
        "g",
        "c",
        1,
        "s",
        60_000,
        wait=False,
        pending_ms=2000,
        purge=8,
        now_ms=NOW,
        shadow=True,
    )
    assert conn.evalsha(*_wire(shadow))[:2] == [1, b"group_full"]
    assert _hours(conn) == {NOW // HOUR_MS: {b"a|rf:group_full": b"1", b"c|sh:group_full": b"1"}}


@pytest.mark.parametrize("retention", [None, 0.0, 3600.0])
def test_every_ledger_hour_expires_its_retention_after_the_hour_ends(
    retention: float | None,
) -> None:
    """The hour's hash lives until its hour ends plus the group's usage_retention (7 days by
    default), measured on the script's clock."""
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    _load(conn)
    keyspace = KeySpace()
    policy = POLICY if retention is None else attrs.evolve(POLICY, usage_retention=retention)
    keep_ms = 7 * 24 * HOUR_MS if retention is None else int(retention * 1000)
    conn.evalsha(*_wire(protocol.apply_policy_call(keyspace, policy, now_ms=NOW)))
    call = protocol.acquire_call(
        keyspace, "g", "a", 99, "x", 1000, wait=False, pending_ms=2000, purge=8, now_ms=NOW
    )
    conn.evalsha(*_wire(call))
    for hour in ledger_hours(NOW):  # both named hours exist: the placeholder's expiry too
        left = (hour + 1) * HOUR_MS - NOW + keep_ms
        assert left - 50 <= conn.pttl(keyspace.ledger("g", hour)) <= left


def test_ledger_add_writes_one_counter_at_once() -> None:
    """ledger_add (for the meters: tokens reserved and settled) adds to a tenant's counter in
    the hour of the given time and sets the hour's expiry, like the batched writes."""
    from ratequota.engine.scripts import LIBRARY, _lua_dir, library_parts, link

    folder = _lua_dir()
    parts = library_parts("\n".join((folder / f"{n}.lua").read_text() for n in LIBRARY))
    body = "ledger_add(tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4]))\nreturn 1"
    source = f"{link(parts, body)}\n{body}"
    conn, keyspace = _fresh()
    keys = [*keyspace.group("g").all, *ledger_keys(keyspace, "g", NOW)]
    for amount in (1200, 34):
        conn.eval(source, len(keys), *keys, NOW, "we|ird", "tr", amount)
    assert _hours(conn) == {NOW // HOUR_MS: {b"we|ird|tr": b"1234"}}
    (row,) = usage_rows("g", [NOW // HOUR_MS], [conn.hgetall(keys[-2])])
    assert (row.tenant, row.tokens_reserved) == ("we|ird", 1234)


@pytest.mark.real_redis
@pytest.mark.parametrize(("tenants", "bound"), [(8, 160), (32, 160), (200, 400)])
def test_a_tenant_hour_costs_what_docs_usage_says(
    real_redis: RedisServer, tenants: int, bound: int
) -> None:
    """MEMORY USAGE of one hour written by the scripts (a lease released and a refusal per
    tenant, 12-character names): at most the bytes per tenant-hour docs/usage.md states
    (listpack up to hash-max-listpack-entries fields, hashtable beyond)."""
    conn = real_redis.client()
    try:
        _load(conn)
        keyspace = KeySpace()
        group = GroupPolicy("g", capacity=tenants, unknown_tenants="default", max_lease_ttl=60.0)
        conn.evalsha(*_wire(protocol.apply_policy_call(keyspace, group, now_ms=NOW)))
        for i in range(tenants):
            tenant = f"tenant-{i:05d}"
            call = protocol.acquire_call(
                keyspace,
                "g",
                tenant,
                1,
                tenant,
                60_000,
                wait=False,
                pending_ms=2000,
                purge=8,
                now_ms=NOW,
            )
            token = int(conn.evalsha(*_wire(call))[3])
            conn.evalsha(
                *_wire(
                    protocol.release_call(
                        keyspace,
                        "g",
                        tenant,
                        tenant=tenant,
                        token=token,
                        purge=8,
                        now_ms=NOW + 1234,
                    )
                )
            )
            refused = protocol.acquire_call(
                keyspace,
                "g",
                tenant,
                tenants + 1,
                "big",
                60_000,
                wait=False,
                pending_ms=2000,
                purge=8,
                now_ms=NOW,
            )
            conn.evalsha(*_wire(refused))
        key = keyspace.ledger("g", NOW // HOUR_MS)
        assert conn.hlen(key) == 3 * tenants + 1  # and the "~" placeholder
        assert int(conn.memory_usage(key, samples=0)) <= bound * tenants
    finally:
        conn.close()


def test_above_1000_tokens_in_one_ms_a_lease_is_counted_from_its_tokens_ms() -> None:
    """The admission time is floor(token / 1000): exact while a group hands out fewer than
    1000 tokens per ms; the 1001st admission in one ms is counted from the next ms, so 1,200
    leases of one ms held 10 ms count 1,000 x 10 + 200 x 9 unit·ms (docs/usage.md)."""
    conn, keyspace = _fresh()
    wide = attrs.evolve(POLICY, capacity=2000, unknown_tenants="default")
    conn.evalsha(*_wire(protocol.apply_policy_call(keyspace, wide, now_ms=NOW)))
    requests = [("c", 1, f"x{i}", 60_000, False) for i in range(1200)]
    many = protocol.acquire_many_call(keyspace, "g", requests, pending_ms=2000, purge=8, now_ms=NOW)
    replies = conn.evalsha(*_wire(many))
    assert all(int(r[0]) == 1 for r in replies)
    named = [(f"x{i}", "c", int(r[3])) for i, r in enumerate(replies)]
    done = protocol.release_many_call(keyspace, "g", named, purge=8, now_ms=NOW + 10)
    conn.evalsha(*_wire(done))
    hour = _hours(conn)[NOW // HOUR_MS]
    assert int(hour[b"c|rq"]) == 1200
    assert int(hour[b"c|us"]) == 1000 * 10 + 200 * 9
