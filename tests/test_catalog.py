"""The routing catalog: recovery after Redis restarts empty, and refreshes off the hot path.

Recovery (issue 9, item 1): a real redis-server is killed and restarted empty
while pods keep serving; the catalog refresh is driven by the client's
``ManualClock``, never by sleeping. A pod keeps the policy it knew, writes it
back and restores each group on its first request; an operator's
unpublication (a catalog without the group, or an empty one) is still obeyed.

Refreshes (item 6): one refresh at a time per client while the other callers
route by the catalog they hold; an unchanged publication is neither fetched
whole nor parsed again. Redis' own command statistics count the reads, so the
counts hold for any version of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

import fakeredis
import pytest
import redis

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.async_backends import async_url_backend
from ratequota.clients.backends import SingleBackend, url_backend
from ratequota.clients.catalog import (
    HEADER_BYTES,
    Catalog,
    CatalogHeader,
    catalog_document,
    parse_document,
    parse_header,
    policy_digest,
)
from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import SCHEMA_VERSION, KeySpace
from ratequota.errors import ConfigError, SchemaMismatch, UnknownTenant
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.bridge import raw_connection
from tests.conftest import MakeClient
from tests.servers import RedisServer

#: Leases here last at most this long, so the recovery window after a loss is this short.
RECOVERY = 120.0
POLICY = Policy(
    [
        GroupPolicy(
            "batch",
            10,
            [TenantPolicy("a", guarantee=5), TenantPolicy("b", guarantee=5)],
            max_lease_ttl=RECOVERY,
        ),
        GroupPolicy("open", 4, [TenantPolicy("s1")], max_lease_ttl=RECOVERY),
    ]
)
CATALOG = KeySpace().catalog
TTL = 5.0


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may kill and restart (without persistence)."""
    return private_redis


def _stored(srv: RedisServer) -> dict[str, Any] | None:
    conn = srv.client()
    try:
        raw = conn.get(CATALOG)
    finally:
        conn.close()
    return None if raw is None else json.loads(raw)


# -- recovery after an empty restart -----------------------------------------------------


@pytest.mark.real_redis
def test_sync_pods_recover_after_redis_restarts_empty(server: RedisServer) -> None:
    """Kill Redis, restart it empty, let the catalog refresh run: every call is decided
    (refused as ``recovering`` during the recovery window, admitted after it).

    Before the fix the refresh replaced the known policy with "nothing" and
    every later call raised ``UnknownTenant``, for ever.
    """
    admin = QuotaClient(server.url)
    admin.apply_policy(POLICY)
    admin.close()
    clock = ManualClock()
    pod = QuotaClient(server.url, clock=clock, catalog_ttl=TTL, socket_timeout=2.0)
    try:
        assert pod.try_acquire("a", 1).admitted  # the pod learns the policy
        server.restart()
        assert _stored(server) is None
        clock.advance(TTL + 1)  # a refresh is due and finds the catalog key missing
        for tenant in ("a", "b", "s1"):
            decision = pod.try_acquire(tenant, 1)
            assert decision.reason == "recovering", decision  # the policy is back
        for _ in range(3):
            clock.advance(RECOVERY + 1)  # past the window; the catalog is stale again too
            for tenant in ("a", "b", "s1"):
                decision = pod.try_acquire(tenant, 1)
                assert decision.admitted, decision
        assert pod.core.wait_refreshed(10)
        stored = _stored(server)
        assert stored is not None and stored["restored"] is True
        assert Policy.from_dict(stored["policy"]) == POLICY
        # A pod started after the loss (knowing nothing) routes by the restored catalog.
        fresh = QuotaClient(server.url, clock=clock)  # the same (pinned) Redis time
        try:
            assert fresh.try_acquire("b", 1).admitted
        finally:
            fresh.close()
    finally:
        pod.close()


@pytest.mark.real_redis
def test_async_pods_recover_after_redis_restarts_empty(server: RedisServer) -> None:
    """The async client after the same empty restart: the refresh keeps the policy it knew."""
    admin = QuotaClient(server.url)
    admin.apply_policy(POLICY)
    admin.close()

    async def main() -> None:
        clock = ManualClock()
        pod = AsyncQuotaClient(
            backend=async_url_backend(server.url, socket_timeout=2.0),
            clock=clock,
            catalog_ttl=TTL,
        )
        try:
            assert (await pod.try_acquire("a", 1)).admitted
            server.restart()
            # Drop the pooled connection the kill broke, so the refresh below reaches the
            # empty server (rather than failing on the dead socket and routing by the old
            # catalog by luck).
            for _ in range(3):
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    await pod.backend.connections()[0].ping()
                    break
            clock.advance(TTL + 1)
            for tenant in ("a", "b", "s1"):
                decision = await pod.try_acquire(tenant, 1)
                assert decision.reason == "recovering", decision
            for _ in range(3):
                clock.advance(RECOVERY + 1)
                for tenant in ("a", "b", "s1"):
                    decision = await pod.try_acquire(tenant, 1)
                    assert decision.admitted, decision
            assert await pod.load_policy() == POLICY
        finally:
            await pod.close()

    asyncio.run(main())
    stored = _stored(server)
    assert stored is not None and Policy.from_dict(stored["policy"]) == POLICY


def test_an_unpublished_policy_is_obeyed_not_restored(make_quota: MakeClient) -> None:
    """An operator's empty publication is a tombstone: the pod forgets, nothing comes back."""
    clock = ManualClock()
    pod = make_quota(clock=clock, catalog_ttl=TTL)
    admin = make_quota(POLICY, clock=ManualClock())
    assert pod.try_acquire("a", 1).admitted
    admin.apply_policy(Policy([]))
    clock.advance(TTL + 1)
    with pytest.raises(UnknownTenant):
        pod.try_acquire("a", 1)
    assert pod.core.wait_refreshed(10)
    assert pod.core.policy == Policy([])
    conn = raw_connection(admin)
    assert not conn.exists(admin.core.keyspace.group("batch").policy)
    assert json.loads(conn.get(CATALOG))["policy"] == {"groups": []}
    with pytest.raises(UnknownTenant):
        pod.try_acquire("s1", 1)


def test_a_deleted_catalog_key_is_data_loss(make_quota: MakeClient) -> None:
    """A catalog key that vanished (evicted, flushed, deleted by hand) is restored, not obeyed."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, catalog_ttl=TTL)
    conn = raw_connection(pod)
    conn.delete(CATALOG)
    clock.advance(TTL + 1)
    assert pod.try_acquire("a", 1).admitted
    assert pod.core.wait_refreshed(10)
    header = parse_header(conn.get(CATALOG))
    assert header is not None and header.restored
    assert pod.load_policy() == POLICY


def test_a_restored_older_publication_never_rolls_a_pod_back(make_quota: MakeClient) -> None:
    """A lagging pod restores the policy it knew after a loss; pods that read a newer
    publication keep theirs. An operator's next publication wins everywhere."""
    lagging_clock, current_clock = ManualClock(), ManualClock()
    lagging = make_quota(POLICY, clock=lagging_clock, catalog_ttl=TTL)
    newer = Policy([POLICY.groups[0], GroupPolicy("open", 8, [TenantPolicy("s1")])])
    admin = make_quota(newer, clock=ManualClock(start_ms=1_800_000_000_000 + 1000))
    current = make_quota(clock=current_clock, catalog_ttl=TTL)
    assert current.load_policy() == newer
    conn = raw_connection(admin)
    conn.flushall()
    # The lagging pod has not refreshed yet: its first request restores what it knew.
    assert lagging.try_acquire("a", 1).reason == "recovering"
    header = parse_header(conn.get(CATALOG))
    assert header is not None and header.restored
    current_clock.advance(TTL + 1)
    assert current.try_acquire("s1", 1).group == "open"  # decided; recovering
    assert current.core.wait_refreshed(10)
    assert current.core.catalog_reads >= 2  # it did re-read the catalog, and kept its own
    assert current.core.policy == newer
    third = Policy([GroupPolicy("open", 2, [TenantPolicy("s1"), TenantPolicy("a")])])
    admin.apply_policy(third)
    current_clock.advance(TTL + 1)
    lagging_clock.advance(TTL + 1)
    current.try_acquire("s1", 1)
    lagging.try_acquire("s1", 1)
    assert current.core.wait_refreshed(10) and lagging.core.wait_refreshed(10)
    assert current.core.policy == third and lagging.core.policy == third


# -- the document and its header -------------------------------------------------------


def test_the_header_fits_and_names_the_publication() -> None:
    """The header is at the start, within the bytes a refresh reads, and parses alone."""
    big = Policy([GroupPolicy(f"g{i}", 10, [TenantPolicy(f"t{i}")]) for i in range(50)])
    document = catalog_document(big, epoch=12345678901234, restored=True)
    header = parse_header(document.encode()[:HEADER_BYTES])
    assert header == CatalogHeader(12345678901234, policy_digest(big), True)
    parsed = parse_document(document)
    assert parsed is not None and parsed.policy == big and parsed.header == header
    assert policy_digest(big) == policy_digest(Policy.from_dict(big.to_dict()))
    assert policy_digest(big) != policy_digest(POLICY)


def test_documents_without_a_header_still_parse() -> None:
    """A catalog written by an older ratequota (no header) is read whole, keyed by its bytes."""
    old = json.dumps({"schema": SCHEMA_VERSION, "policy": POLICY.to_dict()})
    assert parse_header(old) is None
    parsed = parse_document(old)
    assert parsed is not None and parsed.policy == POLICY and parsed.header.epoch == 0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"\xff\xfe not json", "catalog"),
        (b"[1, 2]", "catalog"),
        (json.dumps({"schema": "x", "policy": {}}).encode(), "catalog.schema"),
        (json.dumps({"policy": {"groups": [{"name": "g"}]}}).encode(), "catalog.groups[0]"),
    ],
)
def test_a_corrupt_catalog_is_a_ratequota_error(raw: bytes, field: str) -> None:
    """Garbage in the catalog key raises ``ConfigError`` naming the catalog, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        parse_document(raw)
    assert caught.value.field.startswith(field)


def test_a_newer_schema_is_refused_from_the_header_alone() -> None:
    """The header carries the schema, so even an unchanged digest cannot hide a newer one."""
    document = catalog_document(POLICY).replace(
        f'"schema": {SCHEMA_VERSION}', f'"schema": {SCHEMA_VERSION + 1}'
    )
    with pytest.raises(SchemaMismatch):
        parse_header(document.encode()[:HEADER_BYTES])


def test_adoption_rule() -> None:
    """Publications are always adopted; restorations only when not older than the one held."""
    held = Catalog.of(POLICY, 0.0, CatalogHeader(10, "a" * 32))
    assert held.adopts(CatalogHeader(5, "b" * 32))  # an apply: the operator decides
    assert not held.adopts(CatalogHeader(5, "b" * 32, restored=True))
    assert held.adopts(CatalogHeader(10, "a" * 32, restored=True))
    assert Catalog.empty().adopts(CatalogHeader(0, "c" * 32, restored=True))


# -- single flight and parse-once --------------------------------------------------------


def _catalog_reads(srv: RedisServer) -> int:
    conn = srv.client()
    try:
        stats = conn.info("commandstats")
    finally:
        conn.close()
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "getrange"))


def _reset_stats(srv: RedisServer) -> None:
    conn = srv.client()
    try:
        conn.config_resetstat()
    finally:
        conn.close()


class _GatedConnection:
    """A redis-py client whose first catalog read waits for a gate (the refresh in flight)."""

    def __init__(self, conn: Any, gate: threading.Event) -> None:
        self._conn = conn
        self._gate = gate
        self.first = threading.Event()

    def execute_command(self, *args: Any) -> Any:
        if args and args[0] in ("GET", "GETRANGE") and not self.first.is_set():
            self.first.set()
            assert self._gate.wait(10), "the gate was never opened"
        return self._conn.execute_command(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.real_redis
def test_one_refresh_at_a_time_and_nobody_waits_for_it(real_redis: RedisServer) -> None:
    """Thirty threads find the catalog stale at once: one refresh starts, in the background;
    all thirty route by the catalog held and finish while that read is still in flight."""
    clock = ManualClock()
    admin = QuotaClient(real_redis.url)
    admin.apply_policy(Policy([GroupPolicy("g", 100, [TenantPolicy(f"t{i}") for i in range(30)])]))
    admin.close()
    gate = threading.Event()
    base = url_backend(real_redis.url, socket_timeout=5.0)
    gated = _GatedConnection(base.connection("g"), gate)
    pod = QuotaClient(backend=SingleBackend(gated, base.description), clock=clock, catalog_ttl=TTL)
    try:
        gate.set()
        assert pod.try_acquire("t0", 1).admitted  # the first read: the catalog is held now
        gate.clear()
        gated.first.clear()
        clock.advance(TTL + 1)
        _reset_stats(real_redis)
        decisions: list[bool] = []
        done = threading.Condition()

        def call(i: int) -> None:
            admitted = pod.try_acquire(f"t{i}", 1).admitted
            with done:
                decisions.append(admitted)
                done.notify_all()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
        for thread in threads:
            thread.start()
        assert gated.first.wait(10)
        # Every caller finishes while the refresh is held at the gate: it runs beside them.
        with done:
            assert done.wait_for(lambda: len(decisions) == 30, timeout=10), len(decisions)
        assert not gate.is_set()
        assert not pod.core.wait_refreshed(0)  # still in flight
        gate.set()
        for thread in threads:
            thread.join(10)
        assert pod.core.wait_refreshed(10)
        assert decisions == [True] * 30
        assert _catalog_reads(real_redis) == 1
    finally:
        gate.set()
        pod.close()


@pytest.mark.real_redis
def test_concurrent_tasks_refresh_once(real_redis: RedisServer) -> None:
    """Fifty tasks find the catalog stale at once: the server sees one catalog read."""
    admin = QuotaClient(real_redis.url)
    admin.apply_policy(POLICY)
    admin.close()

    async def main() -> None:
        clock = ManualClock()
        pod = AsyncQuotaClient(
            backend=async_url_backend(real_redis.url, socket_timeout=5.0),
            clock=clock,
            catalog_ttl=TTL,
        )
        try:
            assert (await pod.try_acquire("a", 1)).admitted
            for _ in range(3):
                clock.advance(TTL + 1)
                _reset_stats(real_redis)
                decisions = await asyncio.gather(
                    *(pod.try_acquire("s1" if i % 2 else "b", 1) for i in range(50))
                )
                assert await asyncio.to_thread(pod.core.wait_refreshed, 10)
                assert _catalog_reads(real_redis) == 1
                # "open" holds 4; b may borrow all that a (holding 1) leaves of 10.
                assert sum(d.admitted for d in decisions) == 4 + 9
                for d in decisions:
                    if d.lease is not None:
                        await pod.release(d.lease)
        finally:
            await pod.close()

    asyncio.run(main())


@pytest.mark.real_redis
def test_a_big_unchanged_catalog_is_never_fetched_or_parsed_again(
    real_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 tenants: an unchanged publication costs a header read per refresh, no parse;
    a new publication is fetched and validated once."""
    tenants = 100_000
    per_group = 2_000
    groups = [
        GroupPolicy(
            f"g{i}",
            per_group,
            [TenantPolicy(f"t{i}-{j}", guarantee=1) for j in range(per_group)],
        )
        for i in range(tenants // per_group)
    ]
    big = Policy(groups)
    admin = QuotaClient(real_redis.url, socket_timeout=10.0)
    admin.apply_policy(big)
    clock = ManualClock()
    pod = QuotaClient(real_redis.url, clock=clock, catalog_ttl=TTL, socket_timeout=10.0)
    parses: list[int] = []
    real_from_dict = Policy.from_dict.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Policy], data: Any) -> Policy:
        parses.append(1)
        return real_from_dict(cls, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(Policy, "from_dict", classmethod(counting))
    assert pod.try_acquire("t7-3", 1).admitted
    assert len(parses) == 1
    for i in range(5):
        clock.advance(TTL + 1)
        assert pod.try_acquire(f"t{i}-9", 1).admitted
        assert pod.core.wait_refreshed(30)
    assert len(parses) == 1
    assert pod.core.catalog_reads == 6
    smaller = Policy(groups[:-1])
    admin.apply_policy(smaller)
    assert len(parses) == 1  # the publisher never parses what it wrote
    clock.advance(TTL + 1)
    assert pod.try_acquire("t0-1", 1).admitted  # routed by the catalog held meanwhile
    assert pod.core.wait_refreshed(30)
    assert len(parses) == 2
    assert pod.core.policy == smaller
    with pytest.raises(UnknownTenant):
        pod.try_acquire(f"t{len(groups) - 1}-1", 1)
    admin.close()
    pod.close()


def test_a_tenant_moved_out_of_a_dropped_group_is_routed_again(make_quota: MakeClient) -> None:
    """The first call after a publication that dropped the tenant's group (and moved the tenant)
    is routed by the old catalog while the refresh runs beside it: the failed restore re-reads
    the catalog and the call goes to the tenant's new group."""
    clock = ManualClock()
    pod = make_quota(POLICY, clock=clock, catalog_ttl=TTL)
    admin = make_quota(clock=ManualClock())
    moved = Policy([GroupPolicy("open", 4, [TenantPolicy("s1"), TenantPolicy("a")])])
    admin.apply_policy(moved)  # "batch" dropped, "a" now in "open"
    clock.advance(TTL + 1)
    decision = pod.try_acquire("a", 1)
    assert decision.admitted and decision.group == "open"
    assert pod.core.wait_refreshed(10)
    with pytest.raises(UnknownTenant):
        pod.try_acquire("b", 1)


def test_the_async_client_parses_a_new_catalog_off_its_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsing (validating every tenant) is a ``Compute`` op: the async client runs it in a
    worker thread, never on the event loop's thread."""
    import threading as _threading

    from ratequota.clients import router as core
    from ratequota.clients.async_backends import async_embedded_backend

    threads: list[int] = []
    real_parse = core.parse_document

    def recording(raw: object) -> Any:
        threads.append(_threading.get_ident())
        return real_parse(raw)

    monkeypatch.setattr(core, "parse_document", recording)

    async def main() -> None:
        server = fakeredis.FakeServer()
        admin = AsyncQuotaClient(backend=async_embedded_backend(server=server))
        await admin.apply_policy(POLICY)
        clock = ManualClock()
        pod = AsyncQuotaClient(
            backend=async_embedded_backend(server=server), clock=clock, catalog_ttl=TTL
        )
        try:
            assert (await pod.try_acquire("a", 1)).admitted  # cold: parsed in line
            await admin.apply_policy(Policy([*POLICY.groups, GroupPolicy("new", 1)]))
            clock.advance(TTL + 1)
            assert (await pod.try_acquire("a", 1)).admitted
            assert await asyncio.to_thread(pod.core.wait_refreshed, 10)
            assert pod.core.policy is not None and pod.core.policy.group("new") is not None
        finally:
            await pod.close()
            await admin.close()
        assert len(threads) == 2
        assert _threading.get_ident() not in threads

    asyncio.run(main())


def test_an_old_headerless_catalog_is_not_parsed_again_while_unchanged(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog written by an older ratequota (no header) during a rolling update is fetched
    on each refresh but parsed only when its bytes change."""
    clock = ManualClock()
    admin = make_client(POLICY, clock=ManualClock())
    conn = admin.backend.connection("batch")
    conn.set(CATALOG, json.dumps({"schema": SCHEMA_VERSION, "policy": POLICY.to_dict()}))
    pod = make_client(clock=clock, catalog_ttl=TTL)
    assert pod.try_acquire("a", 1).admitted
    for _ in range(3):
        clock.advance(TTL + 1)
        assert pod.try_acquire("a", 1).admitted
        assert pod.core.wait_refreshed(10)
    assert pod.core.catalog_parses == 1 and pod.core.catalog_reads == 4


def test_a_refresh_never_undoes_a_publication_made_meanwhile(make_client: MakeClient) -> None:
    """A refresh that read the old catalog settles after this client published a new one:
    the publication stays."""
    clock = ManualClock()
    pod = make_client(POLICY, clock=clock, catalog_ttl=TTL)
    flow = pod.core._refresh()
    op = next(flow)  # the header read, sent before the publication
    head = pod.backend.connection("batch").execute_command(*op.args)
    newer = Policy([GroupPolicy("open", 4, [TenantPolicy("s1")])])
    pod.apply_policy(newer)
    with pytest.raises(StopIteration):
        flow.send(head)
    assert pod.core.policy == newer
