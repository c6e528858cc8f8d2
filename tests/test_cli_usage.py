"""``ratequota usage``: the ledger as a table, JSON and CSV, read from a real redis-server.

The traffic is made by a client on a ``ManualClock`` pinned near the real
time (so the command's default window, the last 24 hours of this machine's
clock, holds it) and moved by hand, so unit·seconds are exact.
"""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from ratequota import cli
from ratequota.cli.output import CommandError
from ratequota.cli.usage import parse_when
from ratequota.clients.sync import QuotaClient
from ratequota.engine.ledger import HOUR_MS
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock
from tests.servers import RedisServer

POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=4,
            tenants=(TenantPolicy("a", guarantee=2, borrow_limit=0), TenantPolicy("b|x", 2)),
        )
    ]
)


def _traffic(url: str) -> int:
    """a holds 2 units for 30 s and is refused twice (tenant_limit, too_large); "b|x" holds 1
    unit for 5 s. Returns the hour it all happened in."""
    now = round(time.time() * 1000)
    start = now - now % HOUR_MS + 60_000  # well inside the current hour
    if start > now:
        start -= HOUR_MS
    clock = ManualClock(start)
    quota = QuotaClient.from_url(url, clock=clock)
    try:
        quota.apply_policy(POLICY)
        held = quota.try_acquire("a", 2, ttl=60).lease
        other = quota.try_acquire("b|x", 1, ttl=60).lease
        assert held is not None and other is not None
        assert quota.try_acquire("a", 1).reason == "tenant_limit"
        assert quota.try_acquire("a", 9).reason == "too_large"
        clock.advance(5)
        quota.release(other)
        clock.advance(25)
        quota.release(held)
    finally:
        quota.close()
    return start // HOUR_MS


@pytest.mark.real_redis
def test_usage_table_json_and_csv(
    real_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same rows three ways; tenant names holding '|' survive; totals per tenant."""
    hour = _traffic(real_redis.url)
    base = ["usage", "--redis", real_redis.url, "--group", "g"]

    assert cli.main([*base, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["group"] == "g"
    assert [(r["tenant"], r["hour"]) for r in data["rows"]] == [("a", hour), ("b|x", hour)]
    a, b = data["rows"]
    assert (a["unit_seconds"], a["leases"]) == (60.0, 1)
    assert a["refusals"] == {"tenant_limit": 1, "too_large": 1}
    assert (b["unit_seconds"], b["leases"], b["refusals"]) == (5.0, 1, {})
    assert a["tokens_reserved"] == a["tokens_settled"] == 0

    assert cli.main([*base, "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["tenant"] for r in table] == ["a", "b|x"]
    assert table[0]["refused_tenant_limit"] == "1"
    assert table[0]["refused_too_large"] == "1"
    assert table[1]["unit_seconds"] == "5.0"
    assert table[0]["hour_start"].endswith("+00:00")

    assert cli.main([*base, "--since", "2h"]) == 0
    text = capsys.readouterr().out
    assert "group 'g': 2 tenants" in text
    row = next(line for line in text.splitlines() if " a " in line and ":" in line[:16])
    assert row.split()[3:7] == ["60.0", "1", "2", "tenant_limit"]
    assert "a                            60.0 unit·s, 1 lease, 2 refusals" in text

    assert cli.main([*base, "--json", "--tenant", "b|x"]) == 0
    assert [r["tenant"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["b|x"]
    # A window before the traffic: nothing recorded, not an error.
    assert cli.main([*base, "--since", "3h", "--until", "2h"]) == 0
    assert "nothing recorded" in capsys.readouterr().out


def test_usage_needs_a_redis_and_a_readable_window(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --redis and no RATEQUOTA_URL: the safe-CLI error; a window it cannot read: one line
    saying what it takes; --json with --csv: refused."""
    monkeypatch.delenv("RATEQUOTA_URL", raising=False)
    assert cli.main(["usage", "--group", "g"]) == 2
    assert "no Redis named" in capsys.readouterr().err
    assert cli.main(["usage", "--group", "g", "--redis", "redis://x", "--since", "soon"]) == 2
    assert "--since 'soon': give a duration" in capsys.readouterr().err
    assert cli.main(["usage", "--group", "g", "--redis", "redis://x", "--json", "--csv"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_durations_and_times() -> None:
    """Durations add up their parts; ISO times without an offset are UTC."""
    import datetime as dt

    assert parse_when("--since", "1h30m") == dt.timedelta(minutes=90)
    assert parse_when("--since", "7d") == dt.timedelta(days=7)
    assert parse_when("--since", "2026-12-06T07:00") == dt.datetime(
        2026, 12, 6, 7, tzinfo=dt.timezone.utc
    )
    with pytest.raises(CommandError):
        parse_when("--until", "")
