"""The simulation's embedded store: each script compiled once, not on every call.

fakeredis runs an EVALSHA by handing the script's *source* to its Lua
runtime's ``execute``, which compiles it again every time. ratequota's
acquire script is about 25 KB with its libraries: compiling it takes about
0.9 ms of the 1.9 ms a call costs on its own. A simulated region makes a few
hundred calls a second from dozens of threads in one interpreter, so that
compile is what saturates the embedded store — its round trip grew to about
30 ms, and every request was owed units for that long before it held them
(``docs/fairness.md``, "Fair in practice"). A real Redis compiles a script
once, when it is loaded; this gives the simulation's fakeredis the same.

``compile_once`` wraps the server's Lua runtime so ``execute`` keeps the
compiled chunk per source. A chunk is an ordinary Lua function: running it
again runs the script afresh (its locals are new on every call; ``KEYS``
and ``ARGV`` are globals fakeredis sets before each call), so replies and
errors are exactly those of compiling anew. It is applied to the
simulation's own clients only (``ratequota.sim.fleet``); the library's
embedded backend is left as fakeredis ships it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["compile_once", "fake_servers"]

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

    The runtime exists once the server has run its first script (publishing
    the policy does that), so call this afterwards. False, and nothing
    changed, when the server has no Lua runtime of the expected shape (a
    fakeredis whose internals moved): the simulation then runs as before,
    only slower.
    """
    runtime = getattr(server, "_lua_runtime", None)
    if isinstance(runtime, _CompiledChunks):
        return True
    if runtime is None or not callable(getattr(runtime, "compile", None)):
        return False
    server._lua_runtime = _CompiledChunks(runtime)
    return True


def fake_servers(connections: Iterable[Any]) -> list[Any]:
    """The fakeredis servers behind ``connections`` (none for a real Redis), each once."""
    found: list[Any] = []
    for conn in connections:
        pool = getattr(conn, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {})
        server = kwargs.get("server") if isinstance(kwargs, dict) else None
        if (
            server is not None
            and type(server).__module__.startswith("fakeredis")
            and not any(server is s for s in found)
        ):
            found.append(server)
    return found
