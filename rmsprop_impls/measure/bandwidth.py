"""The machine's memory-bandwidth limit, measured the way STREAM does.

An in-place triad ``a = a + s*b`` with ``s = 1``, over arrays far larger than
the caches, run on every core at once: each thread owns a slice, and the only
DRAM traffic is reading ``a`` and ``b`` and writing ``a`` (12 bytes per float32
element), the same pattern as an in-place RMSprop step. With ``s = 1`` NumPy
does it in one vectorised pass (``np.add(a, b, out=a)``); a general ``s``
needs a second pass through a scratch block, and that version under-reported
the limit by about 30% here (the C++ kernel beat it). NumPy releases the GIL
inside its loops, so the threads run in parallel.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _triad_slice(a: np.ndarray, b: np.ndarray) -> None:
    np.add(a, b, out=a)


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
            list(pool.map(lambda s: _triad_slice(*s), slices))
            rates.append(12 * n_elements / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])
