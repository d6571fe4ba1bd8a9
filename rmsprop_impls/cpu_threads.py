"""How many threads a CPU step should use by default (the cores this process may really run on), and how long
torch's threads spin after a step timed beside ours.

``os.cpu_count()`` counts every core of the machine. That is too many in three
common cases: a process pinned to some cores (``taskset``, a batch scheduler),
a container whose cgroup grants it a CPU quota smaller than the machine, and an
Apple silicon Mac, whose efficiency cores would make every bandwidth-bound
thread wait for the slowest one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The cgroup v2 ``cpu.max`` quota of this process and its ancestors, in whole CPUs; ``None`` where unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)  # v2: "0::/its/path"
    if path is None:
        return None
    quotas = []
    folder = root / path.lstrip("/")
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def performance_cores() -> int | None:
    """macOS: the physical cores of the fastest performance level (Apple silicon's P-cores); ``None`` elsewhere."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True, timeout=5)
        return int(out.stdout) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def default_threads() -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup quota; on a Mac, its performance cores."""
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = performance_cores() or os.cpu_count() or 1
    quota = cgroup_cpu_quota() if sys.platform.startswith("linux") else None
    return max(1, min(count, quota or count))


#: How long torch's OpenMP threads spin for the next parallel region before they sleep: GNU libgomp's spins (torch
#: on Linux) and LLVM libomp's milliseconds (torch on macOS). Long enough to join a step's back-to-back regions
#: (one per leaf), short enough not to take the cores of the call after the step.
OPENMP_SHORT_SPIN = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}


def short_openmp_spin() -> dict[str, str] | None:
    """Make torch's OpenMP threads stop spinning soon after a step (:data:`OPENMP_SHORT_SPIN`), where the user set
    nothing and torch is not loaded yet; returns the settings torch's threads follow, ``None`` where torch was
    loaded before this could set them.

    By default libgomp's threads spin for milliseconds after each parallel region, on the cores of whatever runs
    next: timed round-robin after torch's fused AdamW on the project's 2-core machine, ``cpu_kernel``'s 16x1M
    step took 13.4 ms where it takes 10.5, and torch's looked 1.5 times faster than it is. Letting them sleep at
    once (``OMP_WAIT_POLICY=PASSIVE``) is no cure: torch's 4096x4K step, a region per leaf, then took 228 ms
    instead of 42-47, waking its threads 4096 times. With the short spin it took 47."""
    if "torch" in sys.modules:
        chosen = {k: os.environ[k] for k in OPENMP_SHORT_SPIN if k in os.environ}
        return chosen if len(chosen) == len(OPENMP_SHORT_SPIN) else None
    return {k: os.environ.setdefault(k, v) for k, v in OPENMP_SHORT_SPIN.items()}
