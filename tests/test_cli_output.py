"""The CLI's tables: drawn by rich on a terminal (the ``cli`` extra), plain text otherwise.

The plain text is what scripts and the other CLI tests read; on a terminal
the rich tables hold the very same cells, so a person reads the same numbers.
"""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from ratequota.cli import top
from ratequota.cli.check import show
from ratequota.cli.output import terminal_console
from ratequota.clients.backends import embedded_backend
from ratequota.clients.readiness import GroupFacts, ShardFacts, evaluate
from ratequota.clients.sync import QuotaClient
from ratequota.policy import GroupPolicy, Policy, TenantPolicy

POLICY = Policy(
    [GroupPolicy("search", 24, [TenantPolicy("web", guarantee=12), TenantPolicy("batch", 12)])]
)


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_plain_text_unless_a_terminal_with_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe or a file gets plain text; so does a terminal when rich is not installed."""
    assert terminal_console(io.StringIO()) is None
    assert terminal_console(Terminal()) is not None
    monkeypatch.setitem(sys.modules, "rich.console", None)  # as if the extra were missing
    assert terminal_console(Terminal()) is None


def test_top_draws_the_same_cells_with_rich() -> None:
    """``render_rich`` shows the titles, rows and footer of ``render``, within the width."""
    client = QuotaClient(backend=embedded_backend(shared=False))
    try:
        client.apply_policy(POLICY)
        decision = client.try_acquire("batch", 16)
        assert decision.admitted
        views = top.gather(client, None)
    finally:
        client.close()
    plain = top.render(views).splitlines()
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, highlight=False)
    for part in top.render_rich(views):
        console.print(part)
    drawn = screen.getvalue().splitlines()
    assert plain[0] in drawn and plain[-1] in drawn  # the group's title, the footer
    for tenant in ("batch", "web"):
        row = next(line for line in plain if line.startswith(f"{tenant} "))
        assert any(line.split() == row.split() for line in drawn), tenant
    assert ["tenant", *top.COLUMNS[1:]] in [line.split() for line in drawn]
    assert max(len(line) for line in drawn) <= 100  # no styling codes widen a line


def test_check_draws_its_table_with_rich_on_a_terminal() -> None:
    """``ratequota check`` on a terminal: a rich table of the same rows, then the notes."""
    facts = ShardFacts(
        "redis-a",
        latency=0.001,
        info={"redis_version": "7.2.4", "maxmemory_policy": "noeviction", "aof_enabled": "1"},
        scripts={"acquire": True},
        time_reply=[1, 2],
        groups=(GroupFacts("search", schema="2", version="1"),),
        holds_catalog=True,
    )
    report = evaluate([facts], catalog_present=True)
    assert report.ready, report.problems
    piped = io.StringIO()
    show(report, piped)
    assert piped.getvalue() == report.table() + "\n"  # plain text, unchanged
    screen = Terminal()
    show(report, screen)
    drawn = [line.split() for line in screen.getvalue().splitlines()]
    assert list(report.COLUMNS) in drawn
    (row,) = report.rows()
    assert list(row) in drawn
    assert "\x1b[1;32mREADY\x1b[0m" in screen.getvalue()  # the verdict, in bold green
