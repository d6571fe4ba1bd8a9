"""The MLX settings a measurement sets deliberately, decided per device and platform, and said in words.

The allocator cache: MLX's CPU allocator keeps only 32 MB of freed buffers, so
big steps would mostly time page faults; there an 8 GiB limit is set. Metal's
allocator already keeps most of the machine's RAM, so on a GPU device the
default is MLX's own: an 8 GiB limit would lower it on most Macs.

The memory cap: ``RLIMIT_AS`` on Linux with the CPU as the default device,
where lowering the soft limit is refused only above the hard limit, and an
allocation past it fails. A GPU reserves far more address space than memory
(MLX's CUDA allocator pools with ``cudaMallocAsync`` and uses managed memory),
and macOS does not enforce ``RLIMIT_AS`` and refuses it once Metal has mapped
its address space (``ValueError: current limit exceeds maximum limit``), so
there MLX's portable ``mx.set_memory_limit`` is the cap. That one fails no
allocation (neither Metal's nor CUDA's allocator checks it): above it
``mx.eval`` waits for running work before scheduling more and MLX frees its
cache, so on a Mac or a GPU a process over it slows down, and runs out only
where the device does. ``benchmarks/common.py`` applies the same rule in each
benchmark process; it keeps its own copy because asv runs it against old commits.
"""

from __future__ import annotations

import sys

import mlx.core as mx

MIB = 1024 * 1024
#: The cache limit on the CPU allocator, where MLX's own default (32 MB) is too small to measure steps.
CPU_CACHE_LIMIT_MB = 8192
#: The cap on a benchmark process: past it an allocation fails on Linux's CPU (RLIMIT_AS); elsewhere MLX waits.
MEMORY_LIMIT_MB = 8192


def on_cpu_allocator() -> bool:
    """Whether MLX's default device is the CPU, whose allocator keeps little cache by default."""
    return mx.default_device() == mx.cpu


def current_cache_limit() -> int:
    """MLX's allocator cache limit in bytes (MLX only reports it when it is set, so set it back at once)."""
    limit = mx.set_cache_limit(1 << 62)  # raising it frees nothing
    mx.set_cache_limit(limit)
    return limit


def default_cache_limit_mb() -> int | None:
    """The limit to set when the user set none: ``CPU_CACHE_LIMIT_MB`` on the CPU, ``None`` (MLX's own) on a GPU."""
    return CPU_CACHE_LIMIT_MB if on_cpu_allocator() else None


def describe_cache_limit(megabytes: int | None) -> str:
    """What setting ``megabytes`` (``None``: the device's default) puts in force, without setting it."""
    if megabytes is None:
        megabytes = default_cache_limit_mb()
    if megabytes is None:
        return f"MLX cache limit {current_cache_limit() // MIB} MiB (MLX's own default on {mx.default_device()})"
    return f"MLX cache limit {megabytes} MiB"


def apply_cache_limit(megabytes: int | None) -> str:
    """Set the cache limit (``None``: the device's default) and say what is in force."""
    if megabytes is None:
        megabytes = default_cache_limit_mb()
    if megabytes is not None:
        mx.set_cache_limit(megabytes * MIB)
    return describe_cache_limit(megabytes)


def memory_cap(limit_mb: int = MEMORY_LIMIT_MB, platform: str | None = None, on_gpu: bool | None = None) -> str:
    """Which memory cap a benchmark process on ``platform`` (default: this one) with a GPU default device or not
    (default: MLX's) puts in force, in words."""
    platform = platform or sys.platform
    on_gpu = not on_cpu_allocator() if on_gpu is None else on_gpu
    soft = f"MLX memory limit {limit_mb} MiB (mx.set_memory_limit, which waits rather than fails"
    if on_gpu:
        return f"{soft}; the default device is a GPU, whose address space is no measure of its memory)"
    if platform.startswith("linux"):
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard == resource.RLIM_INFINITY or limit_mb * MIB <= hard:
            return f"address space capped at {limit_mb} MiB (RLIMIT_AS)"
        return f"{soft}; RLIMIT_AS is above the hard limit here)"
    return f"{soft}; {platform} does not take RLIMIT_AS)"
