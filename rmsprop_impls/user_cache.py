"""The one per-user cache directory: the auto optimizer's choices and the dashboard's npm files live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RMSPROP_BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/rmsprop-bench``, else ``~/.cache/rmsprop-bench``."""
    if os.environ.get("RMSPROP_BENCH_CACHE_DIR"):
        return Path(os.environ["RMSPROP_BENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rmsprop-bench"
