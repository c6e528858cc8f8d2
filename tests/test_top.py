"""``ratequota top``, read from a pseudo-terminal the way a person would see it.

The command runs as a real process on the slave side of a pty (so it sees a
terminal, clears the screen and reads keys in cbreak mode); the test reads
the master side. Time is driven by refreshes, not by sleeping: ``top`` runs
with an hour-long interval and the test presses space to get the next frame
after changing the state, then ``q`` to quit.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.cli.top import CLEAR
from ratequota.clients.sync import QuotaClient
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

POLICY = Policy(
    (
        GroupPolicy(
            "search",
            capacity=24,
            tenants=(
                TenantPolicy("web", guarantee=12, lendable=1 / 3, borrow_limit=4),
                TenantPolicy("batch", guarantee=12, lendable=1 / 3, borrow_limit=4),
            ),
        ),
        GroupPolicy("chat", capacity=8, tenants=(TenantPolicy("prod", guarantee=8),)),
    )
)

ROOT = Path(__file__).resolve().parent.parent


class Screen:
    """The master side of a pty running one process; collects everything it prints."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        env = {**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm"}
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True
        )
        os.close(slave)
        self.text = ""

    def wait_for_frames(self, count: int, deadline: float = 60.0) -> str:
        """Read until ``count`` frames were drawn; the last frame as the screen shows it."""
        limit = time.monotonic() + deadline
        while self.text.count(CLEAR) < count or not self.text.endswith("space refreshes now\r\n"):
            left = limit - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise AssertionError(f"top did not draw frame {count}; screen so far:\n{self.text}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.text += os.read(self.master, 65536).decode()
                except OSError:  # the slave side closed
                    break
        return self.text.rsplit(CLEAR, 1)[-1]

    def press(self, key: bytes) -> None:
        """Type a key into the terminal."""
        os.write(self.master, key)

    def close(self) -> int:
        """Wait for the process to end (it was asked to quit); its exit code."""
        try:
            return self.process.wait(timeout=60)
        finally:
            os.close(self.master)


def _row(screen: str, tenant: str) -> list[str]:
    line = next(line for line in screen.splitlines() if line.startswith(f"{tenant} "))
    return line.split()


@pytest.mark.real_redis
def test_top_refreshes_on_a_terminal_and_quits_on_q(real_redis: RedisServer) -> None:
    """Frame 1 shows idle tenants at their limits, and no refusal rate yet; after a lease,
    two refusals and a key, frame 2 shows the lease and web's refusals per second (from the
    ledger: refused by another client, counted in Redis)."""
    admin = QuotaClient.from_url(real_redis.url)
    admin.apply_policy(POLICY)
    screen = Screen(
        [sys.executable, "-m", "ratequota", "top", "--redis", real_redis.url, "--interval", "3600"]
    )
    try:
        first = screen.wait_for_frames(1)
        assert "group 'search': 0/24 units held (0%)" in first
        assert "group 'chat': 0/8 units held" in first
        # tenant, held, guarantee, limit, borrowed, waiting, refused/s
        assert _row(first, "web") == ["web", "0", "12", "16", "0", "0", "-"]
        assert _row(first, "prod") == ["prod", "0", "8", "8", "0", "0", "-"]
        with admin.acquire("batch", 16, ttl=60):
            for _ in range(2):  # 8 units are free: 9 is refused for the group's capacity
                assert admin.try_acquire("web", 9).reason == "group_full"
            screen.press(b" ")
            second = screen.wait_for_frames(2)
        assert "group 'search': 16/24 units held (67%)" in second
        assert _row(second, "batch") == ["batch", "16", "12", "16", "4", "0", "0"]
        web = _row(second, "web")
        assert web[:6] == ["web", "0", "12", "12", "0", "0"]  # never below G
        assert float(web[6]) > 0
        assert _row(second, "prod")[6] == "0"
        assert max(len(line) for line in second.splitlines()) <= 100
        screen.press(b"q")
        assert screen.close() == 0
    finally:
        if screen.process.poll() is None:
            screen.process.kill()
            screen.process.wait(timeout=10)
        admin.close()


@pytest.mark.real_redis
def test_top_once_json_for_scripts(
    real_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--once --json prints exactly one JSON document (refusals: this hour's counts by reason,
    no rate without an earlier frame); --group narrows it; --count N frames (from the second,
    a rate)."""
    admin = QuotaClient.from_url(real_redis.url)
    try:
        admin.apply_policy(POLICY)
        with admin.acquire("prod", 3, ttl=60):
            assert admin.try_acquire("prod", 6).reason == "tenant_limit"
            assert cli.main(["top", "--redis", real_redis.url, "--once", "--json"]) == 0
            data = json.loads(capsys.readouterr().out)
            assert [g["group"] for g in data["groups"]] == ["search", "chat"]
            chat = data["groups"][1]
            assert chat["held"] == 3
            assert chat["tenants"]["prod"] == {
                "held": 3,
                "guarantee": 8,
                "limit": 8.0,
                "borrowed": 0,
                "waiting": 0,
                "refusals_per_s": None,
                "refused_this_hour": {"tenant_limit": 1},
            }
            assert chat["refusals_per_s"] is None
            args = ["top", "--redis", real_redis.url, "--group", "chat", "--json"]
            assert cli.main([*args, "--count", "2", "--interval", "0.01"]) == 0
            frames = capsys.readouterr().out.splitlines()
            assert len(frames) == 2
            assert all([g["group"] for g in json.loads(f)["groups"]] == ["chat"] for f in frames)
            later = json.loads(frames[1])["groups"][0]
            assert later["refusals_per_s"] == 0.0  # nothing refused between the frames
            assert later["tenants"]["prod"]["refused_this_hour"] == {"tenant_limit": 1}
    finally:
        admin.close()


@pytest.mark.real_redis
def test_top_without_a_policy_or_with_an_unknown_group(
    real_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing published, or a group the policy lacks: one error line naming what to do."""
    assert cli.main(["top", "--redis", real_redis.url, "--once"]) == 2
    assert "`ratequota policy apply FILE`" in capsys.readouterr().err
    admin = QuotaClient.from_url(real_redis.url)
    admin.apply_policy(POLICY)
    admin.close()
    assert cli.main(["top", "--redis", real_redis.url, "--once", "--group", "nope"]) == 2
    assert "group 'nope' is not in the published policy" in capsys.readouterr().err
    assert cli.main(["top", "--redis", real_redis.url, "--once"]) == 0
    out = capsys.readouterr().out
    assert CLEAR not in out  # not a terminal: plain frames
    assert "group 'search'" in out
