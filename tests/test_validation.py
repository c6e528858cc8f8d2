"""Bad input is refused with a ratequota error naming the field, before Redis is touched."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import pytest

from ratequota import (
    AsyncQuotaClient,
    ConfigError,
    InvalidRequest,
    InvalidType,
    QuotaClient,
    RateQuotaError,
    Settings,
)
from ratequota.decision import LeaseInfo
from ratequota.testing import ManualClock


class UntouchableBackend:
    """A backend whose every use fails the test: proves validation happens first."""

    description = "untouchable"

    def connection(self, route: str) -> Any:
        """Fail: nothing may reach Redis for invalid input."""
        raise AssertionError(f"Redis was touched (route {route!r})")

    def connections(self) -> Sequence[Any]:
        """No connections to load scripts on."""
        return []

    def close(self) -> None:
        """Nothing to close."""


@pytest.fixture
def client() -> QuotaClient:
    """A client that must never reach its backend in these tests."""
    return QuotaClient(backend=UntouchableBackend())


@pytest.mark.parametrize(
    ("units", "error"),
    [
        (0, InvalidRequest),
        (-1, InvalidRequest),
        (1.5, InvalidType),
        ("3", InvalidType),
        (True, InvalidType),
        (None, InvalidType),
    ],
)
def test_bad_units(client: QuotaClient, units: object, error: type[Exception]) -> None:
    """units must be an int >= 1: 0, -1, 1.5, "3", True and None are all refused."""
    for call in (
        lambda: client.try_acquire("a", units),  # type: ignore[arg-type]
        lambda: client.acquire("a", units),  # type: ignore[arg-type]
    ):
        with pytest.raises(error) as info:
            call()
        assert info.value.field == "units"  # type: ignore[attr-defined]
        assert isinstance(info.value, (ValueError, TypeError))
        assert isinstance(info.value, RateQuotaError)


@pytest.mark.parametrize(
    ("tenant", "error"),
    [("", InvalidRequest), (7, InvalidType), (None, InvalidType), (b"a", InvalidType)],
)
def test_bad_tenant(client: QuotaClient, tenant: object, error: type[Exception]) -> None:
    """The tenant must be a non-empty str."""
    with pytest.raises(error, match="tenant"):
        client.try_acquire(tenant, 1)  # type: ignore[arg-type]
    with pytest.raises(error, match="tenant"):
        client.acquire(tenant, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"ttl": 10 * 24 * 3600}, "ttl"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"group": ""}, "group"),
        ({"group": 5}, "group"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": 12}, "request_id"),
    ],
)
def test_bad_options(client: QuotaClient, kwargs: dict[str, Any], field: str) -> None:
    """ttl, timeout, group and request_id are validated and named."""
    with pytest.raises(InvalidRequest) as info:
        client.acquire("a", 1, **kwargs)
    assert info.value.field == field


def test_bad_lease_arguments(client: QuotaClient) -> None:
    """release/renew take a lease, snapshot a group name."""
    with pytest.raises(InvalidType, match="lease"):
        client.release("lease-id")  # type: ignore[arg-type]
    with pytest.raises(InvalidType, match="lease"):
        client.renew(None)  # type: ignore[arg-type]
    lease = LeaseInfo("id", "a", "g", 1, 1, 0.0)
    with pytest.raises(InvalidRequest, match="ttl"):
        client.renew(lease, ttl=-3)
    with pytest.raises(InvalidRequest, match="group"):
        client.snapshot("")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"timeout": -1}, "timeout"),
        ({"purge_limit": 0}, "purge_limit"),
        ({"purge_limit": 5000}, "purge_limit"),
        ({"batch_size": 5000}, "batch_size"),
        ({"pending_ttl": 0.1}, "pending_ttl"),
        ({"prefix": "a{b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"functions": "yes"}, "functions"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": 2.5}, "max_connections"),
        ({"auto_renew": 1}, "auto_renew"),
    ],
)
def test_bad_settings(options: dict[str, Any], field: str) -> None:
    """Client settings are validated at construction and name the setting."""
    with pytest.raises(ConfigError) as info:
        QuotaClient(backend=UntouchableBackend(), **options)
    assert info.value.field == field


def test_apply_policy_needs_a_policy(client: QuotaClient) -> None:
    """apply_policy refuses what is not a Policy (or a path) before any I/O."""
    with pytest.raises(InvalidType, match="policy"):
        client.apply_policy({"groups": []})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [QuotaClient, AsyncQuotaClient])
def test_limit_refuses_a_string_naming_no_parameter(kind: type[Any]) -> None:
    """``limit(tenant="tenat")`` is a typo, not a tenant called "tenat": refused at decoration."""
    quota = kind(backend=UntouchableBackend())

    async def handler(tenant: str, units: int) -> None:
        """A handler whose parameters are tenant and units."""

    with pytest.raises(InvalidRequest) as info:
        quota.limit(tenant="tenat", units="units")(handler)
    assert info.value.field == "tenant"
    assert "'tenat'" in str(info.value) and "tenant, units" in str(info.value)
    with pytest.raises(InvalidRequest) as info:
        quota.limit(tenant="tenant", units="count")(handler)
    assert info.value.field == "units"
    quota.limit(tenant=lambda *a, **k: "fixed", units=2)(handler)  # constants: a callable, an int


@pytest.mark.parametrize("kind", [QuotaClient, AsyncQuotaClient])
def test_topology_constructors_take_the_constructors_options(kind: type[Any]) -> None:
    """sharded() and cluster() accept settings= and clock= like the constructor, and refuse both."""
    settings = Settings(socket_timeout=0.5, lease_ttl=7)
    clock = ManualClock()
    urls = ["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"]
    quota = kind.sharded(urls, settings=settings, clock=clock)
    assert quota.core.settings == settings and quota.core.clock is clock
    assert kind.sharded(urls, lease_ttl=7).core.settings.lease_ttl == 7
    with pytest.raises(InvalidType) as info:
        kind.sharded(urls, settings=settings, lease_ttl=3)
    assert info.value.field == "settings"
    with pytest.raises(InvalidType) as info:
        kind.cluster("redis://127.0.0.1:1", settings=settings, lease_ttl=3)
    assert info.value.field == "settings"


def test_constructing_a_client_does_no_io() -> None:
    """A client connects lazily: building one opens no connection (a pod starts while Redis
    is still coming up, and a constructor never blocks)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0"
        clients = [
            QuotaClient.from_url(url),
            QuotaClient.sharded([url, url + "?x=1"]),
            AsyncQuotaClient.from_url(url),
        ]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
        clients[0].close()
        clients[1].close()
