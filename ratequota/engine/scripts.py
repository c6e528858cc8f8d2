"""The Lua scripts shipped with the package, read once and shared by every client.

Each script in ``lua/`` begins with a header naming its KEYS, ARGV and reply;
``ScriptSpec`` parses that header so the argument encoders (and the tests)
can check every call against it. The library files hold what the scripts
share, each one idea: ``_fair.lua`` the rule alone (pure, mirrors
``ratequota.fairness``), ``_codec.lua`` how values are written in the keys,
``_ledger.lua`` the usage ledger, ``_state.lua`` the incremental group
state, ``_meters.lua`` the rate-meter arithmetic (pure, mirrors
``ratequota.rates``), ``_metered.lua`` the meters kept in a group's keys,
``_lib.lua`` the lease operations, ``_fast.lua`` the decisions that need
no walk. Redis has no ``require``, so they are prepended to each script
here, once, in that order, and the SHA1 is that of the combined text.

An entry script may end its fast path with the line ``FAST_END``: it is
then linked in two parts (the definitions its fast path reaches, the fast
path, the definitions only the rest reaches, the rest), so a call the fast
path answers never creates the rest's closures (``_fast.lua`` says why).
Each further ``FAST_END`` line starts one more part the same way: a second
fast path (acquire's refusals) whose definitions the first one's callers
never create.

The same scripts also make one Redis function library (``function_library``):
every library definition once, at load, and each entry script registered as
a function of it. A call by ``FCALL`` then creates none of the closures an
``EVALSHA`` re-creates on every call (docs/design.md, "Scripts as functions").

In a wheel the scripts live in ``ratequota/lua`` (hatch copies the top-level
``lua/`` there); in a source checkout or an editable install they are read
from the top-level folder.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path

import attrs

__all__ = [
    "SCRIPT_NAMES",
    "FunctionLibrary",
    "ScriptSpec",
    "function_library",
    "load_scripts",
    "script",
]

#: Every entry script, by the name of its file without ``.lua``.
SCRIPT_NAMES = (
    "acquire",
    "acquire_many",
    "release",
    "release_many",
    "renew",
    "snapshot",
    "apply_policy",
    "settle",
)

#: Library files prepended to every script, in dependency order.
LIBRARY = ("_fair", "_codec", "_ledger", "_state", "_meters", "_metered", "_lib", "_fast")
#: The flags a script's function is registered with. Over ``maxmemory`` (``noeviction``) Redis
#: refuses a function without flags before it runs, where an ``EVALSHA`` is refused only at a
#: first write that adds memory: a release (its first write a delete) and a snapshot (no write)
#: ran there, and still do.
FUNCTION_FLAGS: dict[str, tuple[str, ...]] = {
    "release": ("allow-oom",),
    "release_many": ("allow-oom",),
    "snapshot": ("no-writes",),
}
#: The line that ends an entry script's fast path (see the module's docstring).
FAST_END = "-- end of the fast path\n"
_KEY_LINE = re.compile(r"^-- KEYS\[(\d+)\]\s+(\w+)")
_ARG_LINE = re.compile(r"^-- ARGV\[(\d+)(\.\.)?\]\s+(\S+)")


@attrs.frozen
class ScriptSpec:
    """One script: its combined source, SHA1, and the KEYS/ARGV its header declares.

    ``variadic`` is true when the header ends with ``ARGV[n..]`` (a tail of
    repeated arguments), so a call may pass more than ``len(argv)`` values.
    """

    name: str
    source: str
    sha: str
    keys: tuple[str, ...]
    argv: tuple[str, ...]
    variadic: bool
    #: The name ``FCALL`` calls this script by, in the library of this text (``function_library``).
    function: str = ""

    @property
    def required_keys(self) -> int:
        """How many leading keys every call passes: the rate meters' contention sets
        (``contend1..4``) close the list and are passed only by calls that name meters, so a
        call without meters touches exactly the group keys it always did (in a Redis Cluster,
        a script naming a key that does not exist is refused while its slot migrates)."""
        for index, key in enumerate(self.keys):
            if key.startswith("contend"):
                return index
        return len(self.keys)

    def check_call(self, n_keys: int, n_args: int) -> None:
        """Raise ``AssertionError`` if a call does not match the header (a bug, not bad input).

        Every call is checked; a shape already found right is remembered (it is
        checked on every encode of the hot path). Variadic scripts take any
        number of arguments, so theirs are checked afresh (the memory stays bounded).
        """
        shape = (self.sha, self.keys, self.argv, n_keys, n_args)
        if shape in _CHECKED:
            return
        self._check_call(n_keys, n_args)
        if not self.variadic:
            _CHECKED.add(shape)

    def _check_call(self, n_keys: int, n_args: int) -> None:
        if n_keys not in (len(self.keys), self.required_keys):
            raise AssertionError(
                f"{self.name}: {n_keys} keys given, header declares {len(self.keys)}"
            )
        fixed = len(self.argv) - (1 if self.variadic else 0)
        if n_args < fixed or (not self.variadic and n_args != fixed):
            raise AssertionError(f"{self.name}: {n_args} args given, header declares {self.argv}")


#: (script, keys, args) shapes that matched their script's header (``ScriptSpec.check_call``).
_CHECKED: set[tuple[str, tuple[str, ...], tuple[str, ...], int, int]] = set()


def _lua_dir() -> Path:
    packaged = resources.files("ratequota") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parents[2] / "lua"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError("ratequota's Lua scripts are missing from this installation")


def parse_header(name: str, text: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """KEYS and ARGV names declared by a script's leading comment block."""
    keys: list[str] = []
    argv: list[str] = []
    variadic = False
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        # "KEYS[1] policy, KEYS[2] demand, ..." may share a line.
        for part in line[2:].split(","):
            key = _KEY_LINE.match("-- " + part.strip())
            if key:
                if int(key.group(1)) != len(keys) + 1:
                    raise ValueError(f"{name}.lua: KEYS out of order in header")
                keys.append(key.group(2))
        arg = _ARG_LINE.match(line)
        if arg:
            if int(arg.group(1)) != len(argv) + 1:
                raise ValueError(f"{name}.lua: ARGV out of order in header")
            argv.append(arg.group(3))
            variadic = variadic or bool(arg.group(2))
    if "reply:" not in text.split("\n\n", 1)[0] and "-- reply:" not in text:
        raise ValueError(f"{name}.lua: header has no reply description")
    return tuple(keys), tuple(argv), variadic


_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_]\w*)")
_NAME = re.compile(r"[A-Za-z_]\w*")
# A Lua comment to the end of its line (the scripts hold no "--" inside a string).
_COMMENT = re.compile(r"--.*$", re.MULTILINE)


def _names(text: str) -> list[str]:
    """The identifiers ``text`` uses in code: a name in a comment links nothing."""
    return _NAME.findall(_COMMENT.sub("", text))


def library_parts(text: str) -> list[tuple[str, str]]:
    """The top-level definitions of library text, in order: ``(name, source)`` each.

    A definition starts at a ``local function NAME`` or ``local NAME =`` line at
    column 0 and runs to the next one; comment lines just above a definition
    belong to it, the file's opening comment to none.
    """
    parts: list[tuple[str, list[str]]] = []
    pending: list[str] = []
    for line in text.splitlines():
        match = _DEFINITION.match(line)
        if match:
            parts.append((match.group(1), [*pending, line]))
            pending = []
        elif line.startswith("--") and (not parts or not parts[-1][1][-1].strip()):
            pending.append(line)  # a comment after a blank line: it leads the next definition
        elif parts:
            parts[-1][1].extend([*pending, line])
            pending = []
        else:
            pending = []  # the file's opening comment
    return [(name, "\n".join(lines)) for name, lines in parts]


def reach(parts: list[tuple[str, str]], body: str) -> set[str]:
    """The names of the definitions ``body`` uses, directly or through each other."""
    defined = dict(parts)
    wanted: set[str] = set()
    todo = [n for n in _names(body) if n in defined]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(n for n in _names(defined[name]) if n in defined)
    return wanted


def link(parts: list[tuple[str, str]], body: str, linked: frozenset[str] = frozenset()) -> str:
    """The definitions ``body`` uses, in library order, but those already ``linked``.

    Redis runs a script's whole text on every ``EVALSHA``, and creating a
    closure costs about as much as a cheap command: a script carries only the
    library functions it can reach (the function library, loaded once, carries
    every one: ``library_source``).
    """
    wanted = reach(parts, body) - linked
    return "\n".join(source for name, source in parts if name in wanted)


def link_script(parts: list[tuple[str, str]], body: str) -> str:
    """An entry script with its library, in one part per ``FAST_END`` line and one more: each
    part preceded by the definitions it reaches that no earlier part did."""
    *fast, rest = body.split(FAST_END)
    linked: frozenset[str] = frozenset()
    text = ""
    for part in fast:
        text += f"{link(parts, part, linked)}\n{part}{FAST_END}\n"
        linked |= reach(parts, part)
    return f"{text}{link(parts, rest, linked)}\n{rest}"


@attrs.frozen
class FunctionLibrary:
    """Every script as one Redis function library: ``FUNCTION LOAD source`` defines ``name``.

    The library's name holds a hash of its text, so pods of two releases load
    two libraries side by side (functions are named after their library) and
    neither replaces the other's.
    """

    name: str
    source: str


#: lua/_codec.lua's switch of its memos, as written (off) and as the function library's text
#: has it (on): only a library's tables outlive the call ("Texts parsed before, remembered").
MEMOS_OFF = "local MEMOS_KEPT = false"
MEMOS_ON = "local MEMOS_KEPT = true"


def keeping_memos(text: str) -> str:
    """Library definitions ``text`` with their memos kept, as a function library runs them.

    By ``EVALSHA`` the memos would be made afresh by every call, and filling them costs
    more than they save there, so the scripts as written keep none. Text without the switch
    (another release's scripts, as ``benchmarks/`` compare them) is returned as it is.
    """
    if text.count(MEMOS_OFF) > 1:
        raise ValueError(f"more than one {MEMOS_OFF!r} in the library's definitions")
    return text.replace(MEMOS_OFF, MEMOS_ON)


def library_source(name: str, parts: list[tuple[str, str]], bodies: dict[str, str]) -> str:
    """The text of library ``name``: the definitions any body reaches, once, then each body
    registered as function ``<name>_<script>`` with its ``FUNCTION_FLAGS``.

    A function gets its keys and arguments as parameters; the library's own
    functions read ``KEYS`` and ``ARGV``, so those are the library's locals,
    set by each function as it begins (Redis runs one at a time). Definitions
    run once, at ``FUNCTION LOAD``, where no global may be read: they define
    functions, constants and memos (``keeping_memos``: the library's outlive the call).
    """
    wanted: set[str] = set()
    for body in bodies.values():
        wanted |= reach(parts, body)
    text = f"#!lua name={name}\nlocal KEYS, ARGV\n"
    text += keeping_memos("\n".join(source for part, source in parts if part in wanted))
    for script_name, body in bodies.items():
        flags = ", ".join(f"'{flag}'" for flag in FUNCTION_FLAGS.get(script_name, ()))
        text += (
            f"\nredis.register_function{{function_name = '{name}_{script_name}',\n"
            f"callback = function(keys, args)\nKEYS, ARGV = keys, args\n{body}\nend,\n"
            f"flags = {{{flags}}}}}\n"
        )
    return text


@functools.cache
def _linked() -> tuple[dict[str, ScriptSpec], FunctionLibrary]:
    """Read, link and hash every script, and make their function library, once per process."""
    folder = _lua_dir()
    parts = library_parts(
        "\n".join((folder / f"{n}.lua").read_text(encoding="utf-8") for n in LIBRARY)
    )
    bodies = {n: (folder / f"{n}.lua").read_text(encoding="utf-8") for n in SCRIPT_NAMES}
    # Named by a hash of the whole text under a placeholder name: the code, the wrapper and the
    # flags (a library already loaded under a name is never replaced).
    hashed = hashlib.sha1(library_source("ratequota", parts, bodies).encode("utf-8"))
    name = f"ratequota_{hashed.hexdigest()[:16]}"
    specs: dict[str, ScriptSpec] = {}
    for script_name, body in bodies.items():
        keys, argv, variadic = parse_header(script_name, body)
        source = link_script(parts, body)
        sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        specs[script_name] = ScriptSpec(
            script_name, source, sha, keys, argv, variadic, f"{name}_{script_name}"
        )
    return specs, FunctionLibrary(name, library_source(name, parts, bodies))


def load_scripts() -> dict[str, ScriptSpec]:
    """Every script, read, linked and hashed once per process."""
    return _linked()[0]


def function_library() -> FunctionLibrary:
    """The scripts as one function library (``FUNCTION LOAD``), made once per process."""
    return _linked()[1]


def script(name: str) -> ScriptSpec:
    """The spec of one script by name."""
    return load_scripts()[name]
