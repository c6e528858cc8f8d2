"""A script call as the bytes on the wire (RESP), built once per call shape: pure, no I/O.

redis-py packs a command by encoding each argument in Python (a generator step,
an ``isinstance`` chain and an ``encode`` per argument) before handing them to
hiredis: for a lease script's ~18 arguments that is as much client CPU as the
rest of a decision. Here the head of an ``EVALSHA`` (command, SHA, key count and
keys) is packed once per script and key tuple (the hot path's key tuples are
themselves cached per group and hour), and each argument once per value while
it is remembered (most repeat from call to call: the schema, the tenant, the
units, the ttl, the flags).

The bytes are exactly redis-py's for a connection that encodes text as UTF-8
(strict), its default and the only encoding ratequota's own connections use:
``tests/test_hot_path.py`` compares the two. Arguments other than ``int`` and
``str`` (a float; a bool, which redis-py refuses) are not packed here: the
caller leaves such a call to redis-py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

__all__ = ["pack_evalsha", "pack_fcall", "pack_function_load"]

#: The argument types packed here; any other leaves the call to redis-py.
_PLAIN = frozenset((int, str))
#: Arguments longer than this are packed afresh on every call.
_REMEMBERED_BYTES = 64
#: Most packed arguments remembered, then forgotten all at once: unique values (lease ids,
#: tokens) come and go, the few that repeat are packed again once after each clearing.
_REMEMBERED = 1024


class _Packed(dict[int | str, bytes]):
    """Packed arguments by value: a lease script's arguments repeat from call to call (the
    schema, the tenant, the units, the ttl, the flags), so most are found here, in C.

    Only ``int`` and ``str`` values ever reach it (``pack_evalsha`` checks the types first:
    ``True == 1`` and ``1.0 == 1`` must not find ``1``). Plain dict operations, safe to
    share between threads.
    """

    def __missing__(self, arg: int | str) -> bytes:
        data = b"%d" % arg if type(arg) is int else arg.encode()  # type: ignore[union-attr]
        piece = b"$%d\r\n%b\r\n" % (len(data), data)
        if len(data) <= _REMEMBERED_BYTES:
            if len(self) >= _REMEMBERED:
                self.clear()
            self[arg] = piece
        return piece


_packed_arg = _Packed().__getitem__


def pack_evalsha(sha: str, keys: tuple[str, ...], args: Sequence[object]) -> bytes | None:
    """``EVALSHA sha len(keys) *keys *args`` in RESP (UTF-8), or None if an argument is
    neither ``int`` nor ``str`` (the caller then sends the call through redis-py)."""
    return _pack(b"EVALSHA", sha, keys, args)


def pack_fcall(function: str, keys: tuple[str, ...], args: Sequence[object]) -> bytes | None:
    """``FCALL function len(keys) *keys *args``: ``pack_evalsha``'s call of a function."""
    return _pack(b"FCALL", function, keys, args)


def _pack(verb: bytes, target: str, keys: tuple[str, ...], args: Sequence[object]) -> bytes | None:
    if not _PLAIN.issuperset(map(type, args)):
        return None
    return b"".join((_head(verb, target, keys, len(args)), *map(_packed_arg, args)))  # type: ignore[arg-type]


def pack_function_load(source: str) -> bytes:
    """``FUNCTION LOAD source`` in RESP."""
    data = source.encode()
    return b"*3\r\n$8\r\nFUNCTION\r\n$4\r\nLOAD\r\n$%d\r\n%b\r\n" % (len(data), data)


@functools.lru_cache(maxsize=16384)
def _head(verb: bytes, target: str, keys: tuple[str, ...], n_args: int) -> bytes:
    """``*<count>``, the verb, its SHA or function, the key count and the keys, packed."""
    fields = [verb, target.encode(), b"%d" % len(keys), *(key.encode() for key in keys)]
    head = [b"*%d\r\n" % (len(fields) + n_args)]
    head += [b"$%d\r\n%b\r\n" % (len(field), field) for field in fields]
    return b"".join(head)
