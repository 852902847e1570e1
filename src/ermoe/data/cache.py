"""Where ermoe caches what it derives from data (preprocessed volumes, generated cohorts and caption sets, frozen
stem features): ``$ERMOE_CACHE_DIR``, by default ``~/.cache/ermoe``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ERMOE_CACHE_DIR", Path.home() / ".cache" / "ermoe"))
