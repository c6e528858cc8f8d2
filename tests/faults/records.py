"""The files a fault run leaves behind: JSON lines, one record per line, flushed as written.

Plain data only, shared by the pods and the driver (which write) and the
checker (which reads). A pod killed with SIGKILL loses at most the line it was
writing: every line is one ``write`` of a line-buffered file, and a torn last
line is skipped by ``read_jsonl`` (a torn line anywhere else is an error).

Times: ``*_ms`` fields on Redis time are what the library reported (a lease's
expiry) or derived from it exactly (admission = expiry - ttl). ``wall_*``
fields are the writer's ``time.time()``: every redis-server of a run is on
this host, so that is the clock Redis ``TIME`` reads too (the driver records
the offset it measured in ``clock`` records). ``mono_*`` fields are
``time.monotonic()`` of the writer, used only for the deadline check.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["JsonlWriter", "read_jsonl"]


class JsonlWriter:
    """Appends records to a JSON-lines file, each flushed to the OS before ``write`` returns.

    Safe to share between threads: the lock guards one ``write`` call to a
    local file, never a network call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Write one record as one line and flush it."""
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one file; a torn *last* line (a SIGKILLed writer) is skipped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number >= len(lines) - 1:  # the last line, possibly before a final newline
                return
            raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        yield record
