"""Running scripts: the one owner of EVALSHA, NOSCRIPT and SCRIPT LOAD (as redis-py's ``Script``).

Every script's SHA is known up front (``ratequota.engine.scripts`` hashes the
linked text once), so a call is always sent as EVALSHA. Only NOSCRIPT — the
script certainly did not run — makes the owner load the script and send that
call once more; nothing else is ever replayed (a timed-out script may have run).

Written once, without I/O, as generators of requests: ``Send`` (one round
trip: one call, or several pipelined) and ``Load`` (``SCRIPT LOAD``). The
same exchange serves single calls and pipelined batches (the runner), merged
batches (the async client's batcher), every cluster node and the readiness
probe; the clients only perform the requests.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import attrs

from ratequota.clients.backends import is_noscript
from ratequota.engine.scripts import load_scripts

__all__ = ["Exchange", "Load", "Send", "exchange", "load_all", "reload_missing"]


@attrs.frozen
class Send:
    """Send ``calls`` in one round trip; the reply is a list, an error reply in its call's place."""

    calls: tuple[Any, ...]


@attrs.frozen
class Load:
    """``SCRIPT LOAD source`` on the server the calls went to."""

    source: str


#: Requests out, replies in, the calls' replies (in order) at the end.
Exchange = Generator[Send | Load, Any, list[Any]]


def exchange(calls: Sequence[Any]) -> Exchange:
    """Send ``calls``; the ones answered NOSCRIPT are sent again, once, after loading.

    ``calls`` are wire ops; only a ``ScriptCall`` can meet NOSCRIPT. Each
    script missing is loaded once, however many calls need it; the calls that
    did run keep their replies.
    """
    replies = list((yield Send(tuple(calls))))
    missing = [i for i, reply in enumerate(replies) if is_noscript(reply)]
    if not missing:
        return replies
    try:
        for source in dict.fromkeys(calls[i].script.source for i in missing):
            yield Load(source)
        again = yield Send(tuple(calls[i] for i in missing))
    except Exception as exc:  # a driver may throw in a failed load or re-send: those calls fail
        again = [exc] * len(missing)
    for index, reply in zip(missing, again, strict=True):
        replies[index] = reply
    return replies


#: A command of a probe (``execute_command`` arguments) out, its reply in.
Commands = Generator[tuple[Any, ...], Any, Any]


def load_all() -> Commands:
    """Load every script on one server (a client's start-up, ``load_scripts``)."""
    for spec in load_scripts().values():
        yield ("SCRIPT LOAD", spec.source)


def reload_missing() -> Generator[tuple[Any, ...], Any, tuple[dict[str, bool], list[str]]]:
    """Load the scripts one server lacks (as a NOSCRIPT would): (loaded by name, reloaded)."""
    specs = load_scripts()
    reloaded: list[str] = []
    exists = yield ("SCRIPT EXISTS", *(s.sha for s in specs.values()))
    for (name, spec), ok in zip(specs.items(), exists, strict=True):
        if not ok:
            yield ("SCRIPT LOAD", spec.source)
            reloaded.append(name)
    exists = yield ("SCRIPT EXISTS", *(s.sha for s in specs.values()))
    return {n: bool(ok) for n, ok in zip(specs, exists, strict=True)}, reloaded
