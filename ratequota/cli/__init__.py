"""The ``ratequota`` command line: a tool built on the library, never imported by it.

``main`` is the entry point of ``ratequota`` and ``python -m ratequota``;
``client_from_args`` turns the shared backend options into a client (the
simulation builds its pods with it).
"""

from __future__ import annotations

from ratequota.cli.app import build_parser, main
from ratequota.cli.backend import add_backend_options, client_from_args

__all__ = ["add_backend_options", "build_parser", "client_from_args", "main"]
