"""Where the ``auto`` optimizer remembers its choice between runs.

A choice holds only for the rule it was measured running (the optimizer and
its hyper-parameters, which pick the branches of its update), the tree it was
measured on (leaf shapes and dtypes, in order), the MLX version, the device and
the machine, so all of those make up its key. Each key is one small JSON file, named by the key's hash, in the
user cache directory (:func:`rmsprop_impls.user_cache.cache_dir`). Files are
written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..mlx_device import device_info
from ..user_cache import cache_dir

_SUFFIX = ".auto.json"


@cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the speed of a variant depends on besides the tree."""
    info = device_info()
    return {
        "mlx": mx.__version__,
        "device": f"{mx.default_device()} {info.get('device_name', '')}".strip(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
    }


def choice_key(
    leaves: list[mx.array], candidates: list[str], optimizer: str = "rmsprop", hyper: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "optimizer": optimizer,
        "hyper": json.loads(json.dumps(hyper or {}, default=float)),  # as the file holds it: lists, not tuples
        "tree": [[list(x.shape), str(x.dtype).removeprefix("mlx.core.")] for x in leaves],
        "candidates": sorted(candidates),
        **machine(),
    }


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / f"{digest}{_SUFFIX}"


def load_choice(key: dict[str, Any]) -> dict[str, Any] | None:
    """The record saved under ``key``, or ``None`` (also for an unreadable or mismatched file)."""
    try:
        record = json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key and "variant" in record else None


def save_choice(key: dict[str, Any], variant: str, details: dict[str, Any]) -> Path:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "variant": variant, **details}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clear_choices() -> int:
    """Delete every remembered choice; returns how many there were."""
    paths = list(cache_dir().glob(f"*{_SUFFIX}")) if cache_dir().is_dir() else []
    for p in paths:
        p.unlink(missing_ok=True)
    return len(paths)
