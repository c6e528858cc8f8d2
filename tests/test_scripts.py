"""The Lua scripts: headers parse, every encoder matches its header, files ship in the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ratequota.engine.scripts import SCRIPT_NAMES, load_scripts, parse_header

LUA = Path(__file__).resolve().parent.parent / "lua"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_header_declares_keys_argv_and_reply(name: str) -> None:
    """Each script starts with KEYS, ARGV and reply lines, in order."""
    text = (LUA / f"{name}.lua").read_text()
    keys, argv, _ = parse_header(name, text)
    assert keys and argv
    assert "-- reply:" in text.split("\n\n")[0] + "\n" + text[:4000]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_uses_only_declared_arguments(name: str) -> None:
    """No script reads a KEYS[n] or ARGV[n] beyond what its header declares."""
    spec = load_scripts()[name]
    body = (LUA / f"{name}.lua").read_text()
    used_keys = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    used_args = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    assert max(used_keys) <= len(spec.keys)
    assert max(used_args) <= len(spec.argv)


def test_group_scripts_share_the_key_layout() -> None:
    """All group scripts take the same six keys, matching GroupKeys.all; those that end, refuse
    or settle leases then the usage ledger's two hours; those that decide or settle rate meters
    then the meters' contention sets (GroupKeys.contention); apply_policy (which rebuilds the
    fair state) takes the six, then the previous layout's five, then the contention sets (it
    keeps a metered group's in existence)."""
    from ratequota.engine.keys import KeySpace
    from ratequota.policy import MAX_METERS

    group_keys = ["policy", "demand", "exp", "info", "queue", "fair"]
    assert len(KeySpace().group("g").all) == len(group_keys)
    ledger = ["ledger", "ledger_alt"]
    for name in ("release", "release_many", "renew", "snapshot"):
        spec = load_scripts()[name]
        assert list(spec.keys) == group_keys + ([] if name == "snapshot" else ledger)
    contention = [f"contend{i}" for i in range(1, MAX_METERS + 1)]
    assert len(KeySpace().group("g").contention) == MAX_METERS
    for name in ("acquire", "acquire_many", "settle"):
        spec = load_scripts()[name]
        assert list(spec.keys) == group_keys + ledger + contention
        assert spec.required_keys == len(group_keys + ledger)
    previous = ["old_policy", "old_demand", "old_exp", "old_info", "old_queue"]
    apply_keys = list(load_scripts()["apply_policy"].keys)
    assert apply_keys == group_keys + previous + contention


def test_header_errors_are_detected() -> None:
    """A header with KEYS out of order is rejected (the parser is strict)."""
    with pytest.raises(ValueError, match="out of order"):
        parse_header("bad", "-- KEYS[2] x\n-- reply: nothing\n")


def test_a_name_in_a_comment_links_nothing() -> None:
    """Only code pulls a library definition into a script: a comment naming a function (a
    file's opening comment, a trailing remark) does not, so scripts carry no dead closures."""
    from ratequota.engine.scripts import library_parts, link

    library = (
        "local function used()\n  return 1  -- unlike unused()\nend\n"
        "-- the next file: see unused and also_unused\n"
        "local function unused()\n  return also_unused()\nend\n"
        "local function also_unused()\n  return 2\nend\n"
    )
    linked = link(library_parts(library), "-- calls unused()\nreturn used()")
    assert "function used" in linked
    assert "function unused" not in linked and "function also_unused" not in linked
    release = load_scripts()["release"].source
    assert "function acquire_one" not in release


def test_only_metered_calls_name_the_contention_keys() -> None:
    """An acquire without meters names the six group keys and the ledger's two hours, which
    always exist (a Redis Cluster refuses a script naming a missing key while the slot
    migrates); one naming meters adds the four contention sets. Any other count is a bug."""
    from ratequota.engine import protocol
    from ratequota.engine.keys import KeySpace

    ks = KeySpace()

    def acquire(**meters: int) -> protocol.ScriptCall:
        return protocol.acquire_call(
            ks, "g", "a", 1, "id", 1000, wait=False, pending_ms=1, purge=1, meters=meters
        )

    # The group's six keys and the ledger's two hours, then the contention sets if metered.
    plain = list(acquire().keys)
    assert plain[:6] == ks.group("g").all and len(plain) == 8
    assert list(acquire(tokens=5).keys) == [*plain, *ks.group("g").contention]
    many = [("a", 1, "x", 1000, False), ("b", 1, "y", 1000, False, False, {"tokens": 1})]
    assert len(protocol.acquire_many_call(ks, "g", many[:1], pending_ms=1, purge=1).keys) == 8
    assert len(protocol.acquire_many_call(ks, "g", many, pending_ms=1, purge=1).keys) == 12
    spec = load_scripts()["acquire"]
    assert spec.required_keys == 8
    with pytest.raises(AssertionError, match="keys given"):
        spec.check_call(10, len(spec.argv))
