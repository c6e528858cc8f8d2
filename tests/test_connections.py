"""The sync packed path's own connections (``clients.connections.ConnectionStack``).

The stack replaces redis-py's pool checkout on the hot path, so it must keep what ratequota
relied on the pool for: a bound on connections with a bounded wait, a health poll that
reconnects an idle connection the server closed, nothing shared across a fork, nothing leaked
by a failure, and everything closed by ``close``. The fakes below count what the stack does to
a connection; the real-server tests restart the server under an idle connection and run many
threads through a small limit.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, ClassVar

import pytest
import redis

from ratequota import AsyncQuotaClient, GroupPolicy, Policy, QuotaClient, TenantPolicy
from ratequota.clients import connections
from ratequota.clients.backends import PackedScripts
from ratequota.clients.connections import ConnectionStack
from tests.servers import RedisServer, redis_server_binary


class FakeConnection:
    """Records what the stack asks of it; ``stale`` / ``broken`` / ``refuse`` steer it."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        self.stale = False  # can_read answers True (bytes, or the server's close)
        self.broken = False  # can_read raises ConnectionError (the server closed it)
        self.refuse = False  # connect raises ConnectionError (the server is down)

    def connect(self) -> None:
        if self.connected:
            return
        if self.refuse:
            raise redis.exceptions.ConnectionError("Connection refused.")
        self.connected = True
        self.connects += 1

    def disconnect(self) -> None:
        self.connected = False
        self.disconnects += 1
        self.stale = self.broken = False

    def can_read(self) -> bool:
        if self.broken:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return self.stale


class FakePool:
    connection_class = FakeConnection
    connection_kwargs: ClassVar[dict[str, Any]] = {"host": "127.0.0.1", "port": 1}


def stack(limit: int = 2, timeout: float | None = 0.05) -> ConnectionStack:
    return ConnectionStack(FakePool(), limit, timeout)


def test_connections_are_reused_last_in_first_out_with_the_pools_settings() -> None:
    s = stack()
    a = s.take()
    b = s.take()
    assert a is not b and a.kwargs == FakePool.connection_kwargs
    s.give(a)
    s.give(b)
    assert s.take() is b and s.take() is a
    assert s.in_use == 2


def test_a_caller_past_the_limit_waits_for_a_connection_then_fails_as_the_pool_does() -> None:
    s = stack(limit=2, timeout=0.05)
    held = [s.take(), s.take()]
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        s.take()
    assert s.in_use == 2
    s.give(held.pop())
    assert s.take() is not None  # a connection given back serves the next caller


def test_a_waiting_caller_gets_the_connection_given_back() -> None:
    s = stack(limit=1, timeout=30.0)
    held = s.take()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(s.take()))
    waiter.start()
    deadline = time.monotonic() + 10
    while s._waiters == 0 and time.monotonic() < deadline:  # until it waits
        time.sleep(0.001)
    assert s._waiters == 1
    s.give(held)
    waiter.join(10)
    assert got == [held] and s.in_use == 1


def test_a_connection_given_back_just_after_a_waiter_looked_still_wakes_it() -> None:
    """The race a lock-free ``give`` must not lose: a waiter finds no idle connection, and
    before it waits another thread gives one back. The giver runs, in a thread of its own,
    right after the waiter's look; it must wake the waiter (it is given at most 0.2 s before
    the waiter goes on to wait), so the waiter takes that connection instead of failing."""
    s = stack(limit=1, timeout=5.0)
    held = s.take()
    looks = 0

    class Racing(list):  # type: ignore[type-arg]
        def __bool__(self) -> bool:
            nonlocal looks
            looks += 1
            empty = super().__len__() == 0
            if looks == 1:  # the waiter's first look: the connection comes back right now
                giver = threading.Thread(target=s.give, args=(held,))
                giver.start()
                giver.join(0.2)  # done at once unless it must wait for the waiter's lock
            return not empty

    s._idle = Racing()
    waits: list[bool] = []
    wait = s._cond.wait

    def recorded(timeout: float | None = None) -> bool:
        woken = wait(timeout)
        waits.append(woken)  # False: it waited its whole timeout, nobody woke it
        return woken

    s._cond.wait = recorded  # type: ignore[method-assign]
    got = s.take()  # the waiter: limit reached, so it waits in _wait
    assert got is held and looks >= 2 and waits == [True]


def test_an_idle_connection_the_server_closed_is_reconnected_before_use() -> None:
    s = stack()
    conn = s.take()
    conn.connect()
    s.give(conn)
    conn.stale = True  # bytes nobody asked for, or the server's close
    assert s.take() is conn and conn.disconnects == 1 and conn.connected
    s.give(conn)
    conn.broken = True  # the poll itself fails
    assert s.take() is conn and conn.disconnects == 2 and conn.connected


def test_a_connection_that_cannot_connect_goes_back_and_the_error_is_raised() -> None:
    s = stack()
    conn = s.take()
    s.give(conn)
    conn.refuse = True
    with pytest.raises(redis.exceptions.ConnectionError, match="refused"):
        s.take()
    assert s.in_use == 0 and s._idle == [conn]
    conn.refuse = False
    assert s.take() is conn and conn.connected


def test_a_connection_that_cannot_be_made_frees_its_place() -> None:
    class Failing(FakePool):
        @staticmethod
        def connection_class(**kwargs: Any) -> Any:
            raise redis.exceptions.ConnectionError("no such host")

    s = ConnectionStack(Failing(), 1, 0.05)
    for _ in range(3):  # the place is freed each time: never "No connection available"
        with pytest.raises(redis.exceptions.ConnectionError, match="no such host"):
            s.take()
    assert s._count == 0


def test_a_forked_child_uses_none_of_the_parents_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = stack(limit=1)
    parent = s.take()
    s.give(parent)
    held = s.take()
    monkeypatch.setattr(connections.os, "getpid", lambda: -1)  # as in a child after fork()
    child = s.take()  # the parent held the only place; the child has its own
    assert child is not parent and s.in_use == 1
    s.give(held)  # a connection taken before the fork is not the child's to keep
    assert s._idle == [] and held.disconnects == 0
    s.give(child)
    assert s._idle == [child]


def test_close_disconnects_idle_connections_and_those_given_back_later() -> None:
    s = stack(limit=3)
    idle, busy = s.take(), s.take()
    s.give(idle)
    s.close()
    assert idle.disconnects == 1 and busy.disconnects == 0
    s.give(busy)
    assert busy.disconnects == 1 and s._count == 0 and s._idle == []


# -- on a real server ------------------------------------------------------------------------

POLICY = Policy([GroupPolicy("g", 1000, [TenantPolicy("a", guarantee=1000)])])


def _stack(quota: QuotaClient) -> ConnectionStack:
    sender = quota.backend._senders[0]  # type: ignore[attr-defined]
    assert isinstance(sender, PackedScripts)
    return sender.connections


def _served(quota: QuotaClient) -> bool:
    """A real admission (not a lease made up by a failure policy), released again."""
    decision = quota.try_acquire("a", 1)
    lease = decision.lease
    if decision.reason != "admitted" or lease is None or lease.synthetic:
        return False
    return quota.release(lease).state == "released"


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_a_restart_under_an_idle_connection_fails_no_decision(
    private_redis: RedisServer,
) -> None:
    """The server restarts (empty) while the connection is idle: the next decision is served
    on its first attempt, as it was through redis-py's pool."""
    quota = QuotaClient.from_url(private_redis.url, prefix="cs")
    try:
        quota.apply_policy(POLICY)
        assert _served(quota)
        idle = _stack(quota)._idle[-1]
        private_redis.kill()
        private_redis.start()
        quota.apply_policy(POLICY)  # the restart lost it (redis-py's pool reconnects too)
        assert _served(quota)
        assert _stack(quota)._idle == [idle] and _stack(quota).in_use == 0
    finally:
        quota.close()


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_many_threads_share_a_few_connections_and_close_releases_them(
    private_redis: RedisServer,
) -> None:
    admin = redis.Redis(port=private_redis.port)
    alone = len(admin.client_list())
    quota = QuotaClient.from_url(private_redis.url, prefix="cs")
    quota.apply_policy(POLICY)
    s = _stack(quota)
    s.limit = 2  # eight threads through two connections
    results: list[bool] = []

    def work() -> None:
        results.extend(_served(quota) for _ in range(40))

    threads = [threading.Thread(target=work) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [True] * 320
        assert s.in_use == 0 and 1 <= s._count <= 2 and len(s._idle) == s._count
        quota.close()
        assert s._idle == [] and s._count == 0
        # Nothing of the client's is left on the server: the server drops a closed
        # connection when it next reads it, so wait (boundedly) for that.
        deadline = time.monotonic() + 10
        while len(admin.client_list()) > alone and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(admin.client_list()) == alone
    finally:
        quota.close()
        admin.close()


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_the_stack_connects_as_the_url_says_a_unix_socket_and_a_password() -> None:
    """The stack makes its connections from the pool's class and settings: a ``unix://`` URL
    with a password reaches the server through the socket, authenticated."""
    server = RedisServer(extra_args=("--requirepass", "s3cret"))
    socket_path = server.dir / "redis.sock"
    server.extra_args += ("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    # Its PING at start has no password: ready once the socket is there.
    server.ping = lambda: socket_path.exists()  # type: ignore[method-assign]
    server.start()
    quota = QuotaClient.from_url(f"unix://:s3cret@{socket_path}?db=0", prefix="cs")
    try:
        quota.apply_policy(POLICY)
        assert _served(quota)
        (conn,) = _stack(quota)._idle
        assert isinstance(conn, redis.UnixDomainSocketConnection)
        assert conn.path == str(socket_path) and conn.password == "s3cret"
    finally:
        quota.close()
        server.stop()


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_decides_on_connections_of_its_own(private_redis: RedisServer) -> None:
    """A client used before a fork keeps working in the child, on a new connection: the
    parent's socket is never read by two processes (the child exits 0 when all holds)."""
    quota = QuotaClient.from_url(private_redis.url, prefix="cs")
    try:
        quota.apply_policy(POLICY)
        assert _served(quota)
        (parents,) = _stack(quota)._idle
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery, only an exit status
            code = 1
            try:
                if _served(quota):
                    (childs,) = _stack(quota)._idle
                    code = 0 if childs is not parents else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not done:  # pragma: no cover - a hung child fails the test, and is stopped
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done and os.waitstatus_to_exitcode(status) == 0
        assert _served(quota) and _stack(quota)._idle == [parents]  # the parent's is intact
    finally:
        quota.close()


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_max_connections_bounds_the_stack_and_the_pool(private_redis: RedisServer) -> None:
    """The setting reaches both limits, on one URL and on shards (50 by default); the async
    client takes the setting and keeps its own bound (``batch_in_flight``)."""
    urls = [private_redis.url, private_redis.url.replace("/0", "/1")]
    clients = [
        QuotaClient.from_url(urls[0], prefix="cs", max_connections=3),
        QuotaClient.sharded(urls, prefix="cs", max_connections=4),
        QuotaClient.from_url(urls[0], prefix="cs"),
    ]
    try:
        for quota, limit in zip(clients, (3, 4, 50), strict=True):
            senders = quota.backend._senders  # type: ignore[attr-defined]
            assert [s.connections.limit for s in senders] == [limit] * len(senders)
            pools = [c.connection_pool for c in quota.backend.connections()]
            assert [p.max_connections for p in pools] == [limit] * len(pools)
        aio = AsyncQuotaClient.from_url(urls[0], prefix="cs", max_connections=3)
        assert aio.core.settings.max_connections == 3
    finally:
        for quota in clients:
            quota.close()
