"""Each device's memory-bandwidth limit, measured the way STREAM does.

A variant's GB/s is a fraction of the limit of the device it runs on, so every
device gets its own limit, measured in the same run (:func:`measure_limits`).

**CPU:** an in-place triad ``a = a + s*b`` with ``s = 1``, over arrays far
larger than the caches, run on every core at once. The only DRAM traffic is
reading ``a`` and ``b`` and writing ``a`` (12 bytes per float32 element), the
same pattern as an in-place RMSprop step. With ``s = 1`` NumPy does it in one
vectorised pass (``np.add(a, b, out=a)``); a general ``s`` needs a second pass
through a scratch block, and that version under-reported the limit by about
30% here (the C++ kernel beat it). NumPy releases the GIL inside its loops, so
the threads run in parallel. The arrays are cut into many more chunks than
there are threads and each thread takes the next chunk when it is done, so
where cores differ (performance and efficiency cores) the fast ones do more of
the work instead of waiting for the slow ones.

**GPU**, where MLX has one (Metal, CUDA): the same triad as MLX ops on
``mx.gpu``, one elementwise pass per kernel over 256 MiB buffers (far larger
than any GPU's last-level cache), evaluated, so synchronised, after a batch of
passes. ``a`` is rebound each pass, so MLX donates its buffer to the result and
the pass moves 12 bytes per element, as on the CPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

#: The concrete devices a variant runs on (see ``RMSpropBase.device``).
DEVICES = ("cpu", "gpu")
#: What a GPU limit reads on a machine without a GPU.
NO_GPU = "n/a (no GPU)"
#: Chunks per thread in the CPU triad: enough that faster cores can take more of them.
CHUNKS_PER_THREAD = 8
#: Passes per timed GPU sample: one pass can take well under a millisecond, less than a synchronisation costs.
GPU_PASSES = 10


def _triad_slice(a: np.ndarray, b: np.ndarray) -> None:
    np.add(a, b, out=a)


def measure_bandwidth(n_elements: int = 1 << 26, repeats: int = 5, threads: int | None = None) -> float:
    """The CPU's limit: median read+write GB/s of the in-place triad with ``threads`` (default: all cores)."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(n_elements, dtype=np.float32)
    b = np.full(n_elements, 0.5, dtype=np.float32)
    chunks = threads * CHUNKS_PER_THREAD if threads > 1 else 1
    bounds = np.linspace(0, n_elements, chunks + 1, dtype=np.int64)
    slices = [(a[lo:hi], b[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            start = time.perf_counter()
            list(pool.map(lambda s: _triad_slice(*s), slices))
            rates.append(12 * n_elements / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


def gpu_available() -> bool:
    """Whether this MLX has a GPU back-end with a device: Metal, or CUDA."""
    cuda = getattr(mx, "cuda", None)
    return bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def measure_gpu_bandwidth(n_elements: int = 1 << 26, repeats: int = 5) -> float | None:
    """The GPU's limit: median GB/s of the in-place triad as MLX ops on ``mx.gpu``; ``None`` without a GPU."""
    if not gpu_available():
        return None
    a = mx.ones((n_elements,), dtype=mx.float32, stream=mx.gpu)
    b = mx.full((n_elements,), 0.5, dtype=mx.float32, stream=mx.gpu)
    mx.eval(a, b)
    rates = []
    for _ in range(repeats + 1):  # the first batch allocates and builds the kernel
        start = time.perf_counter()
        for _ in range(GPU_PASSES):
            a = mx.add(a, b, stream=mx.gpu)
        mx.eval(a)
        mx.synchronize(mx.gpu)
        rates.append(12 * n_elements * GPU_PASSES / (time.perf_counter() - start) / 1e9)
    del a, b
    mx.clear_cache()
    return statistics.median(rates[1:])


def measure_limits(cpu=measure_bandwidth, gpu=measure_gpu_bandwidth) -> dict[str, float | None]:
    """Every device's limit in GB/s, measured now, one after the other: ``{"cpu": ..., "gpu": ... or None}``.

    ``cpu`` and ``gpu`` are the measurements (the tests stub them).
    """
    return {"cpu": cpu(), "gpu": gpu()}


def limit_for(limits: dict[str, float | None], device: str) -> float | None:
    """The limit a variant on ``device`` (concrete: ``"cpu"`` or ``"gpu"``) is a fraction of; ``None`` if absent."""
    if device not in DEVICES:
        raise ValueError(f"a limit is per concrete device ({', '.join(DEVICES)}), not {device!r}")
    return limits.get(device)


def fraction_of_limit(gbps: float, limits: dict[str, float | None], device: str) -> float | None:
    """``gbps`` as a fraction of ``device``'s limit; ``None`` where that device has no limit."""
    limit = limit_for(limits, device)
    return gbps / limit if limit else None


def limit_text(limit: float | None, device: str = "gpu") -> str:
    """One device's limit for a table or a sentence: ``"412.3 GB/s"``, or ``"n/a (no GPU)"``."""
    if limit:
        return f"{limit:.1f} GB/s"
    return NO_GPU if device == "gpu" else "n/a (not measured)"


def describe_limits(limits: dict[str, float | None]) -> str:
    """One line naming each device's limit, as the CLI prints it above its tables."""
    return (
        "memory-bandwidth limit (in-place triad, all cores): "
        f"cpu {limit_text(limits.get('cpu'), 'cpu')}; gpu {limit_text(limits.get('gpu'), 'gpu')}"
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
