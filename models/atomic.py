"""``written_atomically``: files that are either absent or complete, never half-written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` to write; renames it to ``path`` on success and
    removes it on failure, so ``path`` is either absent or complete."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
