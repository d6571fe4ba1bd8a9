"""This machine's CPU cache sizes, read from the OS: they lay out the bandwidth roof's sweep.

What the roof needs is the last-level cache that a step on every core can fill:
the sum of the LLC's instances (an AMD EPYC has one L3 per group of cores), and
the L2 likewise. Each platform's query is one small guarded function; where none
answers, :data:`FALLBACK_LAST_LEVEL` stands in and ``source`` says so. The sweep
measures the real steps whatever the sizes read (it spans 1/64 to 16 times the
LLC); the sizes decide only where it looks and which trees are called
cache-resident.

Apple silicon reports its L2 per performance cluster (``hw.perflevel0.l2cachesize``)
but not its system-level cache (SLC), which sits in front of the unified memory
that CPU and GPU share: the L2 stands as the last level there, and the SLC shows
as a step of the roof between 1 and 16 times it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
#: The last-level cache assumed where the OS says nothing: a common server L3 (documented in docs/findings/roof.md).
FALLBACK_LAST_LEVEL = 32 * MIB
SYSFS_CPUS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CacheSizes:
    """Bytes of L2 and of the last-level cache, summed over their instances; ``None`` where unknown."""

    l2: int | None
    last_level: int | None
    source: str  # where the sizes came from, for the docs and the report

    @property
    def last_level_or_fallback(self) -> int:
        return self.last_level or FALLBACK_LAST_LEVEL


def _size_bytes(text: str) -> int:
    """sysfs sizes: ``"1024K"``, ``"32M"``, or plain bytes."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def linux_cache_sizes(root: Path = SYSFS_CPUS) -> CacheSizes | None:
    """Linux sysfs: every online CPU's unified and data caches, each shared instance counted once."""
    instances: dict[int, dict[str, int]] = {}  # level -> shared_cpu_list -> size
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() not in ("Unified", "Data"):
                continue
            level = int((index / "level").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
            instances.setdefault(level, {})[shared] = _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
    if not instances:
        return None
    top = max(instances)
    l2 = sum(instances[2].values()) if 2 in instances else None
    return CacheSizes(l2, sum(instances[top].values()), f"sysfs (L{top}, summed over its instances)")


def sysconf_cache_sizes() -> CacheSizes | None:
    """glibc's ``os.sysconf``: one instance of each level (it knows no sharing), where Python exposes the names."""
    names = os.sysconf_names
    sizes = {}
    for level in (2, 3):
        key = f"SC_LEVEL{level}_CACHE_SIZE"
        if key in names:
            try:
                sizes[level] = os.sysconf(key) or None
            except (OSError, ValueError):
                sizes[level] = None
    last = sizes.get(3) or sizes.get(2)
    return CacheSizes(sizes.get(2), last, "os.sysconf (one instance)") if last else None


def sysctl_text(key: str) -> str | None:
    """macOS's ``sysctl -n key``; ``None`` where it does not answer (another platform, an unknown key)."""
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _sysctl(key: str) -> int | None:
    text = sysctl_text(key)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def macos_cache_sizes() -> CacheSizes | None:
    """macOS sysctl: the performance cores' L2 on Apple silicon, ``hw.l2cachesize``/``hw.l3cachesize`` on Intel."""
    l2 = _sysctl("hw.perflevel0.l2cachesize") or _sysctl("hw.l2cachesize")
    l3 = _sysctl("hw.l3cachesize")
    if not (l2 or l3):
        return None
    return CacheSizes(l2, l3 or l2, "sysctl" + ("" if l3 else " (L2; the system-level cache is not reported)"))


def cache_sizes() -> CacheSizes:
    """This machine's cache sizes from the first query that answers, else unknown (the fallback LLC stands in)."""
    queries = [macos_cache_sizes] if sys.platform == "darwin" else [linux_cache_sizes, sysconf_cache_sizes]
    for query in queries:
        found = query()
        if found is not None:
            return found
    return CacheSizes(None, None, f"unknown: the last-level cache is assumed {FALLBACK_LAST_LEVEL // MIB} MiB")
