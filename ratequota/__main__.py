"""``python -m ratequota``: the command line."""

from __future__ import annotations

import sys

from ratequota.cli import main

if __name__ == "__main__":
    sys.exit(main())
