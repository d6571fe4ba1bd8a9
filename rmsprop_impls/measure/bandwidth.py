"""Each device's memory-bandwidth limit: its roof (:mod:`.roof`), measured per working-set size.

A variant's GB/s is a fraction of the roof of the device it runs on, at the
step's own working set (w, g and v), so every device gets its own roof,
measured in the same run (:func:`measure_limits`). The roof's figure beyond the
caches is what a single STREAM-style limit used to give; a tree whose working
set fits in the last-level cache is judged against the cache's roof, and called
cache-resident wherever its fraction is shown.
"""

from __future__ import annotations

import platform
import subprocess

from .roof import Roof, measure_cpu_roof, measure_gpu_roof
from .roof import gpu_available as gpu_available  # where the self-test and the CLI have always found it
from .roof_cache import best_so_far

#: The concrete devices a variant runs on (see ``OptimizerBase.device``).
DEVICES = ("cpu", "gpu")
#: What a GPU limit reads on a machine without a GPU.
NO_GPU = "n/a (no GPU)"
#: A device's roof, ``None`` where it has none (no GPU).
Limits = dict[str, "Roof | None"]


def cpu_roof() -> Roof:
    """The CPU's roof, measured now and raised to the best measured on this machine before (:mod:`.roof_cache`)."""
    return best_so_far(measure_cpu_roof())


def gpu_roof() -> Roof | None:
    """The GPU's, likewise; ``None`` without a GPU."""
    return best_so_far(measure_gpu_roof())


def measure_limits(cpu=cpu_roof, gpu=gpu_roof) -> Limits:
    """Every device's roof, measured now, one after the other: ``{"cpu": Roof, "gpu": Roof or None}``.

    ``cpu`` and ``gpu`` are the measurements (the tests stub them).
    """
    return {"cpu": cpu(), "gpu": gpu()}


def limit_for(limits: Limits, device: str) -> Roof | None:
    """The roof a variant on ``device`` (concrete: ``"cpu"`` or ``"gpu"``) is judged against; ``None`` if absent.

    A plain number in ``limits`` (a limit given by hand) is a roof flat at every working set.
    """
    if device not in DEVICES:
        raise ValueError(f"a limit is per concrete device ({', '.join(DEVICES)}), not {device!r}")
    limit = limits.get(device)
    return Roof.flat(device, limit) if isinstance(limit, (int, float)) and limit else limit or None


def limit_at(limits: Limits, device: str, working_set_bytes: float) -> float | None:
    """``device``'s roof in GB/s at a working set of ``working_set_bytes``; ``None`` where that device has none."""
    roof = limit_for(limits, device)
    return roof.at(working_set_bytes) if roof else None


def fraction_of_limit(gbps: float, limits: Limits, device: str, working_set_bytes: float) -> float | None:
    """``gbps`` as a fraction of ``device``'s roof at ``working_set_bytes``; ``None`` where that device has none."""
    limit = limit_at(limits, device, working_set_bytes)
    return gbps / limit if limit else None


def cache_resident(limits: Limits, device: str, working_set_bytes: float) -> bool:
    """Whether a working set of ``working_set_bytes`` fits in the last-level cache of ``device``'s roof."""
    roof = limit_for(limits, device)
    return bool(roof) and roof.cache_resident(working_set_bytes)


def percent_text(fraction: float | None, cache_resident: bool = False) -> str | None:
    """A fraction of the roof as a table cell: ``"83%"``, ``"91% (cache-resident)"``; ``None`` without a fraction."""
    if fraction is None or fraction != fraction:
        return None
    return f"{100 * fraction:.0f}%" + (" (cache-resident)" if cache_resident else "")


def limit_text(roof: Roof | float | None, device: str = "gpu") -> str:
    """One device's roof for a table or a sentence: ``"25.3 GB/s beyond the caches, up to 61.0 in them"``."""
    if isinstance(roof, Roof):
        caches = f", up to {max(roof.gbps):.1f} in them" if max(roof.gbps) > roof.beyond_caches else ""
        return f"{roof.beyond_caches:.1f} GB/s beyond the caches{caches}"
    if roof:
        return f"{roof:.1f} GB/s"
    return NO_GPU if device == "gpu" else "n/a (not measured)"


def roof_gbps(roof: Roof | float | None) -> float | None:
    """A roof's figure beyond the caches, for a JSON file or a tracked benchmark; ``None`` without a roof."""
    return getattr(roof, "beyond_caches", roof) or None


def describe_limits(limits: Limits) -> str:
    """One line naming each device's roof, as the CLI prints it above its tables."""
    cpu = limit_for(limits, "cpu")
    llc = f"; last-level cache {cpu.last_level_cache / 2**20:.0f} MiB" if cpu and cpu.last_level_cache else ""
    return (
        "memory-bandwidth roof (best of several kernels, per working-set size; % of limit is at each step's own "
        f"working set): cpu {limit_text(cpu, 'cpu')}; gpu {limit_text(limits.get('gpu'), 'gpu')}{llc}"
    )


def core_types() -> dict[str, int] | None:
    """Cores per type where they differ (Apple silicon: ``{"performance": 8, "efficiency": 4}``), else ``None``."""
    if platform.system() != "Darwin":
        return None
    try:

        def sysctl(key: str) -> str:
            return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=True).stdout.strip()

        levels = int(sysctl("hw.nperflevels"))
        if levels < 2:
            return None
        names = ["performance", "efficiency"] + [f"level{i}" for i in range(2, levels)]
        return {names[i]: int(sysctl(f"hw.perflevel{i}.logicalcpu")) for i in range(levels)}
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
