"""Shared fixtures: the backends every behavioural test runs on, and hypothesis profiles.

``make_client`` is parametrized over the embedded fakeredis and a real
redis-server that this suite starts on a free port. When redis-server is
missing the real-Redis tests skip locally, but with ``RATEQUOTA_REQUIRE_REDIS=1``
(as ``.ci/run`` sets) they fail instead, so CI can never pass without them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, settings

from tests.bridge import Quotas
from tests.servers import RedisCluster, RedisServer, redis_server_binary

# Hypothesis: "ci" is the default and keeps the suite within its time budget;
# RATEQUOTA_HYPOTHESIS_PROFILE=nightly runs many more examples.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "nightly",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("RATEQUOTA_HYPOTHESIS_PROFILE", "ci"))

REQUIRE_REDIS = os.environ.get("RATEQUOTA_REQUIRE_REDIS") == "1"


_SKIPPED_REAL: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember real-Redis tests that were skipped, to fail the run when CI requires them."""
    if report.skipped and "real_redis" in report.keywords:
        _SKIPPED_REAL.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With RATEQUOTA_REQUIRE_REDIS=1 a skipped real-Redis test fails the whole run."""
    if REQUIRE_REDIS and _SKIPPED_REAL:
        print(f"\nreal-Redis tests were skipped ({len(_SKIPPED_REAL)}), which CI forbids:")
        for nodeid in _SKIPPED_REAL[:20]:
            print(f"  {nodeid}")
        session.exitstatus = 1


def _no_redis() -> None:
    message = "redis-server is not installed"
    if REQUIRE_REDIS:
        pytest.fail(f"{message}, and RATEQUOTA_REQUIRE_REDIS=1 forbids skipping")
    pytest.skip(message)


def _started_redis() -> Iterator[RedisServer]:
    """A redis-server started here, stopped by PID when the fixture ends."""
    if redis_server_binary() is None:
        _no_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests flush it before use."""
    yield from _started_redis()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may flush, pause, kill and restart."""
    yield from _started_redis()


@pytest.fixture
def real_redis(redis_server: RedisServer) -> RedisServer:
    """The session's real server, emptied for this test."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


#: The ``make_client`` / ``make_quota`` fixtures: call it for a client on the test's Redis.
MakeClient = Quotas


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.real_redis)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Which backend a behavioural test runs on."""
    return str(request.param)


@pytest.fixture
def redis_conn(backend_kind: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A raw redis-py connection: an empty fakeredis, or the session's real redis-server."""
    client: Any
    if backend_kind == "real":
        server: RedisServer = request.getfixturevalue("real_redis")
        client = redis.Redis.from_url(server.url)
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=["sync", "async"])
def client_kind(request: pytest.FixtureRequest) -> str:
    """Which client a behavioural test drives: ``QuotaClient`` or a bridged ``AsyncQuotaClient``."""
    return str(request.param)


def _quotas(backend_kind: str, client_kind: str, request: pytest.FixtureRequest) -> Quotas:
    server = request.getfixturevalue("real_redis") if backend_kind == "real" else None
    return Quotas(client_kind, server)


@pytest.fixture
def make_client(backend_kind: str, request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """A factory of sync clients that share one fresh backend (like pods on one Redis)."""
    quotas = _quotas(backend_kind, "sync", request)
    yield quotas
    quotas.close()


@pytest.fixture
def make_quota(
    backend_kind: str, client_kind: str, request: pytest.FixtureRequest
) -> Iterator[MakeClient]:
    """Like ``make_client``, for both clients: the async one through ``tests.bridge``.

    A behavioural test written once against the sync API runs four times: sync
    and async, on fakeredis and on a real redis-server.
    """
    quotas = _quotas(backend_kind, client_kind, request)
    yield quotas
    quotas.close()


@pytest.fixture
def make_kind(client_kind: str) -> Iterator[MakeClient]:
    """Clients of the test's kind (sync, or async bridged) on any URL: ``make_kind.at(url)``.

    For tests of a Redis that is not there (a port nothing listens on), where
    the fake/real parametrization of ``make_quota`` would test nothing more.
    """
    quotas = Quotas(client_kind)
    yield quotas
    quotas.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster for the session, stopped by PID at the end."""
    if redis_server_binary() is None or shutil.which("redis-cli") is None:
        _no_redis()
    cluster = RedisCluster(masters=3).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()
