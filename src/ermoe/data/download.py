"""Fetching files over HTTP(S) with checksum verification, written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path


class DownloadError(RuntimeError):
    """A file could not be fetched, or what was fetched failed its checksum."""


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``; verify its MD5 before it appears there (a failed check leaves nothing behind)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
            except (urllib.error.URLError, OSError) as err:
                raise DownloadError(f"could not download {url}: {err}") from err
        if md5 is not None:
            got = file_md5(tmp)
            if got != md5:
                raise DownloadError(f"checksum mismatch for {url}: expected MD5 {md5}, got {got}; "
                                    "the file was not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
