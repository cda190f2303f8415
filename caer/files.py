"""Files: writing one so that a stop or a failure part-way never leaves it half-written; saying why one cannot be
read."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed onto ``path`` when the block ends without
    an error, removed otherwise. The file that was at ``path`` stays as it was until the new one is complete."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def missing(path: str | Path, what: str) -> str:
    """Why ``path`` cannot be read as ``what`` (e.g. "annotation file"): it is a folder, or it does not exist."""
    path = Path(path)
    if path.is_dir():
        return f"{path}: a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}"
    return f"{path}: {what} not found"
