"""Files: writing one so that a stop or a failure part-way never leaves it half-written; checking a command's outputs
before any work; saying why one cannot be read."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; a second writer is not refused there
    fcntl = None


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed onto ``path`` when the block ends without
    an error, removed otherwise. The file that was at ``path`` stays as it was until the new one is complete."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with naming_errors(path, temp):  # by the path the user knows: not the temporary name, nor none (a full disk)
            yield temp
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_errors(path: str | Path, *aliases: str | Path) -> Iterator[None]:
    """An OS error of the block that names no file (a full disk, a size limit: some writers raise those without
    one) or one of ``aliases`` (a temporary name) is raised again naming ``path``; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        nameless = err.filename is None and err.errno is not None
        if not (nameless or err.filename in {str(a) for a in aliases}):
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


def missing(path: str | Path, what: str) -> str:
    """Why ``path`` cannot be read as ``what`` (e.g. "annotation file"): it is a folder, or it does not exist."""
    path = Path(path)
    if path.is_dir():
        return f"{path}: a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}"
    return f"{path}: {what} not found"


def write_atomically(files: dict[Path, str]) -> None:
    """Write each text under a temporary name beside its path, then rename them all: a stopped or failed run leaves
    no half-written file, and the files that were there stay as they were until every new one is complete."""
    with contextlib.ExitStack() as renames:  # the files are renamed as the stack unwinds, once all are written
        for path, text in files.items():
            with open(renames.enter_context(replaced_atomically(path)), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """Refuse, before any work, an output (flag, path) that is one of the inputs (what it is, path) or inside an
    input folder (whatever --overwrite says), names the same file as another output, is a folder or lies under a
    file, or already exists (without ``overwrite``). Every command that writes files checks them here."""
    written: dict[Path, str] = {}
    for flag, path in outputs:
        for what, source in inputs:
            same = _same_file(path, source)
            if same or (source.is_dir() and source.resolve() in path.resolve().parents):
                raise ValueError(f"{flag} {path} {'is' if same else 'lies inside'} {what} {source}: write the output "
                                 "elsewhere")
        if path.resolve() in written:
            raise ValueError(f"{written[path.resolve()]} and {flag} name the same file, {path}")
        written[path.resolve()] = flag
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder: give the file to write")
        blocker = nearest_existing(path.parent)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"{flag} {path}: {blocker} is a file, not a folder")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag} {path} already exists: pass --overwrite to replace it")
        if blocker is not None and not os.access(blocker, os.W_OK):
            raise ValueError(f"{flag} {path}: cannot write in {blocker} (a read-only file system, or no permission)")


def nearest_existing(path: Path) -> Path | None:
    """``path`` or its nearest parent that exists: what a new file or folder at ``path`` would be made in (a file
    there means nothing can be)."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (through links, too)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


class FileLock:
    """An OS lock (``flock``) on a file: one process at a time holds it. The lock goes with the process, so a killed
    holder leaves nothing to clean up; the file only says who holds it. (``flock`` may not work across machines on a
    network file system.)"""

    def __init__(self, path: str | Path, holder: str):
        self.path, self.holder = Path(path), holder  # holder: what the file says of this process ("caer train")
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; or, when another process holds it, take nothing and return what its file says of it."""
        if fcntl is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return held_by
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.holder} (pid {os.getpid()} on {socket.gethostname()})".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
