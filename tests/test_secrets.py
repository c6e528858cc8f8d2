"""Passwords in connection URLs never show, and the documented ACL works on any database.

A password may sit in the URL's user-info (``redis://:secret@host``,
``redis://user:secret@host``) or in its query (``?password=secret``); neither
may appear in a client's description, its shard ids, its errors or the
``ratequota check`` table. The ACL rule of ``docs/deployment.md`` is run
against a real server on database 1, where redis-py needs ``SELECT``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from hypothesis import assume, given
from hypothesis import strategies as st

from ratequota.cli import main
from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.backends import redact, scrub
from ratequota.clients.sync import QuotaClient
from ratequota.engine.keys import KeySpace
from ratequota.errors import BackendUnavailable, ConfigError
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.conftest import _no_redis
from tests.servers import RedisServer, free_port, redis_server_binary

SECRET = "s3cr3t-pa55"
POLICY = Policy([GroupPolicy(f"g{i}", 4, [TenantPolicy(f"t{i}")]) for i in range(4)])


def _forms(port: int) -> list[str]:
    """Every way a URL may carry the password."""
    return [
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        f"redis://default:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"redis://default@127.0.0.1:{port}/0?password={SECRET}&socket_keepalive=true",
    ]


@pytest.fixture
def locked() -> Iterator[RedisServer]:
    """A private redis-server whose default user needs ``SECRET``."""
    if redis_server_binary() is None:
        _no_redis()
    server = RedisServer().start()
    admin: Any = server.client()
    try:
        admin.config_set("requirepass", SECRET)
    finally:
        admin.close()
    try:
        yield server
    finally:
        server.cleanup()


@given(
    password=st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="\x00"), min_size=6, max_size=30
    ),
    where=st.sampled_from(["userinfo", "user", "query", "both"]),
)
def test_redact_never_shows_a_password(password: str, where: str) -> None:
    """Whatever the password holds (even '@', '?', '#', ':'), the redacted URL omits it."""
    quoted = quote(password, safe="")

    def url_with(secret: str, escaped: str) -> str:
        return {
            "userinfo": f"redis://:{secret}@host:6379/0",
            "user": f"rediss://quota:{secret}@host:6380/2?ssl_cert_reqs=none",
            "query": f"redis://host:6379/0?password={escaped}&db=1",
            "both": f"redis://quota:{escaped}@host/0?password={escaped}",
        }[where]

    # A password that is part of the URL's own text ('passwo' in '?password=') cannot be
    # told apart from it in the output: nothing to judge.
    fixed = url_with("", "") + "***"
    assume(password not in fixed and quoted not in fixed)
    url = url_with(password, quoted)
    shown = redact(url)
    assert password not in shown
    assert quoted not in shown
    assert scrub(f"failed at {url}", url).count(password if where != "query" else quoted) == 0


def test_redact_keeps_what_is_useful() -> None:
    """Host, port, database, user name and harmless options stay readable."""
    assert redact("redis://quota:x@h:1/3?db=3&ssl_cert_reqs=none") == (
        "redis://quota:***@h:1/3?db=3&ssl_cert_reqs=none"
    )
    assert redact("redis://h:1/0?password=x") == "redis://h:1/0?password=***"
    assert redact("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.real_redis
def test_no_password_in_descriptions_shard_ids_or_errors(locked: RedisServer) -> None:
    """Sync and async, one URL and shards: descriptions, shard ids, errors, reports."""
    urls = _forms(locked.port)
    shown: list[str] = []
    for url in urls:
        quota = QuotaClient(url, socket_timeout=2.0)
        try:
            quota.apply_policy(POLICY)
            assert quota.try_acquire("t1", 1).admitted
            shown += [quota._where, quota.backend.description, quota.check().table()]  # type: ignore[attr-defined]
        finally:
            quota.close()
    sharded = QuotaClient.sharded(urls[:2], socket_timeout=2.0)
    try:
        shown += list(sharded.backend.routing.shard_ids)  # type: ignore[attr-defined]
        shown.append(sharded.check().table())
    finally:
        sharded.close()

    async def run_async() -> None:
        for url in urls:
            quota = AsyncQuotaClient(url, socket_timeout=2.0)
            try:
                assert (await quota.try_acquire("t2", 1)).admitted
                shown.extend([quota.backend.description, (await quota.check()).table()])
            finally:
                await quota.close()
        shards = AsyncQuotaClient.sharded(urls[2:], socket_timeout=2.0)
        try:
            shown.extend(shards.backend.routing.shard_ids or ())  # type: ignore[union-attr]
        finally:
            await shards.close()

    asyncio.run(run_async())

    # Errors: the same URLs pointing at a port nobody listens on.
    dead = [u.replace(f":{locked.port}/", f":{free_port()}/") for u in urls]
    for url in dead:
        quota = QuotaClient(url, socket_timeout=0.5)
        try:
            with pytest.raises(BackendUnavailable) as caught:
                quota.try_acquire("t1", 1)
            shown += [str(caught.value), repr(caught.value)]
        finally:
            quota.close()
    with pytest.raises(ConfigError) as bad:
        QuotaClient(f"redis://:{SECRET}@127.0.0.1:notaport/0")
    shown.append(str(bad.value))
    assert all(SECRET not in text for text in shown), [t for t in shown if SECRET in t]
    assert any("***" in text for text in shown)


@pytest.mark.real_redis
def test_check_command_table_hides_the_password(
    locked: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ratequota check`` prints shard names from the URLs: redacted."""
    admin = QuotaClient(_forms(locked.port)[0])
    admin.apply_policy(POLICY)
    admin.close()
    for url in _forms(locked.port):
        assert main(["check", "--redis", url, "--socket-timeout", "1"]) == 0
        assert main(["check", "--shards", url, "--socket-timeout", "1"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "***" in out.out


#: The documented ACL rule (tests/test_readiness.py keeps it equal to docs/deployment.md).
def _acl() -> str:
    from tests.test_readiness import MINIMAL_ACL

    return MINIMAL_ACL


@pytest.mark.real_redis
def test_documented_acl_on_a_database_other_than_0(locked: RedisServer) -> None:
    """On ``/1`` the documented rule needs ``+select`` (the doc says so); with it, all works."""
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
    assert "add `+select`" in doc.read_text(encoding="utf-8")
    admin: Any = redis.Redis(port=locked.port, password=SECRET, socket_timeout=5)
    url = f"redis://quota:secret@127.0.0.1:{locked.port}/1"
    try:
        admin.execute_command("ACL", "SETUSER", "quota", "reset", *_acl().split())
        without = QuotaClient(url, socket_timeout=1.0)
        try:
            assert not without.check().ready
        finally:
            without.close()
        admin.execute_command("ACL", "SETUSER", "quota", "+select")
        quota = QuotaClient(url, socket_timeout=1.0)
        try:
            quota.apply_policy(POLICY)
            with quota.acquire("t3", 2) as lease:
                assert quota.snapshot("g3").used == 2
                assert lease.renew().renewed
            assert quota.check().ready
        finally:
            quota.close()
        admin.execute_command("SELECT", 1)
        assert admin.exists(KeySpace().catalog)
        admin.execute_command("SELECT", 0)
        assert not admin.exists(KeySpace().catalog)
    finally:
        admin.close()
