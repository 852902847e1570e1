"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an error,
    removed otherwise: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is not a directory",
           errno.EISDIR: "it is a directory", errno.ENOENT: "no such file or directory"}


def os_error_text(err: OSError) -> str:
    """An OS error as a user reads it: the path and the cause in words ("/data/runs/x: the disk is full"), then
    what was added to it (:meth:`BaseException.add_note`: e.g. how to resume the run)."""
    cause = _CAUSES.get(err.errno, err.strerror or str(err)) if err.errno is not None else str(err)
    path = err.filename if err.filename is not None else None
    text = f"{path}: {cause}" if path is not None else (str(err) if err.errno is None else cause)
    if err.filename2 is not None:
        text += f" (and {err.filename2})"
    return "; ".join([text, *getattr(err, "__notes__", [])])
