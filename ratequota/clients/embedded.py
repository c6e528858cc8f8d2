"""The embedded store: fakeredis, with each script compiled once rather than on every call.

fakeredis runs an EVALSHA by handing the script's *source* to its Lua
runtime's ``execute``, which compiles it again every time (and then a full
garbage collection, compiled anew too). ratequota's acquire script is about
65 KB with its libraries: compiling it was about half of what a decision cost
on the embedded store, and a simulated region of dozens of threads in one
interpreter saturated on it (its round trip grew to about 30 ms, and every
request was owed units for that long before it held them: ``docs/fairness.md``,
"Fair in practice"). A real Redis compiles a script once, when it is loaded;
``prime`` gives every embedded server the same (``clients.backends.fake_server``).

``compile_once`` wraps the server's Lua runtime so ``execute`` keeps the
compiled chunk per source. A chunk is an ordinary Lua function: running it
again runs the script afresh (its locals are new on every call; ``KEYS``
and ``ARGV`` are globals fakeredis sets before each call), so replies and
errors are exactly those of compiling anew (``tests/test_embedded.py``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_once", "prime"]

#: Distinct sources kept; ratequota has a dozen scripts, so this is never reached in use.
_MOST_CHUNKS = 256


class _CompiledChunks:
    """Stands in for a fakeredis server's Lua runtime; ``execute`` compiles a source once."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self._chunks: dict[bytes | str, Any] = {}
        self.compiled = 0  # how many sources were compiled (tests check the cache is used)

    def execute(self, source: bytes | str, *args: Any) -> Any:
        """Run ``source`` as ``LuaRuntime.execute`` does, compiling it only the first time."""
        chunk = self._chunks.get(source)
        if chunk is None:
            chunk = self._runtime.compile(source)
            self.compiled += 1
            if len(self._chunks) >= _MOST_CHUNKS:
                self._chunks.clear()
            self._chunks[source] = chunk
        return chunk(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


def compile_once(server: Any) -> bool:
    """Make ``server`` (a ``fakeredis.FakeServer``) compile each script once; True when in place.

    The runtime exists once the server has run its first script (``prime``
    runs one). False, and nothing changed, when the server has no Lua runtime
    of the expected shape (a fakeredis whose internals moved): the embedded
    store then runs as fakeredis ships it, only slower.
    """
    runtime = getattr(server, "_lua_runtime", None)
    if isinstance(runtime, _CompiledChunks):
        return True
    if runtime is None or not callable(getattr(runtime, "compile", None)):
        return False
    server._lua_runtime = _CompiledChunks(runtime)
    return True


def prime(server: Any) -> Any:
    """``server`` (a ``fakeredis.FakeServer``), its Lua runtime made and compiling each
    script once; unchanged, and as fast as fakeredis makes it, when its internals moved."""
    if not isinstance(getattr(server, "_lua_runtime", None), _CompiledChunks):
        import fakeredis

        conn = fakeredis.FakeRedis(server=server)
        try:
            conn.eval("return 1", 0)  # fakeredis makes a server's runtime at its first script
        finally:
            conn.close()
        compile_once(server)
    return server
