"""The machine's memory-bandwidth limit, measured the way STREAM does.

An in-place triad ``a = a + s*b`` over arrays far larger than the caches, run
on every core at once: each thread owns a slice and works through it in
cache-sized blocks, so the only DRAM traffic is reading ``a`` and ``b`` and
writing ``a`` (12 bytes per float32 element). NumPy releases the GIL inside
its loops, so the threads run in parallel.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_BLOCK = 1 << 18  # 1 MiB of float32: stays in L2 while it is scaled and added


def _triad_slice(a: np.ndarray, b: np.ndarray, scalar: float) -> None:
    tmp = np.empty(_BLOCK, dtype=a.dtype)
    for start in range(0, a.size, _BLOCK):
        stop = min(start + _BLOCK, a.size)
        t = tmp[: stop - start]
        np.multiply(b[start:stop], scalar, out=t)
        np.add(a[start:stop], t, out=a[start:stop])


def measure_bandwidth(n_elements: int = 1 << 26, repeats: int = 5, threads: int | None = None) -> float:
    """Median read+write GB/s of the in-place triad with ``threads`` (default: all cores)."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(n_elements, dtype=np.float32)
    b = np.full(n_elements, 0.5, dtype=np.float32)
    bounds = np.linspace(0, n_elements, threads + 1, dtype=np.int64)
    slices = [(a[lo:hi], b[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            start = time.perf_counter()
            list(pool.map(lambda s: _triad_slice(s[0], s[1], 1e-3), slices))
            rates.append(12 * n_elements / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])
