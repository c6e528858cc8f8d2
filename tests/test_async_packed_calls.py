"""The async client's pre-packed script calls answer exactly what redis.asyncio's ``evalsha`` does.

On the async backends made from URLs, a script call the batcher sends alone (or
merged into one ``_many`` call) is packed by ``ratequota.engine.resp`` and sent
by ``async_backends.AsyncPackedScripts`` on the client's own pool. As
``tests/test_packed_calls.py`` does for the sync client, these tests hold it to
redis-py: the bytes are redis.asyncio's bytes (each of its packers), and the
replies, the errors and what becomes of the connection and the pool are those
of ``await client.evalsha(...)``, on fakeredis and on a real server that is
healthy, flushed, paused and killed. And cancellation: a call cancelled
mid-read (its caller, or the batcher's timer at the deadline) never puts a
connection with an unread reply back in the pool, and the next call answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import fakeredis.aioredis
import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from ratequota import AsyncQuotaClient, GroupPolicy, Policy, TenantPolicy
from ratequota.clients import backends
from ratequota.clients.async_backends import (
    AsyncBackend,
    AsyncPackedScripts,
    async_embedded_backend,
    async_sharded_backend,
    async_url_backend,
)
from ratequota.clients.backends import (
    PackedScripts,
    _hiredis_async_connection_class,
    async_no_retry,
    no_retry,
)
from ratequota.clients.script_pipe import ScriptPipe
from ratequota.engine.ops import ScriptCall
from ratequota.engine.scripts import ScriptSpec, load_scripts
from ratequota.errors import BackendUnavailable
from tests.servers import RedisServer
from tests.strategies import wire_texts, wire_values
from tests.test_packed_calls import _calls, _lease_calls, _policy_call, redis_sha1

POLICY = Policy([GroupPolicy("g", 10, [TenantPolicy("a", guarantee=5)])])
ECHO_SOURCE = "return ARGV[1]"
#: A script answering its argument: a reply left unread would answer the next call wrongly.
ECHO = ScriptSpec("echo", ECHO_SOURCE, redis_sha1(ECHO_SOURCE), (), ("value",), False)
BROKEN_SOURCE = "return redis.call('NO_SUCH_COMMAND')"
BROKEN = ScriptSpec("broken", BROKEN_SOURCE, redis_sha1(BROKEN_SOURCE), (), (), True)
NOWHERE = "redis://127.0.0.1:1/0"  # never connected to


def _echo(value: str) -> ScriptCall:
    return ScriptCall(ECHO, "g", (), (value,))


def _packers() -> dict[str, Callable[..., list[bytes]]]:
    """redis.asyncio's ways to pack a command: its stock connection's (hiredis's serializer
    when installed), its pure-Python one, and the connection class ratequota's URL clients use."""
    stock = Connection(host="127.0.0.1", port=1)
    ours = _hiredis_async_connection_class()(host="127.0.0.1", port=1)
    return {
        "stock": stock.pack_command,
        "python": stock._pack_command_python,
        "ratequota": ours.pack_command,
    }


PACKERS = _packers()


def _asyncio_bytes(call: ScriptCall, packer: str) -> bytes:
    """The bytes redis.asyncio sends for ``await client.evalsha(*call.wire)``."""
    return b"".join(PACKERS[packer]("EVALSHA", *call.wire))


@pytest.mark.parametrize("packer", sorted(PACKERS))
def test_every_script_call_packs_to_redis_asyncios_bytes(packer: str) -> None:
    """Each call of every script (names in and beyond ASCII, meters or none) is byte for byte
    what redis.asyncio would send, with each of its packers."""
    for call in _calls():
        assert call.packed == _asyncio_bytes(call, packer)


@given(
    keys=st.lists(wire_texts, max_size=12).map(tuple),
    args=st.lists(wire_values, max_size=20).map(tuple),
)
def test_any_ints_and_text_pack_to_redis_asyncios_bytes(
    keys: tuple[str, ...], args: tuple[int | str, ...]
) -> None:
    """Any keys, and any int and text arguments (huge, negative, empty, long)."""
    call = ScriptCall(load_scripts()["snapshot"], "g", keys, args)
    assert all(call.packed == _asyncio_bytes(call, packer) for packer in PACKERS)


# -- who qualifies for the packed path ---------------------------------------------------------


def test_only_a_plain_pooled_utf8_asyncio_client_is_sent_packed() -> None:
    """The async clients ratequota makes from URLs (one, or shards) qualify, and a plain
    ``redis.asyncio.Redis`` with ratequota's no-retry policy; each variant that differs in one
    thing keeps redis-py's own path: redis-py's default retries, a single-connection client,
    another encoding, lenient encoding errors, an EVALSHA reply callback, fakeredis's client,
    a sync client. The checks are the sync client's (``backends.plain_pool``)."""

    async def main() -> None:
        plain: dict[str, Any] = {"retry": async_no_retry()}
        callback = redis.asyncio.Redis.from_url(NOWHERE, **plain)
        callback.set_response_callback("EVALSHA", lambda reply, **_: reply)
        others: list[Any] = [
            redis.asyncio.Redis.from_url(NOWHERE),
            redis.asyncio.Redis.from_url(NOWHERE, single_connection_client=True, **plain),
            redis.asyncio.Redis.from_url(NOWHERE, encoding="latin-1", **plain),
            redis.asyncio.Redis.from_url(NOWHERE, encoding_errors="replace", **plain),
            callback,
            fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()),
        ]
        one = async_url_backend(NOWHERE, socket_timeout=1.0)
        shards = async_sharded_backend([NOWHERE, "redis://127.0.0.1:2/0"], socket_timeout=1.0)
        embedded = async_embedded_backend(shared=False)
        bare = redis.asyncio.Redis.from_url(NOWHERE, **plain)
        sync = redis.Redis.from_url(NOWHERE, retry=no_retry())
        try:
            assert AsyncPackedScripts.of(one.connection("g")) is not None
            assert one.script_sender("g") is not None
            assert all(shards.script_sender(group) is not None for group in "abcdefgh")
            assert embedded.script_sender("g") is None
            assert AsyncPackedScripts.of(bare) is not None
            for client in others:
                assert AsyncPackedScripts.of(client) is None, client
            assert AsyncPackedScripts.of(sync) is None and AsyncPackedScripts.of(object()) is None
            assert PackedScripts.of(bare) is None and PackedScripts.of(sync) is not None
        finally:
            for client in (*others, bare):
                await client.aclose()
            for backend in (one, shards, embedded):
                await backend.close()
            sync.close()

    asyncio.run(main())


# -- the same answers from fakeredis and a real server -----------------------------------------


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may flush, pause and kill."""
    return private_redis


def _plain_fake() -> redis.asyncio.Redis:
    """A plain ``redis.asyncio.Redis`` (so it qualifies) whose pool's connections are
    fakeredis's: the packed bytes go through fakeredis's RESP parser."""
    pool = redis.asyncio.ConnectionPool(
        connection_class=fakeredis.aioredis.FakeAsyncRedisConnection,
        server=fakeredis.FakeServer(),
        retry=async_no_retry(),
    )
    return redis.asyncio.Redis(connection_pool=pool)


Send = Callable[[ScriptCall], Awaitable[Any]]


def _paths(client: Any) -> dict[str, Send]:
    """The packed path (``EVALSHA``, as redis-py's) and redis-py's own, on the same client
    (so the same pool). tests/test_functions.py holds ``FCALL`` to the same answers."""
    packed = AsyncPackedScripts.of(client, functions=False)
    assert packed is not None
    return {"packed": packed, "evalsha": lambda call: client.evalsha(*call.wire)}


async def _outcome(send: Send, call: ScriptCall) -> tuple[str, Any]:
    """What a call answered: ("reply", the reply) or (the error's type, its message)."""
    try:
        return "reply", await send(call)
    except Exception as exc:
        return type(exc).__name__, str(exc)


async def _pool_is_clean(client: Any) -> bool:
    """Every connection is back in the pool and none holds a reply nobody read."""
    pool = client.connection_pool
    if pool._in_use_connections:
        return False
    for conn in pool._available_connections:
        if conn.is_connected and await conn.can_read():
            return False
    return True


def _pool_dropped(client: Any) -> bool:
    """No connection in use, and none pooled still connected: a cancelled call's connection
    was dropped, its unread reply with it."""
    pool = client.connection_pool
    return not pool._in_use_connections and not any(
        conn.is_connected for conn in pool._available_connections
    )


async def _history(
    client: Any, paths: dict[str, Send] | None = None
) -> dict[str, list[tuple[str, Any]]]:
    """The same history through each path (``_paths`` by default), in a key space of its own."""
    outcomes: dict[str, list[tuple[str, Any]]] = {}
    failing = ScriptCall(BROKEN, "g", ("k",), ("a",))
    for name, send in (_paths(client) if paths is None else paths).items():
        for spec in [*load_scripts().values(), BROKEN, ECHO]:
            await client.script_load(spec.source)
        seen = [await _outcome(send, _policy_call(name))]
        seen += [await _outcome(send, call) for call in _lease_calls(name)]
        seen.append(await _outcome(send, _echo("ключ")))
        seen.append(await _outcome(send, failing))
        await client.script_flush()
        seen.append(await _outcome(send, _lease_calls(name)[0]))
        seen.append(await _outcome(send, ScriptCall(BROKEN, "g", (), (True,))))  # type: ignore[arg-type]
        outcomes[name] = seen
    return outcomes


@pytest.mark.parametrize("store", ["fake", pytest.param("real", marks=pytest.mark.real_redis)])
def test_replies_and_error_replies_are_redis_pys(
    store: str, request: pytest.FixtureRequest
) -> None:
    """The same history in two key spaces, one per path: the same replies (admitted, refused,
    too large, unknown tenant, snapshot, text beyond ASCII); NOSCRIPT after a flush, a
    script's own error and a bool redis-py refuses come back as the same exceptions; the
    connection stays usable after each and the pool whole. On fakeredis and a real server."""

    async def main() -> None:
        if store == "fake":
            client: Any = _plain_fake()
        else:
            srv: RedisServer = request.getfixturevalue("server")
            client = async_url_backend(srv.url, socket_timeout=2.0).connection("g")
        try:
            outcomes = await _history(client)
            assert await _pool_is_clean(client)
        finally:
            await client.aclose()
        packed, general = outcomes["packed"], outcomes["evalsha"]
        assert packed == general
        assert [kind for kind, _ in packed[-3:]] == ["ResponseError", "NoScriptError", "DataError"]
        assert packed[-4] == ("reply", "ключ".encode())

    asyncio.run(main())


def test_an_unreachable_fake_server_fails_each_path_alike() -> None:
    """fakeredis told it is down: both paths raise the same ``ConnectionError`` and leave the
    pool whole; back up, both answer."""

    async def main() -> None:
        client: Any = _plain_fake()
        server = client.connection_pool.connection_kwargs["server"]
        try:
            await client.script_load(ECHO_SOURCE)
            for send in _paths(client).values():
                assert await _outcome(send, _echo("up")) == ("reply", b"up")
            server.connected = False
            down = [await _outcome(send, _echo("down")) for send in _paths(client).values()]
            assert down[0] == down[1] and down[0][0] == "ConnectionError"
            assert await _pool_is_clean(client)
            server.connected = True
            for send in _paths(client).values():
                assert await _outcome(send, _echo("again")) == ("reply", b"again")
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.real_redis
@pytest.mark.parametrize("path", ["packed", "evalsha"])
def test_a_paused_then_killed_server_fails_each_path_alike(server: RedisServer, path: str) -> None:
    """Paused: the call times out at the socket timeout with redis-py's message, nothing
    leaks, and the next call after the resume is served. Killed: connection errors, no leak,
    served again after a restart."""

    async def main() -> None:
        client = async_url_backend(server.url, socket_timeout=0.3).connection("g")
        send = _paths(client)[path]
        try:
            await client.script_load(load_scripts()["acquire"].source)
            await client.script_load(load_scripts()["apply_policy"].source)
            assert (await _outcome(send, _policy_call("p")))[0] == "reply"
            call = _lease_calls("p")[0]
            assert (await _outcome(send, call))[0] == "reply"
            server.pause()
            try:
                kind, message = await _outcome(send, call)
                assert kind == "TimeoutError"
                assert message == f"Timeout reading from 127.0.0.1:{server.port}"
                assert await _pool_is_clean(client)
            finally:
                server.resume()
            assert (await _outcome(send, call))[0] == "reply"
            server.kill()
            failures = {(await _outcome(send, call))[0] for _ in range(3)}
            assert failures == {"ConnectionError"} and await _pool_is_clean(client)
            server.start()
            await client.script_load(load_scripts()["acquire"].source)
            assert (await _outcome(send, call))[0] == "reply" and await _pool_is_clean(client)
        finally:
            await client.aclose()

    asyncio.run(main())


# -- cancellation -------------------------------------------------------------------------------


def _spy_reads(client: Any, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set whenever a connection of ``client``'s pool starts reading a reply."""
    reading = asyncio.Event()
    cls = client.connection_pool.connection_class
    real = cls.read_response

    async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        reading.set()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "read_response", read_response)
    return reading


@pytest.mark.real_redis
@pytest.mark.parametrize("path", ["packed", "evalsha"])
def test_a_call_cancelled_mid_read_never_goes_back_with_its_reply_unread(
    server: RedisServer, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call cancelled while it waits for a paused server's reply: the cancellation is
    raised, the connection is dropped rather than pooled with that reply on its way, and
    after the resume the next call reads its own reply, not the cancelled one's. Both paths."""

    async def main() -> None:
        client = async_url_backend(server.url, socket_timeout=5.0).connection("g")
        send = _paths(client)[path]
        reading = _spy_reads(client, monkeypatch)
        try:
            await client.script_load(ECHO_SOURCE)
            assert await send(_echo("warm")) == b"warm"
            reading.clear()
            server.pause()
            try:
                call = asyncio.ensure_future(send(_echo("cancelled")))
                await asyncio.wait_for(reading.wait(), 5.0)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert _pool_dropped(client)
            finally:
                server.resume()
            assert await send(_echo("next")) == b"next"
            assert await _pool_is_clean(client)
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's script calls on its pool (``AsyncPackedScripts``), not on a pipe: what
    the URL clients fall back to where ``ScriptPipe`` cannot take a connection over
    (tests/test_script_pipe.py holds the pipe to the same behaviour)."""
    monkeypatch.setattr(ScriptPipe, "of", classmethod(lambda cls, *args: None))


@pytest.mark.real_redis
@pytest.mark.usefixtures("pooled")
def test_the_batch_timer_firing_mid_read_leaves_no_dirty_connection(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's batch timer (its deadline far below the socket timeout here) cancels a
    packed round trip waiting on a paused server: the caller hears ``BackendUnavailable``
    (no reply within the bound), the round trip's task winds down, no connection is left in
    use or pooled with the unread reply, and after the resume the next decision and its
    release are answered correctly. No script call ever went through ``evalsha``."""

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, socket_timeout=5.0, auto_renew=False)
        quota._call_bound = 0.2  # each round trip's deadline: the batch timer fires first
        client: Any = quota.backend.connection("g")
        sent: list[tuple[Any, ...]] = []
        real = client.evalsha

        def counted(*args: Any) -> Any:
            sent.append(args)
            return real(*args)

        monkeypatch.setattr(client, "evalsha", counted)
        reading = _spy_reads(client, monkeypatch)
        try:
            await quota.apply_policy(POLICY)
            assert (await quota.try_acquire("a", 1)).admitted
            reading.clear()
            server.pause()
            try:
                with pytest.raises(BackendUnavailable, match="no reply from Redis within"):
                    await quota.try_acquire("a", 1)
                assert reading.is_set()  # it was cancelled mid-read
                (batcher,) = quota._batchers.values()
                await asyncio.gather(*batcher._tasks)  # the cancelled round trip winds down
                assert _pool_dropped(client)
            finally:
                server.resume()
            decision = await quota.try_acquire("a", 2)
            assert decision.admitted and decision.lease is not None
            assert decision.lease.units == 2
            assert (await quota.release(decision.lease)).state == "released"
            assert await _pool_is_clean(client)
            assert sent == []
        finally:
            await quota.close()

    asyncio.run(main())


@pytest.mark.real_redis
@pytest.mark.usefixtures("pooled")
def test_a_caller_cancelled_mid_flight_leaves_the_others_their_replies(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers share a packed round trip to a paused server; one is cancelled mid-read.
    It hears its cancellation; the round trip goes on for the other, which is admitted after
    the resume; the connection goes back clean and the next call answers. The cancelled
    caller's call was sent and admitted: its lease goes back (tests/test_async_cancelled.py)."""

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, socket_timeout=5.0, auto_renew=False)
        client: Any = quota.backend.connection("g")
        reading = _spy_reads(client, monkeypatch)
        try:
            await quota.apply_policy(POLICY)
            assert (await quota.try_acquire("a", 1)).admitted
            reading.clear()
            server.pause()
            try:
                callers = [asyncio.ensure_future(quota.try_acquire("a", 1)) for _ in range(2)]
                await asyncio.wait_for(reading.wait(), 5.0)
                callers[0].cancel()
            finally:
                server.resume()
            with pytest.raises(asyncio.CancelledError):
                await callers[0]
            assert (await callers[1]).admitted
            (batcher,) = quota._batchers.values()
            await asyncio.gather(*batcher._tasks)
            assert await _pool_is_clean(client)
            assert (await quota.try_acquire("a", 1)).admitted
            await asyncio.gather(*quota._background)  # the cancelled caller's release
            assert (await quota.snapshot("g")).used == 3
        finally:
            await quota.close()

    asyncio.run(main())


# -- the async client takes the packed path, and leaves it when it must -------------------------


@pytest.mark.real_redis
def test_the_async_client_sends_script_calls_packed(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a URL, try_acquire, release and a reload after NOSCRIPT never go through
    ``evalsha``; with redis-py's own metrics on they do (redis-py counts each command)."""

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, auto_renew=False)
        client: Any = quota.backend.connection("g")
        sent: list[tuple[Any, ...]] = []
        real = client.evalsha

        def counted(*args: Any) -> Any:
            sent.append(args)
            return real(*args)

        monkeypatch.setattr(client, "evalsha", counted)
        try:
            await quota.apply_policy(POLICY)
            lease = (await quota.try_acquire("a", 1)).lease
            assert lease is not None and (await quota.release(lease)).state == "released"
            await client.script_flush()
            lease = (await quota.try_acquire("a", 1)).lease  # NOSCRIPT, loaded, sent again
            assert lease is not None and (await quota.release(lease)).state == "released"
            assert sent == []
            enabled = type("Enabled", (), {"is_enabled": lambda self: True})()
            monkeypatch.setattr(backends, "_OBSERVABILITY", lambda: enabled)
            lease = (await quota.try_acquire("a", 1)).lease
            assert lease is not None and (await quota.release(lease)).state == "released"
            # Each once, or twice when the first met NOSCRIPT (the calls before went by FCALL).
            named = {load_scripts()[n].sha for n in ("acquire", "release")}
            assert {args[0] for args in sent} == named and len(sent) in (2, 3, 4)
        finally:
            await quota.close()

    asyncio.run(main())


def test_a_backend_that_overrides_connection_or_embeds_keeps_evalsha() -> None:
    """An ``AsyncBackend`` of a qualifying client sends packed; a subclass overriding
    ``connection`` (it must see every call) and the embedded fakeredis do not. The packed
    one answers as the others do."""

    class Spied(AsyncBackend):
        def connection(self, route: str) -> Any:
            return super().connection(route)

    async def decide(backend: Any) -> tuple[bool, bool]:
        quota = AsyncQuotaClient(backend=backend, auto_renew=False)
        try:
            await quota.apply_policy(POLICY)
            admitted = (await quota.try_acquire("a", 1)).admitted
            (batcher,) = quota._batchers.values()
            return batcher._send_script is not None, admitted
        finally:
            await quota.close()

    async def main() -> None:
        plain = await decide(AsyncBackend([_plain_fake()], "plain", packed=True))
        spied = await decide(Spied([_plain_fake()], "spied", packed=True))
        embedded = await decide(async_embedded_backend(shared=False))
        assert plain == (True, True) and spied == (False, True) and embedded == (False, True)

    asyncio.run(main())
