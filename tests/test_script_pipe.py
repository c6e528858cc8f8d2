"""The async client's script pipe answers and fails as redis.asyncio's ``evalsha`` does.

On the async backends made from URLs, the batcher's script calls to a shard
go pipelined over one connection of ``script_pipe.ScriptPipe``, made and
greeted by redis-py (AUTH, SELECT...) and then read by the pipe itself. These
tests hold it to redis-py on a real server: the same replies and error
replies, the same errors when the server is paused, killed or closed, the
handshake's password and database, replies matched to their calls however
many are in flight and whichever callers are cancelled; and the client's
round-trip bound on the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from ratequota import AsyncQuotaClient
from ratequota.clients.async_backends import AsyncPackedScripts, async_url_backend
from ratequota.clients.backends import async_no_retry, pipelined
from ratequota.clients.script_pipe import ScriptPipe
from ratequota.engine.ops import Batch, ScriptCall
from ratequota.engine.scripts import ScriptSpec, load_scripts
from ratequota.errors import BackendUnavailable
from tests.servers import RedisServer
from tests.test_async_packed_calls import (
    BROKEN,
    ECHO,
    ECHO_SOURCE,
    POLICY,
    Send,
    _echo,
    _history,
    _outcome,
    _pool_is_clean,
)
from tests.test_packed_calls import _lease_calls, _policy_call

pytestmark = pytest.mark.real_redis


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may flush, pause and kill."""
    return private_redis


def _pipe_of(backend: Any) -> ScriptPipe:
    pipe = backend.script_sender("g")
    assert isinstance(pipe, ScriptPipe)
    return pipe


@contextlib.asynccontextmanager
async def _echo_pipe(url: str) -> AsyncIterator[tuple[Any, ScriptPipe]]:
    """A URL backend's client and pipe (socket timeout 5 s), the echo script loaded and the
    pipe's connection open; the backend closed on the way out."""
    backend = async_url_backend(url, socket_timeout=5.0)
    client: Any = backend.connection("g")
    pipe = _pipe_of(backend)
    try:
        await client.script_load(ECHO_SOURCE)
        assert await pipe(_echo("open")) == b"open"
        yield client, pipe
    finally:
        await backend.close()


def test_the_url_clients_get_a_pipe_and_others_do_not() -> None:
    """A URL client's shard sends through a pipe; a client the pipe cannot take a connection
    of keeps the pooled packed path or redis-py's: fakeredis's connections, replies decoded
    to text, no socket timeout (a pipe must bound every call)."""

    async def main() -> None:
        url = "redis://127.0.0.1:1/0"
        backend = async_url_backend(url, socket_timeout=1.0)
        plain: dict[str, Any] = {"retry": async_no_retry()}
        decoded = redis.asyncio.Redis.from_url(url, decode_responses=True, **plain)
        unbounded = redis.asyncio.Redis.from_url(url, **plain)
        try:
            _pipe_of(backend)
            assert ScriptPipe.of(decoded) is None and ScriptPipe.of(unbounded) is None
            assert AsyncPackedScripts.of(unbounded) is not None
            assert ScriptPipe.of(object()) is None
        finally:
            await backend.close()
            await decoded.aclose()
            await unbounded.aclose()

    asyncio.run(main())


def test_replies_and_error_replies_are_redis_pys(server: RedisServer) -> None:
    """Admitted, refused, too large, unknown tenant, a snapshot, text beyond ASCII; NOSCRIPT
    after a flush, a script's own error and a bool redis-py refuses: the pipe answers each
    as ``evalsha`` does, and the connection serves on after each."""

    async def main() -> None:
        backend = async_url_backend(server.url, socket_timeout=2.0, functions=False)
        client: Any = backend.connection("g")
        paths: dict[str, Send] = {
            "pipe": _pipe_of(backend),
            "evalsha": lambda call: client.evalsha(*call.wire),
        }
        try:
            outcomes = await _history(client, paths)
            assert await _pool_is_clean(client)
        finally:
            await backend.close()
        assert outcomes["pipe"] == outcomes["evalsha"]
        kinds = [kind for kind, _ in outcomes["pipe"][-3:]]
        assert kinds == ["ResponseError", "NoScriptError", "DataError"]
        assert outcomes["pipe"][-4] == ("reply", "ключ".encode())

    asyncio.run(main())


def test_a_paused_then_killed_server_fails_the_pipe_as_redis_py(server: RedisServer) -> None:
    """Paused: the call times out at the socket timeout with redis-py's message, and the
    next call after the resume is served on a new connection. Killed: connection errors;
    served again after a restart."""

    async def main() -> None:
        backend = async_url_backend(server.url, socket_timeout=0.3, functions=False)
        client: Any = backend.connection("g")
        pipe = _pipe_of(backend)
        try:
            await client.script_load(load_scripts()["acquire"].source)
            await client.script_load(load_scripts()["apply_policy"].source)
            assert (await _outcome(pipe, _policy_call("p")))[0] == "reply"
            call = _lease_calls("p")[0]
            assert (await _outcome(pipe, call))[0] == "reply"
            first = pipe._wire
            server.pause()
            try:
                assert await _outcome(pipe, call) == (
                    "TimeoutError",
                    f"Timeout reading from 127.0.0.1:{server.port}",
                )
            finally:
                server.resume()
            assert (await _outcome(pipe, call))[0] == "reply"
            assert pipe._wire is not first
            server.kill()
            failures = {(await _outcome(pipe, call))[0] for _ in range(3)}
            assert failures == {"ConnectionError"}
            server.start()
            await client.script_load(load_scripts()["acquire"].source)
            assert (await _outcome(pipe, call))[0] == "reply"
        finally:
            await backend.close()

    asyncio.run(main())


async def _written(pipe: ScriptPipe, count: int) -> None:
    """Until ``count`` calls are on the pipe's connection (each is written as its task runs)."""
    for _ in range(1000):
        wire = pipe._wire
        if wire is not None and len(wire._waiting) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError("the calls were never written")


def test_a_cancelled_call_keeps_the_connection_and_the_replies_in_order(
    server: RedisServer,
) -> None:
    """A call cancelled while a paused server owes its reply: the cancellation is raised, the
    connection stays, and after the resume the next call reads its own reply, not the
    cancelled one's (which is read and dropped)."""

    async def main() -> None:
        async with _echo_pipe(server.url) as (_, pipe):
            wire = pipe._wire
            server.pause()
            try:
                call = asyncio.ensure_future(pipe(_echo("cancelled")))
                await _written(pipe, 1)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            finally:
                server.resume()
            assert await pipe(_echo("next")) == b"next"
            assert pipe._wire is wire

    asyncio.run(main())


@given(cancelled=st.lists(st.booleans(), min_size=1, max_size=80))
@settings(deadline=None)
def test_concurrent_calls_on_one_connection_each_get_their_own_reply(
    redis_server: RedisServer, cancelled: list[bool]
) -> None:
    """Any number of calls in flight at once on the one connection, any of them cancelled
    before its reply: every other caller gets its own reply, and the server saw one
    connection from the pipe."""

    async def main() -> None:
        async with _echo_pipe(redis_server.url) as (client, pipe):
            before = len(await client.client_list())  # the pipe's connection among them
            calls = [asyncio.ensure_future(pipe(_echo(f"v{i}"))) for i in range(len(cancelled))]
            # One loop iteration: every call's task writes it, and no reply is read before
            # the cancellations below (replies are read at the next iteration's poll).
            await asyncio.sleep(0)
            assert pipe._wire is not None and len(pipe._wire._waiting) == len(calls)
            for call, cancel in zip(calls, cancelled, strict=True):
                if cancel:
                    call.cancel()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            for i, (outcome, cancel) in enumerate(zip(outcomes, cancelled, strict=True)):
                if cancel:
                    assert isinstance(outcome, asyncio.CancelledError)
                else:
                    assert outcome == f"v{i}".encode()
            assert await pipe(_echo("after")) == b"after"
            assert len(await client.client_list()) == before

    asyncio.run(main())


def test_the_client_bounds_each_round_trip_on_the_pipe(server: RedisServer) -> None:
    """The client's round-trip bound (far below the socket timeout here) holds on the pipe:
    a decision against a paused server hears ``BackendUnavailable`` (no reply within the
    bound) with nothing sent through ``evalsha``; after the resume the next decision and
    its release are answered correctly on a new connection."""

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, socket_timeout=5.0, auto_renew=False)
        quota._call_bound = 0.2
        client: Any = quota.backend.connection("g")
        pipe = _pipe_of(quota.backend)
        sent: list[tuple[Any, ...]] = []
        real = client.evalsha

        def counted(*args: Any) -> Any:
            sent.append(args)
            return real(*args)

        client.evalsha = counted
        try:
            await quota.apply_policy(POLICY)
            assert (await quota.try_acquire("a", 1)).admitted
            first = pipe._wire
            server.pause()
            try:
                with pytest.raises(BackendUnavailable, match=r"no reply from Redis within 0\.200s"):
                    await quota.try_acquire("a", 1)
            finally:
                server.resume()
            decision = await quota.try_acquire("a", 2)
            assert decision.admitted and decision.lease is not None
            assert (await quota.release(decision.lease)).state == "released"
            assert pipe._wire is not first and sent == []
        finally:
            await quota.close()

    asyncio.run(main())


def test_the_handshake_is_redis_pys_password_and_database(server: RedisServer) -> None:
    """A server that wants a password, and a URL naming a database: the pipe's connection is
    greeted by redis-py, so its calls land in that database; a wrong password fails as
    ``evalsha`` does."""
    redis.Redis(port=server.port).config_set("requirepass", "s3cret")

    async def main() -> None:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        quota = AsyncQuotaClient(url, auto_renew=False)
        raw = redis.asyncio.Redis(port=server.port, password="s3cret", db=3)
        wrong = async_url_backend(url.replace("s3cret", "wrong"), socket_timeout=2.0)
        try:
            await quota.apply_policy(POLICY)
            assert (await quota.try_acquire("a", 1)).admitted
            assert isinstance(quota.backend.script_sender("g"), ScriptPipe)
            assert await raw.keys("*{g}*")
            await raw.select(0)
            assert not await raw.keys("*{g}*")
            bad: Any = wrong.connection("g")
            paths: dict[str, Send] = {
                "pipe": _pipe_of(wrong),
                "evalsha": lambda call: bad.evalsha(*call.wire),
            }
            failed = [await _outcome(send, _echo("x")) for send in paths.values()]
            assert failed[0] == failed[1] and failed[0][0] == "AuthenticationError"
        finally:
            await quota.close()
            await raw.aclose()
            await wrong.close()

    asyncio.run(main())


def test_closing_fails_the_calls_in_flight(server: RedisServer) -> None:
    """``close`` while a paused server owes replies: each caller hears ``ConnectionError`` at
    once; a call after the close is refused, never sent."""

    async def main() -> None:
        backend = async_url_backend(server.url, socket_timeout=5.0)
        client: Any = backend.connection("g")
        pipe = _pipe_of(backend)
        await client.script_load(ECHO_SOURCE)
        assert await pipe(_echo("warm")) == b"warm"
        server.pause()
        try:
            calls = [asyncio.ensure_future(pipe(_echo("owed"))) for _ in range(3)]
            await _written(pipe, 3)
            await backend.close()
            for call in calls:
                with pytest.raises(redis.exceptions.ConnectionError):
                    await call
            with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
                await pipe(_echo("late"))
        finally:
            server.resume()

    asyncio.run(main())


def test_a_batch_goes_in_one_write_with_redis_pys_replies(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``Batch`` (the renewer's calls of one shard) goes on the pipe in one write: the
    replies are a redis-py pipeline's, an error reply (a script's own error, NOSCRIPT) in
    place of its call's; no redis-py pipeline is made."""

    async def main() -> None:
        quota = AsyncQuotaClient(server.url, auto_renew=False)
        client: Any = quota.backend.connection("g")
        try:
            for spec in (ECHO, BROKEN):
                await client.script_load(spec.source)
            unloaded = ScriptSpec("unloaded", "return 2", "0" * 40, (), (), False)
            calls = (
                _echo("one"),
                ScriptCall(BROKEN, "g", (), ()),
                ScriptCall(unloaded, "g", (), ()),
                _echo("two"),
            )
            expected = list(await pipelined(client, [call.wire for call in calls]))
            monkeypatch.setattr(client, "pipeline", None)  # any pipeline now fails the test
            got = await quota._perform(Batch("g", calls))
            assert [_kind(r) for r in got] == [_kind(r) for r in expected]
            assert [_kind(r) for r in got] == [
                b"one",
                ("ResponseError", str(expected[1])),
                ("NoScriptError", str(expected[2])),
                b"two",
            ]
        finally:
            await quota.close()

    asyncio.run(main())


def _kind(reply: Any) -> Any:
    """A reply as it compares: an exception by its type and text."""
    if isinstance(reply, Exception):
        return type(reply).__name__, str(reply)
    return reply


def test_the_wire_is_watched_for_the_soonest_reply_due(server: RedisServer) -> None:
    """Calls with different bounds share the connection (the pipe's own calls carry the
    socket timeout, the batcher's its round-trip bound): the wire's one timer is always
    armed for the soonest reply due, so a short bound is kept behind a long one."""

    async def main() -> None:
        async with _echo_pipe(server.url) as (_, pipe):
            wire = pipe._wire
            assert wire is not None
            server.pause()
            try:
                long = asyncio.ensure_future(pipe(_echo("long")))
                await _written(pipe, 1)
                assert wire._timer is not None
                late = wire._timer.when()
                heard: list[Any] = []
                assert pipe.send_now(_echo("short").packed, [heard.append], 0.2)
                assert wire._timer.when() < late - 4.0  # re-armed for the short call
                with pytest.raises(redis.exceptions.TimeoutError):
                    await long  # the short call's deadline ended the wire, for both
                assert len(heard) == 1 and isinstance(heard[0], redis.exceptions.TimeoutError)
            finally:
                server.resume()
            assert await pipe(_echo("again")) == b"again"

    asyncio.run(main())
