"""A test fixture's expensive build (a real asv history), done once for the whole session.

Under pytest-xdist every worker is its own process, so a session fixture would be built once per
worker: asv run over several commits, several minutes each time. Here the first worker to ask builds
it under a lock in the directory all workers share, and the others load what it left.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock

T = TypeVar("T")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(workdir)``'s result, built by one process of this session (``workdir`` is a fresh directory);
    a build that failed is tried again by the next to ask, in a clean directory."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    workdir, done = root / f"built-{name}", root / f"built-{name}.pickle"
    with FileLock(str(root / f"built-{name}.lock")):
        if done.exists():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        result = build(workdir)
        done.write_bytes(pickle.dumps(result))
        return result
