"""acquire_many decides a batch exactly as the same acquires sent one after another would.

The async client coalesces concurrent acquires of one group into one
acquire_many call; these tests pin the equivalence (replies and the state left
in Redis) and the client-side coalescing, including recovery after NOSCRIPT.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.engine import protocol
from ratequota.engine.coalesce import coalesce
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.scripts import load_scripts
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.redis_state import dump_keys
from tests.servers import RedisServer, script_calls

NOW = 1_800_000_000_000
GROUP = GroupPolicy(
    "g",
    capacity=10,
    tenants=[
        TenantPolicy("a", guarantee=4, borrow_limit=3, weight=2.0),
        TenantPolicy("b", guarantee=4, lendable=0.5),
        TenantPolicy("c", guarantee=2, max_units=3),
    ],
    max_lease_ttl=60.0,
)

request = st.tuples(
    st.sampled_from(["a", "b", "c", "stranger"]),
    st.integers(1, 6),
    st.sampled_from([f"id-{i}" for i in range(8)]),  # repeats exercise replays and waiters
    st.sampled_from([1_000, 30_000, 100_000]),  # 100 s is above max_lease_ttl: bad_ttl
    st.booleans(),
)


def _fresh_conn() -> Any:
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    for spec in load_scripts().values():
        conn.script_load(spec.source)
    return conn


def _run(conn: Any, call: protocol.ScriptCall) -> Any:
    return conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)


def _state(conn: Any) -> dict[bytes, Any]:
    """What a later decision could see: every key, its content and whether it expires."""
    return dump_keys(conn, expiry=True)


def _prepare(conn: Any, setup: list[tuple[str, int, str, int, bool]]) -> None:
    ks = KeySpace()
    _run(conn, protocol.apply_policy_call(ks, GROUP))
    for tenant, units, lease, ttl, wait in setup:
        _run(
            conn,
            protocol.acquire_call(
                ks,
                "g",
                tenant,
                units,
                "s" + lease,
                ttl,
                wait=wait,
                pending_ms=2000,
                purge=64,
                now_ms=NOW,
            ),
        )


@given(setup=st.lists(request, max_size=6), batch=st.lists(request, min_size=1, max_size=8))
def test_a_batch_decides_like_its_requests_one_by_one(
    setup: list[tuple[str, int, str, int, bool]], batch: list[tuple[str, int, str, int, bool]]
) -> None:
    """Same replies, same state left behind, for any starting state and any batch."""
    ks = KeySpace()
    one_by_one, together = _fresh_conn(), _fresh_conn()
    _prepare(one_by_one, setup)
    _prepare(together, setup)
    now = NOW + 500
    expected = [
        _run(
            one_by_one,
            protocol.acquire_call(
                ks, "g", t, u, i, ttl, wait=w, pending_ms=2000, purge=64, now_ms=now
            ),
        )
        for t, u, i, ttl, w in batch
    ]
    got = _run(
        together,
        protocol.acquire_many_call(ks, "g", batch, pending_ms=2000, purge=64, now_ms=now),
    )
    assert got == expected
    assert _state(together) == _state(one_by_one)


release = st.tuples(
    st.sampled_from([f"sid-{i}" for i in range(8)] + ["nope"]),
    st.sampled_from(["a", "b", "c", "stranger"]),
    st.sampled_from(["right", "wrong", "zero"]),  # the lease's own token, another, or 0
)


def _token(conn: Any, lease_id: str, choice: str) -> int:
    """The fencing token a release names: the lease's own (0 if none), one above it, or 0."""
    info = conn.hget(KeySpace().group("g").info, "L" + lease_id)
    own = int(info.split(b":")[1]) if info else 0
    return {"right": own, "wrong": own + 1, "zero": 0}[choice]


@given(
    setup=st.lists(request, max_size=8),
    releases=st.lists(release, min_size=1),
    later=st.sampled_from([0, 1_000, 40_000]),
)
def test_a_release_batch_is_like_its_releases_one_by_one(
    setup: list[tuple[str, int, str, int, bool]], releases: list[tuple[str, str, str]], later: int
) -> None:
    """release_many: same replies and state as the releases sent one after another,
    including repeated ids, unknown ids, waiting requests, leases expired by ``later``, and
    fenced releases (another tenant, another token)."""
    ks = KeySpace()
    one_by_one, together = _fresh_conn(), _fresh_conn()
    _prepare(one_by_one, setup)
    _prepare(together, setup)
    now = NOW + later
    named = [(i, t, _token(one_by_one, i, choice)) for i, t, choice in releases]
    expected = [
        _run(
            one_by_one,
            protocol.release_call(ks, "g", i, tenant=t, token=k, purge=2, now_ms=now),
        )
        for i, t, k in named
    ]
    got = _run(together, protocol.release_many_call(ks, "g", named, purge=2, now_ms=now))
    assert got == expected
    assert _state(together) == _state(one_by_one)


def test_coalescing_merges_only_compatible_calls() -> None:
    """Acquires of one group merge; other groups, other scripts and lone calls pass through."""
    ks = KeySpace()

    def acquire(group: str, lease: str, purge: int = 64) -> ScriptCall:
        return protocol.acquire_call(
            ks, group, "a", 1, lease, 1000, wait=False, pending_ms=2000, purge=purge
        )

    release = protocol.release_call(ks, "g", "x", tenant="a", token=1, purge=64)
    calls = [acquire("g", "1"), release, acquire("h", "2"), acquire("g", "3"), acquire("g", "4", 1)]
    wire, where = coalesce(calls)
    many = load_scripts()["acquire_many"].sha
    assert [w.script.sha == many for w in wire] == [True, False, False, False]
    assert where == [(0, 0), (1, None), (2, None), (0, 1), (3, None)]
    releases = [protocol.release_call(ks, "g", i, tenant="a", token=1, purge=64) for i in "abc"]
    wire, where = coalesce([*releases, acquire("g", "5")])
    assert wire[0].script.sha == load_scripts()["release_many"].sha
    assert where == [(0, 0), (0, 1), (0, 2), (1, None)]


def test_coalescing_is_built_on_the_many_encoders() -> None:
    """A coalesced batch is exactly the call ``acquire_many_call`` / ``release_many_call`` make."""
    ks = KeySpace()
    requests = [("a", 1, "id-1", 1000, False), ("b", 2, "id-2", 500, True)]
    singles = [
        protocol.acquire_call(ks, "g", t, u, i, ttl, wait=w, pending_ms=2000, purge=64, now_ms=NOW)
        for t, u, i, ttl, w in requests
    ]
    wire, _ = coalesce(singles)
    assert wire == [
        protocol.acquire_many_call(ks, "g", requests, pending_ms=2000, purge=64, now_ms=NOW)
    ]
    named = [("id-1", "a", 7), ("id-2", "b", 8)]
    singles = [
        protocol.release_call(ks, "g", i, tenant=t, token=k, purge=8, now_ms=NOW)
        for i, t, k in named
    ]
    wire, _ = coalesce(singles)
    assert wire == [protocol.release_many_call(ks, "g", named, purge=8, now_ms=NOW)]


@pytest.mark.real_redis
def test_async_client_coalesces_concurrent_acquires(real_redis: RedisServer) -> None:
    """Concurrent try_acquire (and release) calls on one group take fewer script calls than
    requests, grant exactly the capacity, and survive a SCRIPT FLUSH (merged scripts reload)."""

    async def main() -> None:
        quota = AsyncQuotaClient.from_url(real_redis.url)
        await quota.apply_policy(Policy([GroupPolicy("g", 40, [TenantPolicy("t", 40)])]))
        plain = real_redis.client()
        for round_ in range(2):
            plain.config_resetstat()
            decisions = await asyncio.gather(*(quota.try_acquire("t", 1) for _ in range(60)))
            assert sum(d.admitted for d in decisions) == 40
            calls = script_calls(plain)
            assert calls < 60, f"round {round_}: {calls} script calls for 60 requests"
            plain.config_resetstat()
            results = await asyncio.gather(
                *(quota.release(d.lease) for d in decisions if d.lease is not None)
            )
            assert [r.state for r in results] == ["released"] * 40
            calls = script_calls(plain)
            assert calls < 40, f"round {round_}: {calls} script calls for 40 releases"
            plain.script_flush()
        snap = await quota.snapshot("g")
        assert snap.used == 0
        plain.close()
        await quota.close()

    asyncio.run(main())


def test_a_request_id_reused_by_another_tenant_is_handled() -> None:
    """Found by the nightly profile: b reusing the id of a's waiting request once crashed the
    script. Request ids are the tenant's now: b's reuse is refused (``id_mismatch``), a's
    registration stays, b cannot withdraw it (``fenced``), and both paths agree."""
    setup = [("a", 4, "id-1", 1000, False), ("a", 4, "id-4", 1000, True)]
    batch = [("b", 1, "sid-4", 1000, False), ("a", 1, "sid-4", 1000, False)]
    test_a_batch_decides_like_its_requests_one_by_one.hypothesis.inner_test(setup, batch)  # type: ignore[attr-defined]
    test_a_release_batch_is_like_its_releases_one_by_one.hypothesis.inner_test(  # type: ignore[attr-defined]
        [*setup, ("b", 1, "id-4", 1000, False)],
        [("sid-0", "a", "right"), ("sid-4", "b", "zero"), ("sid-4", "a", "zero")],
        0,
    )
