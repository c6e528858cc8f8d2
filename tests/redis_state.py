"""Reading a whole Redis database back, to compare the state two runs left behind."""

from __future__ import annotations

from typing import Any

__all__ = ["dump_keys"]


def dump_keys(conn: Any, *, expiry: bool = False) -> dict[bytes, Any]:
    """Every key's type and value (and, with ``expiry``, whether it has a TTL)."""
    out: dict[bytes, Any] = {}
    for key in sorted(conn.keys("*")):
        kind = conn.type(key)
        if kind == b"hash":
            value: Any = sorted(conn.hgetall(key).items())
        elif kind == b"zset":
            value = conn.zrange(key, 0, -1, withscores=True)
        else:
            value = conn.get(key)
        out[key] = (kind, value, conn.pttl(key) > 0) if expiry else (kind, value)
    return out
