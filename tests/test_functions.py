"""The scripts as a Redis function library: ``FCALL`` answers as ``EVALSHA`` does, a lost
library is loaded again, and a server that cannot take functions keeps ``EVALSHA``.

``ratequota.clients.functions`` decides per server; the library is built by
``ratequota.engine.scripts``. Every other real-Redis test already runs on
functions (the clients made from URLs use them by default); these pin the
choices: what each refusal means, recovery from ``FUNCTION FLUSH``, the
fallback under an ACL without ``FCALL`` or ``FUNCTION LOAD``, and the setting
that turns functions off.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from typing import Any

import fakeredis
import pytest
import redis

from ratequota import AsyncQuotaClient, GroupPolicy, Policy, QuotaClient, TenantPolicy
from ratequota.clients.async_backends import AsyncPackedScripts
from ratequota.clients.backends import PackedScripts, url_backend
from ratequota.clients.functions import Functions
from ratequota.clients.script_pipe import ScriptPipe
from ratequota.engine import scripts
from ratequota.engine.ops import ScriptCall
from ratequota.engine.resp import pack_evalsha, pack_fcall
from ratequota.engine.scripts import ScriptSpec, function_library, load_scripts
from ratequota.errors import BackendError
from tests.servers import RedisServer
from tests.test_packed_calls import _lease_calls, _outcome, _policy_call

POLICY = Policy([GroupPolicy("g", capacity=8, tenants=[TenantPolicy("a", guarantee=4)])])
ERRORS = redis.exceptions


# -- the decisions, without a server -------------------------------------------------------------


def test_a_new_server_loads_the_library_with_its_first_write_once() -> None:
    functions = Functions()
    load = functions.take_load()
    assert load is not None and function_library().source.encode() in load
    assert load.startswith(b"*3\r\n$8\r\nFUNCTION\r\n$4\r\nLOAD\r\n")
    assert functions.take_load() is None  # one writer takes it


@pytest.mark.parametrize(
    "reply",
    [b"ratequota_0123", ERRORS.ResponseError("Library 'ratequota_0123' already exists")],
)
def test_a_loaded_library_keeps_functions_on(reply: Any) -> None:
    functions = Functions()
    functions.take_load()
    functions.loaded(reply)
    assert functions.on and not functions.due


@pytest.mark.parametrize(
    "refusal",
    [
        ERRORS.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        ERRORS.BusyLoadingError("Redis is loading the dataset in memory"),
        ERRORS.ReadOnlyError("You can't write against a read only replica."),
        ERRORS.ConnectionError("Connection closed by server."),
        ERRORS.TimeoutError("Timeout reading from 127.0.0.1:1"),
    ],
)
def test_a_passing_refusal_of_the_load_puts_it_off_to_the_next_write(refusal: Any) -> None:
    functions = Functions()
    functions.take_load()
    functions.loaded(refusal)
    assert functions.on and functions.due and functions.take_load() is not None


@pytest.mark.parametrize(
    "refusal",
    [
        ERRORS.NoPermissionError(
            "User quota has no permissions to run the 'function|load' command"
        ),
        ERRORS.ResponseError("unknown command 'FUNCTION', with args beginning with: 'LOAD' "),
        ERRORS.ResponseError("Error compiling function: user_function:1: '=' expected"),
    ],
)
def test_a_server_that_cannot_load_the_library_gets_evalsha(refusal: Any) -> None:
    functions = Functions()
    functions.take_load()
    functions.loaded(refusal)
    assert not functions.on and functions.take_load() is None
    call = _lease_calls("p")[0]
    assert functions.pack(call) == pack_evalsha(call.script.sha, call.keys, call.args)


def test_a_missing_function_is_noscript_and_loads_the_library_again() -> None:
    functions = Functions()
    functions.take_load()
    answer = functions.answer(ERRORS.ResponseError("Function not found"))
    assert isinstance(answer, ERRORS.NoScriptError)
    assert functions.on and functions.take_load() is not None


@pytest.mark.parametrize(
    "refusal",
    [
        ERRORS.NoPermissionError("User quota has no permissions to run the 'fcall' command"),
        ERRORS.ResponseError("unknown command 'FCALL', with args beginning with: "),
        ERRORS.ResponseError("unknown command `FCALL`, with args beginning with: "),
        ERRORS.ResponseError("unsupported command 'fcall'"),
    ],
)
def test_a_refused_fcall_is_noscript_and_evalsha_from_then_on(refusal: Any) -> None:
    functions = Functions()
    answer = functions.answer(refusal)
    assert isinstance(answer, ERRORS.NoScriptError) and not functions.on


@pytest.mark.parametrize(
    "error",
    [
        ERRORS.NoScriptError("No matching script. Please use EVAL."),
        ERRORS.NoPermissionError("User quota has no permissions to run the 'hset' command"),
        ERRORS.ResponseError("user_function:12: Script attempted to access nonexistent global"),
        ERRORS.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_other_errors_reach_the_caller_as_they_are(error: Any) -> None:
    functions = Functions()
    assert functions.answer(error) is error and functions.on


def test_calls_pack_as_fcall_of_their_function_or_as_evalsha() -> None:
    call = _lease_calls("p")[0]
    assert Functions().pack(call) == pack_fcall(call.script.function, call.keys, call.args)
    assert call.script.function.startswith(function_library().name + "_")
    evalsha = pack_evalsha(call.script.sha, call.keys, call.args)
    assert Functions(False).pack(call) == evalsha and Functions(False).take_load() is None
    outside = ScriptSpec("echo", "return ARGV[1]", "0" * 40, (), ("value",), False)
    stranger = ScriptCall(outside, "g", (), ("x",))
    assert Functions().pack(stranger) == pack_evalsha("0" * 40, (), ("x",))


def test_the_library_registers_every_script_under_its_spec_name_with_its_flags() -> None:
    library = function_library()
    for spec in load_scripts().values():
        assert f"redis.register_function{{function_name = '{spec.function}'," in library.source
    assert library.source.startswith(f"#!lua name={library.name}\n")
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    client.function_load(library.source)
    (listed,) = client.function_list()
    functions = [_fields(f) for f in _fields(listed)["functions"]]
    flags = {
        _text(f["name"]).removeprefix(library.name + "_"): {_text(x) for x in f["flags"]}
        for f in functions
    }
    assert flags == {
        name: set(scripts.FUNCTION_FLAGS.get(name, ())) for name in scripts.SCRIPT_NAMES
    }
    assert flags["snapshot"] == {"no-writes"} and flags["release"] == {"allow-oom"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(entry: Any) -> dict[str, Any]:
    """A ``FUNCTION LIST`` entry (a map, or RESP2's flat list) by field name."""
    pairs = entry.items() if isinstance(entry, dict) else zip(entry[::2], entry[1::2], strict=True)
    return {_text(k): v for k, v in pairs}


def test_the_library_is_named_by_its_whole_text() -> None:
    """A library already loaded is never replaced, so its name must change with anything in
    it: the code, and the flags its functions are registered with."""
    folder = scripts._lua_dir()
    parts = scripts.library_parts(
        "\n".join((folder / f"{n}.lua").read_text(encoding="utf-8") for n in scripts.LIBRARY)
    )
    bodies = {n: (folder / f"{n}.lua").read_text(encoding="utf-8") for n in scripts.SCRIPT_NAMES}
    text = scripts.library_source("ratequota", parts, bodies)
    assert function_library().name == "ratequota_" + hashlib.sha1(text.encode()).hexdigest()[:16]


#: How lua/_codec.lua makes a memo, and remember, its one writer: only when MEMOS_KEPT.
MEMO = "MEMOS_KEPT and {[0] = 0}"
WRITER = "remember"


def test_the_library_keeps_no_state_from_one_call_to_the_next_but_its_memos() -> None:
    """A function library's locals outlive the call (an ``EVALSHA`` made them afresh each
    time): every top-level definition is a function, a number or text constant, or a memo,
    and none is assigned again anywhere (``KEYS`` and ``ARGV``, set by each function as it
    begins, are the call's). A memo is written only by ``remember``, which maps a key to a
    parse (tests/test_memos.py)."""
    folder = scripts._lua_dir()
    text = "\n".join((folder / f"{n}.lua").read_text(encoding="utf-8") for n in scripts.LIBRARY)
    code = scripts._COMMENT.sub("", text)
    bodies = [(folder / f"{n}.lua").read_text(encoding="utf-8") for n in scripts.SCRIPT_NAMES]
    code += "\n".join(scripts._COMMENT.sub("", body) for body in bodies)
    memos = []
    for name, source in scripts.library_parts(text):
        head = " ".join(scripts._COMMENT.sub("", source).split())
        if not head.startswith("local function"):
            value = head.split("=", 1)[1].strip()
            if value == MEMO:
                memos.append(name)
            elif name == WRITER:
                assert value.startswith("MEMOS_KEPT and function("), head
            else:
                value = re.sub(r"'[^']*'", "''", value)
                assert "{" not in value and not re.search(r"[\w\]]\s*\(", value), (
                    f"{name} is not a constant: {head}"
                )
        for match in re.finditer(rf"(?<![\w.:]){re.escape(name)}\s*=(?!=)", code):
            line = code[: match.start()].rsplit("\n", 1)[-1]
            assert line.startswith("local "), f"{name} is assigned again: {line.strip()}"
    assert memos, "no memo found: the checks below would pass on nothing"
    outside = "\n".join(
        scripts._COMMENT.sub("", source)
        for name, source in scripts.library_parts(text)
        if name != WRITER
    ) + "\n".join(scripts._COMMENT.sub("", body) for body in bodies)
    for name in memos:
        assert not re.search(rf"(?<![\w.:]){name}\s*\[[^\]]*\]\s*=(?!=)", outside), name
        for match in re.finditer(rf"(?<![\w.:]){name}\b", outside):
            line = outside[: match.start()].rsplit("\n", 1)[-1]
            line += outside[match.end() :].split("\n", 1)[0]
            assert "rawset" not in line and "table." not in line, line


def test_the_library_loads_in_fakeredis_and_answers_as_the_script() -> None:
    """fakeredis refuses, as Redis does, a library that reads a global while it loads."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    assert client.function_load(function_library().source) == function_library().name.encode()
    answers = {}
    for how in ("fcall", "evalsha"):
        call = _policy_call(how)
        if how == "fcall":
            answers[how] = client.fcall(
                call.script.function, len(call.keys), *call.keys, *call.args
            )
        else:
            answers[how] = client.eval(call.script.source, len(call.keys), *call.keys, *call.args)
    assert answers["fcall"] == answers["evalsha"]


# -- on a real server ---------------------------------------------------------------------------


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may flush and set users on."""
    return private_redis


def _libraries(client: Any) -> list[bytes]:
    """The names of the function libraries a server holds."""
    return [
        dict(zip(e[::2], e[1::2], strict=True))[b"library_name"] for e in client.function_list()
    ]


def _counts(server: RedisServer) -> dict[str, int]:
    client = server.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


@pytest.mark.real_redis
def test_fcall_answers_every_call_as_evalsha_does(server: RedisServer) -> None:
    """The same history in two key spaces, by ``FCALL`` and by ``EVALSHA`` on one pool: the
    same replies (admitted, refused, too large, unknown tenant, snapshot); the library was
    loaded by the first write, once, and every call of the first went by ``FCALL``."""
    client = url_backend(server.url, socket_timeout=2.0).connection("g")
    for spec in load_scripts().values():
        client.script_load(spec.source)
    paths = {"fcall": PackedScripts(client), "evalsha": PackedScripts(client, functions=False)}
    seen = {
        name: [_outcome(send, call) for call in [_policy_call(name), *_lease_calls(name)]]
        for name, send in paths.items()
    }
    assert seen["fcall"] == seen["evalsha"]
    counts = _counts(server)
    assert counts["function|load"] == 1 and counts["fcall"] == len(seen["fcall"])
    client.close()


@pytest.mark.real_redis
def test_a_flushed_library_is_loaded_again_by_both_clients(server: RedisServer) -> None:
    """``FUNCTION FLUSH`` between decisions (as an empty restart would leave a server): every
    decision of the sync client, the async client's pipe and its pool is still answered, the
    library is back, and calls go by ``FCALL`` again."""
    admin = server.client()
    quota = QuotaClient.from_url(server.url, auto_renew=False)
    quota.apply_policy(POLICY)
    for _ in range(2):
        admin.function_flush()
        lease = quota.try_acquire("a", 1).lease
        assert lease is not None and quota.release(lease).state == "released"
    quota.close()

    async def main(pipe: bool) -> None:
        client = AsyncQuotaClient.from_url(server.url, auto_renew=False)
        sender = client.backend.script_sender("g")
        assert isinstance(sender, ScriptPipe if pipe else AsyncPackedScripts)
        for _ in range(2):
            admin.function_flush()
            decisions = await asyncio.gather(*(client.try_acquire("a", 1) for _ in range(3)))
            assert all(d.admitted for d in decisions)
            for decision in decisions:
                assert decision.lease is not None
                assert (await client.release(decision.lease)).state == "released"
        await client.close()

    asyncio.run(main(pipe=True))
    fcalls = _counts(server)["fcall"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ScriptPipe, "of", classmethod(lambda cls, *args: None))
        asyncio.run(main(pipe=False))
    assert _libraries(admin) == [function_library().name.encode()]
    assert _counts(server)["fcall"] > fcalls
    admin.close()


#: ACL rules: the documented minimal one (docs/deployment.md) has neither FCALL nor FUNCTION.
def _acl(extra: str = "") -> list[str]:
    from tests.test_readiness import MINIMAL_ACL

    return f"{MINIMAL_ACL} {extra}".split()


@pytest.mark.real_redis
@pytest.mark.parametrize(
    ("rights", "by"),
    [
        ("", "evalsha"),
        ("+fcall", "evalsha"),
        ("+function|load", "evalsha"),
        ("+fcall +function|load", "fcall"),
    ],
)
def test_an_acl_decides_between_fcall_and_evalsha(
    server: RedisServer, rights: str, by: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A user the ACL grants ``FCALL`` and ``FUNCTION LOAD`` calls functions; without either,
    once its first calls have found out, every call goes by ``EVALSHA``; no caller ever hears
    of a refused one, and each client logs one warning naming the server."""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "quota", "reset", *_acl(rights))
    publisher = QuotaClient.from_url(server.url)
    publisher.apply_policy(POLICY)
    publisher.close()
    user = f"redis://quota:secret@127.0.0.1:{server.port}/0"
    sync = QuotaClient.from_url(user, auto_renew=False)

    async def rounds(client: AsyncQuotaClient, count: int) -> None:
        for _ in range(count):
            decisions = await asyncio.gather(*(client.try_acquire("a", 1) for _ in range(3)))
            for decision in decisions:
                assert decision.lease is not None
                assert (await client.release(decision.lease)).state == "released"
            lease = sync.try_acquire("a", 1).lease
            assert lease is not None and sync.release(lease).state == "released"

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        client = AsyncQuotaClient.from_url(user, auto_renew=False)
        try:
            await rounds(client, 1)  # the first calls find out what the server takes
            first = _counts(server)
            await rounds(client, 3)
            return first, _counts(server)
        finally:
            await client.close()

    with caplog.at_level(logging.WARNING, logger="ratequota"):
        first, last = asyncio.run(main())
    sync.close()
    admin.close()
    grew = {name: last.get(name, 0) - first.get(name, 0) for name in ("fcall", "evalsha")}
    warned = [r.getMessage() for r in caplog.records if "as functions" in r.getMessage()]
    if by == "fcall":
        assert grew["fcall"] >= 9 and grew["evalsha"] == 0
        assert warned == []
    else:
        assert grew["fcall"] == 0 and grew["evalsha"] >= 9
        assert len(warned) == 2, warned  # the sync client and the async one, once each
        assert all(f"127.0.0.1:{server.port}" in message for message in warned)
        assert all("secret" not in message for message in warned)


@pytest.mark.real_redis
def test_functions_off_loads_no_library_and_calls_by_evalsha(server: RedisServer) -> None:
    quota = QuotaClient.from_url(server.url, functions=False, auto_renew=False)
    quota.apply_policy(POLICY)
    lease = quota.try_acquire("a", 1).lease
    assert lease is not None and quota.release(lease).state == "released"
    quota.close()

    async def main() -> None:
        client = AsyncQuotaClient.from_url(server.url, functions=False, auto_renew=False)
        decision = await client.try_acquire("a", 1)
        assert decision.lease is not None
        assert (await client.release(decision.lease)).state == "released"
        await client.close()

    asyncio.run(main())
    counts = _counts(server)
    assert "fcall" not in counts and "function|load" not in counts and counts["evalsha"] >= 5
    admin = server.client()
    assert _libraries(admin) == []
    admin.close()


def test_the_embedded_client_keeps_evalsha() -> None:
    """fakeredis connections do not qualify for the packed senders: no library is loaded."""
    quota = QuotaClient(auto_renew=False)
    quota.apply_policy(POLICY)
    assert quota.try_acquire("a", 1).admitted
    assert quota.backend.connection("g").function_list() == []
    quota.close()


# -- ratequota functions: the libraries of releases, listed and pruned ---------------------------

OLD = "ratequota_00000000000000aa"


def _plant(server: RedisServer) -> None:
    """This release's library (loaded by a client's first call), an older release's, and a
    library that is not ratequota's."""
    quota = QuotaClient.from_url(server.url, auto_renew=False)
    quota.apply_policy(POLICY)
    assert quota.try_acquire("a", 1).admitted
    quota.close()
    admin = server.client()
    admin.function_load(
        f"#!lua name={OLD}\nredis.register_function('{OLD}_acquire', function() return 1 end)"
    )
    admin.function_load("#!lua name=mylib\nredis.register_function('my', function() return 1 end)")
    admin.close()


@pytest.mark.real_redis
def test_the_functions_command_lists_and_deletes_only_when_told_twice(
    server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from ratequota import cli

    _plant(server)
    current = function_library().name
    assert cli.main(["functions", "--redis", server.url]) == 0
    listed = capsys.readouterr().out
    assert f"{current}  8          this one" in listed and f"{OLD}  1          other" in listed
    assert "mylib" not in listed and "1 library of other releases" in listed

    assert cli.main(["functions", "--redis", server.url, "--delete-others"]) == 0
    assert "add --yes to delete" in capsys.readouterr().out
    admin = server.client()
    assert len(_libraries(admin)) == 3

    assert cli.main(["functions", "--redis", server.url, "--delete-others", "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"{OLD}  1          deleted" in out and "deleted 1 library of other releases" in out
    assert sorted(_libraries(admin)) == sorted([current.encode(), b"mylib"])

    assert cli.main(["functions", "--redis", server.url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["release"] == current
    assert [(r["library"], r["current"]) for r in document["libraries"]] == [(current, True)]
    admin.close()


def test_the_functions_command_reports_a_server_it_cannot_ask(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ratequota import cli

    dead = "redis://127.0.0.1:1/0"
    assert cli.main(["functions", "--redis", dead]) == 1
    out = capsys.readouterr().out
    assert "unreachable: ConnectionError" in out and "no ratequota library is loaded" in out


@pytest.mark.real_redis
@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_under_memory_pressure_releases_and_snapshots_still_run(
    server: RedisServer, functions: bool
) -> None:
    """A ``noeviction`` server over ``maxmemory`` refuses new work, but a release (which frees
    memory) and a snapshot (which writes nothing) still run, by ``FCALL`` as by ``EVALSHA``:
    ``release`` and ``release_many`` are registered ``allow-oom``, ``snapshot`` ``no-writes``
    (an ``EVALSHA`` is refused only at a first write that adds memory)."""
    quota = QuotaClient.from_url(server.url, functions=functions, auto_renew=False)
    quota.apply_policy(POLICY)
    leases = [quota.try_acquire("a", 1).lease for _ in range(3)]
    admin = server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # far below what the server holds: every write refused
    try:
        with pytest.raises(BackendError, match="maxmemory"):
            quota.try_acquire("a", 1)
        assert quota.snapshot("g").used == 3
        assert all(lease is not None for lease in leases)
        assert quota.release(leases[0]).state == "released"  # type: ignore[arg-type]

        async def main() -> None:
            client = AsyncQuotaClient.from_url(server.url, functions=functions, auto_renew=False)
            try:
                outcomes = await asyncio.gather(*(client.release(x) for x in leases[1:]))  # type: ignore[arg-type]
                assert [o.state for o in outcomes] == ["released", "released"]
                assert (await client.snapshot("g")).used == 0
            finally:
                await client.close()

        asyncio.run(main())
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
        quota.close()
