"""The public facade: ``__all__`` and the names ``ratequota`` exposes must not drift apart.

The examples import only public names, checked by parsing their imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ratequota


def test_all_matches_public_names() -> None:
    """Every public attribute is in __all__ and every name in __all__ exists."""
    public = {
        name
        for name, value in vars(ratequota).items()
        if not name.startswith("_")
        and not getattr(value, "__name__", "").startswith("ratequota.")
        and name not in {"annotations"}
    }
    # Submodules imported as a side effect are not part of the facade.
    modules = {name for name, value in vars(ratequota).items() if type(value).__name__ == "module"}
    assert set(ratequota.__all__) == public - modules


def test_every_exported_name_has_a_docstring() -> None:
    """Public classes and functions say what they are for."""
    missing = [name for name in ratequota.__all__ if not getattr(ratequota, name).__doc__]
    assert missing == []


#: The modules a user may import: the facade and the opt-in extras' and test helpers' modules.
#: Everything else (``ratequota.clients``, ``ratequota.engine``, ``ratequota.errors``, ...)
#: is private: its layout may change in any release.
PUBLIC_MODULES = frozenset(
    {
        "ratequota",
        "ratequota.metrics",
        "ratequota.tracing",
        "ratequota.testing",
        "ratequota.ratelimit_headers",
    }
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def private_imports(source: str) -> list[str]:
    """What ``source`` imports from ratequota that is not public (module or facade name)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            found += [m for m in modules if _ours(m) and m not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            if node.module not in PUBLIC_MODULES:
                found.append(node.module)
            elif node.module == "ratequota":
                names = [alias.name for alias in node.names]
                found += [f"ratequota.{n}" for n in names if n not in ratequota.__all__]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "ratequota"
        ):
            # ``ratequota.errors.X`` after ``import ratequota``: the name must be public.
            name = f"ratequota.{node.attr}"
            if node.attr not in ratequota.__all__ and name not in PUBLIC_MODULES:
                found.append(name)
    return found


def _ours(module: str) -> bool:
    return module == "ratequota" or module.startswith("ratequota.")


def test_private_imports_are_found() -> None:
    """The checker below sees each way of reaching a private module (or it would prove nothing)."""
    source = (
        "import ratequota.clients.aio\n"
        "from ratequota.errors import QuotaExceeded\n"
        "from ratequota import QuotaClient, keys\n"
        "from ratequota.metrics import PrometheusMetrics\n"
        "import ratequota\n"
        "x = ratequota.engine.keys.KeySpace\n"
        "y = ratequota.QuotaClient\n"
    )
    assert sorted(private_imports(source)) == [
        "ratequota.clients.aio",
        "ratequota.engine",
        "ratequota.errors",
        "ratequota.keys",
    ]


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.rglob("*.py")), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_examples_import_only_public_names(path: Path) -> None:
    """An example shows users what to import: only the facade's names and the public modules."""
    assert private_imports(path.read_text(encoding="utf-8")) == []
