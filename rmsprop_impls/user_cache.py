"""The one per-user cache directory: the auto optimizer's choices and the dashboard's npm files live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RMSPROP_BENCH_CACHE_DIR``, else the platform's user cache for rmsprop-bench (``platformdirs``).

    That is ``$XDG_CACHE_HOME/rmsprop-bench`` or ``~/.cache/rmsprop-bench`` on Linux,
    ``~/Library/Caches/rmsprop-bench`` on macOS.
    """
    if os.environ.get("RMSPROP_BENCH_CACHE_DIR"):
        return Path(os.environ["RMSPROP_BENCH_CACHE_DIR"])
    import platformdirs  # here, not at import: asv's benchmark environments install only what the suites need

    return Path(platformdirs.user_cache_dir("rmsprop-bench", appauthor=False))
