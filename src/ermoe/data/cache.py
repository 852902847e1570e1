"""Where ermoe caches what it derives from data (preprocessed volumes, generated cohorts and caption sets, frozen
stem features): ``$ERMOE_CACHE_DIR``, by default ``~/.cache/ermoe``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ERMOE_CACHE_DIR", Path.home() / ".cache" / "ermoe"))


def start_build(root: Path, done: str) -> Path | None:
    """A derived set's folder ``root`` whose file ``done`` is written last: that file if the set is complete, else
    None after clearing what an interrupted build left and creating ``root/images`` (a half-built set is rebuilt,
    never read)."""
    import shutil

    if (root / done).is_file():
        return root / done
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    return None
