"""The best roof this machine has shown: each measurement merged, point by point, with the ones before it.

Load from other processes only ever makes a kernel slower, so a roof measured on
a busy machine is too low, and a step timed a moment later, when the machine is
quieter, could come out above it. A roof is the fastest the machine moves memory,
so the best of every measurement is the better estimate. It is kept per machine
(its CPU, platform, cores and MLX, as the ``auto`` optimizer's choices are), per
boot, per device, per thread count and per sweep, one small JSON file each in
the user cache directory. Per boot, because those names do not tell one host
from another: a cloud VM restarts on other hardware under the same CPU name
(here a kept 64 GB/s stood over a host that measured 43 GB/s: a step moving
41 GB/s read as 64% of it instead of 95%), and memory or firmware can change between
boots of one machine. ``RMSPROP_BENCH_ROOF_CACHE=0`` measures afresh and keeps nothing;
deleting the files (``roof-*.json``) forgets what was kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ..cpu_threads import default_threads
from ..user_cache import cache_dir
from .caches import sysctl_text
from .choice_cache import machine
from .roof import Roof


@functools.cache
def boot_id() -> str:
    """This boot of the machine (Linux's boot id, macOS's boot time); ``""`` where the platform tells neither."""
    if sys.platform.startswith("linux"):
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""
    if sys.platform == "darwin":
        return sysctl_text("kern.boottime") or ""
    return ""


def _path(roof: Roof) -> Path:
    key = {
        **machine(),
        "boot": boot_id(),
        "roof": roof.device,
        "threads": default_threads(),
        "working_sets": list(roof.working_sets),
    }
    return cache_dir() / f"roof-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"


def best_so_far(roof: Roof | None) -> Roof | None:
    """``roof`` with each point raised to the best this machine measured there before; remembered for next time."""
    if roof is None or os.environ.get("RMSPROP_BENCH_ROOF_CACHE") == "0":
        return roof
    path = _path(roof)
    try:
        kept = json.loads(path.read_text())
        pairs = zip(roof.gbps, roof.best_kernels, kept["gbps"], kept["best_kernels"])
        best = [(g, k) if g >= old_g else (float(old_g), str(old_k)) for g, k, old_g, old_k in pairs]
        if len(best) == len(roof.gbps):
            roof = replace(roof, gbps=tuple(g for g, _ in best), best_kernels=tuple(k for _, k in best))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # nothing kept yet, or a file this version cannot read: this measurement stands
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"gbps": roof.gbps, "best_kernels": roof.best_kernels}, f)
    os.replace(tmp, path)  # a reader never sees half a file
    return roof
