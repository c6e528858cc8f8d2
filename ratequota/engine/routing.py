"""Which shard serves a group: rendezvous (highest random weight) hashing, pure.

Each shard id gets a score for a name, ``blake2b(shard id, name)``; the shard
with the highest score serves the name. Adding a shard moves only the names
the new shard now wins (about 1/N of them, and only onto the new shard);
removing one moves only that shard's names. The hash is blake2b over UTF-8
bytes, never Python's ``hash()``, so every process, every pod and every
release computes the same placement.

Shard ids are stable strings chosen by the operator (by default the shard's
URL without its password), so reordering the URL list changes nothing. Both
the sync and the async client route through this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ratequota.errors import ConfigError

__all__ = ["Rendezvous", "shard_score"]


def shard_score(shard_id: str, name: str) -> int:
    """The weight of ``shard_id`` for ``name``: 64 bits of blake2b, stable across versions.

    The two strings are length-prefixed before hashing so that ("ab", "c") and
    ("a", "bc") can never produce the same input.
    """
    sid = shard_id.encode("utf-8")
    key = name.encode("utf-8", "surrogatepass")
    data = len(sid).to_bytes(4, "big") + sid + key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


#: Most routing answers remembered per ``Rendezvous``.
_MEMO_SIZE = 65_536


class Rendezvous:
    """Highest-random-weight placement of names over a fixed list of shard ids."""

    def __init__(self, shard_ids: Sequence[str]) -> None:
        ids = list(shard_ids)
        if not ids:
            raise ConfigError("shards", "needs at least one shard")
        for sid in ids:
            if not isinstance(sid, str) or not sid:
                raise ConfigError("shards", f"shard ids must be non-empty strings, got {sid!r}")
        if len(set(ids)) != len(ids):
            raise ConfigError("shards", "shard ids must be distinct")
        self.shard_ids: tuple[str, ...] = tuple(ids)
        # Every call routes at least once; remembering recent answers saves N hashes each.
        # Bounded (cleared when full); a plain dict is safe to share between threads.
        self._memo: dict[str, int] = {}

    def index(self, name: str) -> int:
        """Index in ``shard_ids`` of the shard serving ``name`` (a tie goes to the greater id)."""
        found = self._memo.get(name)
        if found is None:
            found = self._compute(name)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[name] = found
        return found

    def _compute(self, name: str) -> int:
        best, best_key = 0, (-1, "")
        for i, sid in enumerate(self.shard_ids):
            key = (shard_score(sid, name), sid)
            if key > best_key:
                best, best_key = i, key
        return best

    def shard(self, name: str) -> str:
        """The id of the shard serving ``name``."""
        return self.shard_ids[self.index(name)]
