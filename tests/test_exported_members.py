"""The public facade: ``__all__`` and the names ``ratequota`` exposes must not drift apart."""

from __future__ import annotations

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
