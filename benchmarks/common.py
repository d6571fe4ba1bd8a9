"""What the suites share: the parameter grid, the MLX settings, safe imports and the bandwidth limit.

asv reads these suites from the working tree and applies them to old commits,
so nothing here may assume the package has every variant, tree or helper:
what an old commit lacks raises ``NotImplementedError`` in ``setup`` and asv
shows it as skipped.

The grid comes from the environment, which asv passes through to each
benchmark process: ``RMSPROP_BENCH_GRID=full`` picks the whole grid instead of
the default subset, and ``RMSPROP_BENCH_VARIANTS``, ``RMSPROP_BENCH_TREES``,
``RMSPROP_BENCH_DTYPES`` and ``RMSPROP_BENCH_OPTIMIZERS`` (comma lists) replace one axis each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable

import mlx.core as mx

import rmsprop_impls

#: The flat variant fed pre-packed gradients, as a trainer with flat gradients would.
FLAT_PACKED = "flat+packed"

#: Synthetic trees span 1e3 to 1e8 parameters and 1 to 16384 leaves; realistic ones are mlx.nn models.
FULL_TREES = [
    "1x1K", "16x64K", "1x16M", "16x1M", "1024x16K", "16384x256", "16x6M",
    "mlp-small", "cnn-small", "transformer-small", "transformer-base",
]  # fmt: skip
DEFAULT_TREES = ["1x1K", "16x1M", "1024x16K", "mlp-small", "transformer-small"]
FULL_DTYPES = ["float32", "float16", "bfloat16"]
DEFAULT_DTYPES = ["float32"]
#: Every elementwise rule of ``mlx.optimizers``, written out (``rmsprop_impls.rules.RULE_NAMES``) so that the grid
#: stays the same for every commit asv runs; a commit without a rule skips it in ``setup``.
FULL_OPTIMIZERS = ["rmsprop", "sgd", "adagrad", "adadelta", "adam", "adamw", "adamax", "lion"]
DEFAULT_OPTIMIZERS = ["rmsprop", "adamw"]
#: In the default subset, the rules other than RMSprop run on its smaller trees only: asv starts a process per
#: combination, whose setup builds the tree, and the two 16M-parameter ones took most of the subset's time.
SMALL_DEFAULT_TREES = ["1x1K", "mlp-small", "transformer-small"]

#: MLX's CPU allocator caches only 32 MB by default, so big steps would mostly measure page faults. Metal's
#: caches most of RAM already: on a GPU device MLX's own default stays unless the variable sets a limit.
CPU_CACHE_LIMIT_MB = 8192
#: A benchmark process that allocates more than this fails instead of taking the machine down.
MEMORY_LIMIT_MB = int(os.environ.get("RMSPROP_BENCH_MEMORY_LIMIT_MB", "8192"))
MIB = 1024 * 1024


def grid_axis(variable: str, default: list[str], full: list[str]) -> list[str]:
    """The comma list in ``variable``, else ``full`` under ``RMSPROP_BENCH_GRID=full``, else ``default``."""
    value = os.environ.get(variable)
    if value:
        return value.split(",")
    return full if os.environ.get("RMSPROP_BENCH_GRID") == "full" else default


def variants() -> list[str]:
    """Every variant this commit registers, plus ``flat+packed``; unavailable ones skip in ``setup``.

    The default subset leaves out a GPU kernel whose GPU this machine lacks: asv starts a process for
    each combination, a skipped one too, and those were a quarter of the subset's processes on a CPU.
    """
    names = rmsprop_impls.variant_names() + [FLAT_PACKED]
    return grid_axis("RMSPROP_BENCH_VARIANTS", [n for n in names if not lacks_its_gpu(n)], names)


def lacks_its_gpu(variant: str) -> bool:
    """Whether ``variant`` runs on a GPU that is not here; only a GPU variant is asked (``cpu_kernel``'s check
    may build its extension)."""
    if variant_declared_device(variant) != "gpu":
        return False
    return rmsprop_impls.registry.unavailable_reason(variant) is not None


def trees() -> list[str]:
    return grid_axis("RMSPROP_BENCH_TREES", DEFAULT_TREES, FULL_TREES)


def dtypes() -> list[str]:
    return grid_axis("RMSPROP_BENCH_DTYPES", DEFAULT_DTYPES, FULL_DTYPES)


def optimizers() -> list[str]:
    return grid_axis("RMSPROP_BENCH_OPTIMIZERS", DEFAULT_OPTIMIZERS, FULL_OPTIMIZERS)


def check_in_subset(optimizer: str, tree: str) -> None:
    """``NotImplementedError`` for a rule other than RMSprop on a big tree of the default subset, before the tree
    is built; the full grid, or a tree axis named in ``RMSPROP_BENCH_TREES``, takes every pair."""
    default_trees = not os.environ.get("RMSPROP_BENCH_TREES") and os.environ.get("RMSPROP_BENCH_GRID") != "full"
    if default_trees and optimizer != "rmsprop" and tree not in SMALL_DEFAULT_TREES:
        raise NotImplementedError(f"{optimizer} on {tree} is outside the default subset (RMSPROP_BENCH_GRID=full)")


@contextlib.contextmanager
def safe_import():
    """Let the suite import when an optional package or an old commit lacks a name (scipy's idiom)."""
    try:
        yield
    except ImportError:
        pass


def cache_limit_mb() -> int | None:
    """``RMSPROP_BENCH_CACHE_LIMIT_MB``, else 8 GiB on the CPU; ``None`` keeps MLX's own default (a GPU's)."""
    value = os.environ.get("RMSPROP_BENCH_CACHE_LIMIT_MB")
    if value:
        return int(value)
    return CPU_CACHE_LIMIT_MB if mx.default_device() == mx.cpu else None


def cap_memory(limit_mb: int) -> str:
    """Cap what this process may allocate, never failing a benchmark over it; returns the cap in force.

    ``RLIMIT_AS`` on Linux with the CPU as MLX's default device: an allocation past it fails, so a
    runaway benchmark fails instead of taking the machine down. A GPU reserves far more address space
    than memory (MLX's CUDA allocator: ``cudaMallocAsync`` pools and managed memory), and macOS refuses
    ``RLIMIT_AS`` once Metal has mapped its address space (``ValueError: current limit exceeds maximum
    limit``) and would not enforce it: there, and wherever ``setrlimit`` is refused, MLX's
    ``mx.set_memory_limit`` is the cap. It refuses no allocation (MLX's Metal and CUDA allocators do not
    check it): above it ``mx.eval`` waits for running work before scheduling more and frees MLX's cache,
    so a process that needs more still gets it, up to the device's own limit.
    """
    why = f"{sys.platform} does not take RLIMIT_AS"
    if mx.default_device() != mx.cpu:
        why = "the default device is a GPU, whose address space is no measure of its memory"
    elif sys.platform.startswith("linux"):
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit_mb * MIB, resource.getrlimit(resource.RLIMIT_AS)[1]))
            return f"address space capped at {limit_mb} MiB (RLIMIT_AS)"
        except (ImportError, ValueError, OSError) as e:
            why = f"RLIMIT_AS refused: {e}"
    try:
        mx.set_memory_limit(limit_mb * MIB)
    except (AttributeError, ValueError, RuntimeError) as e:
        return f"no memory cap ({why}; mx.set_memory_limit failed: {e})"
    return f"MLX memory limit {limit_mb} MiB (mx.set_memory_limit, which waits rather than fails; {why})"


def apply_settings() -> str:
    """Set the MLX cache limit and the memory cap deliberately, in the benchmark process only; says what is in force."""
    limit = cache_limit_mb()
    if limit is not None:
        mx.set_cache_limit(limit * MIB)
    return cap_memory(MEMORY_LIMIT_MB)


@functools.lru_cache(maxsize=1)
def tree_and_gradients(tree: str, dtype: str) -> tuple:
    """Evaluated parameters and stand-in gradients; asv re-runs ``setup`` before each sample, this builds once."""
    from rmsprop_impls.measure.trees import random_like, tree_by_name

    try:
        params = tree_by_name(tree, dtype)
    except ValueError as e:
        raise NotImplementedError(f"this commit has no tree {tree!r}: {e}") from None
    grads = random_like(params)
    mx.eval(params, grads)
    return params, grads


def make_optimizer(variant: str, grads, optimizer: str = "rmsprop") -> tuple:
    """A fresh ``variant`` running rule ``optimizer`` and the gradients it takes; ``NotImplementedError`` where it
    cannot run, or where this commit has no such rule (a commit from before the rules runs RMSprop alone)."""
    name = "flat" if variant == FLAT_PACKED else variant
    if name not in rmsprop_impls.variant_names():
        raise NotImplementedError("not in this commit")
    if optimizer not in getattr(rmsprop_impls, "RULE_NAMES", ("rmsprop",)):
        raise NotImplementedError(f"this commit has no optimizer rule {optimizer!r}")
    reason = rmsprop_impls.registry.unavailable_reason(name)  # this one only: cpu_kernel's may build its extension
    if reason is not None:
        raise NotImplementedError(reason)
    if variant == FLAT_PACKED:
        packed_gradients = getattr(rmsprop_impls, "PackedGradients", None)
        if packed_gradients is None:
            raise NotImplementedError("this commit has no PackedGradients")
        grads = packed_gradients.pack(grads)
        mx.eval(grads.buffers)
    options = {} if optimizer == "rmsprop" else {"optimizer": optimizer}  # a commit before the rules takes none
    return rmsprop_impls.create(name, 1e-3, **options), grads


def measure_limit() -> dict[str, float | None]:
    """Each device's roof (``measure.roof.Roof``), measured once per ``asv run``: ``{"cpu": .., "gpu": ..}``.

    Used as ``setup_cache`` by every class that needs it: asv keys that cache on
    this function's module and line, so one measurement serves the whole run. The
    GPU's is ``None`` where MLX has no GPU; a commit from before the roof gives
    each device's one figure in GB/s, and one from before per-device limits the
    CPU's only.
    """
    from rmsprop_impls.measure import bandwidth

    measure = getattr(bandwidth, "measure_limits", None)
    return measure() if measure else {"cpu": bandwidth.measure_bandwidth(), "gpu": None}


measure_limit.timeout = 300


def bytes_moved(params, optimizer: str) -> int:
    """What one step of ``optimizer`` reads and writes over ``params`` (RMSprop 5 bytes per parameter byte)."""
    from rmsprop_impls.measure.trees import step_bytes

    return step_bytes(params) if optimizer == "rmsprop" else step_bytes(params, optimizer)  # see make_optimizer


def limit_at(limits: dict, device: str, step_bytes: int, optimizer: str = "rmsprop") -> float | None:
    """``device``'s limit for a step of ``optimizer`` moving ``step_bytes``: its roof at the step's working set,
    or, from a commit before the roof, its one figure; ``None`` where the device has none."""
    limit = limits[device]
    if not hasattr(limit, "at"):
        return limit
    from rmsprop_impls.measure.roof import working_set

    if optimizer == "rmsprop":  # see make_optimizer
        return limit.at(working_set(step_bytes))
    return limit.at(working_set(step_bytes, optimizer))


#: Rounds in which ``Step.track_fraction_of_limit`` times a step beside the CPU roof's kernels: at least, at most,
#: and the seconds after which no more start (compare's interleaving, on asv's one process per benchmark).
SAME_ROUNDS = (5, 200, 0.5)


def fraction_in_same_rounds(
    limits: dict, device: str, step: Callable[[], None], step_bytes: int, optimizer: str = "rmsprop"
) -> float | None:
    """``step``'s GB/s (its median call) over the CPU roof at its working set, with the roof's kernels timed
    round-robin with it (``rmsprop_impls.measure.roof.time_beside_roof``, as ``compare`` does); ``None`` off the
    CPU, where no roof kernel builds, or where this commit cannot time them so (before stop 33).

    The roof measured once per run is the best of a sweep's samples, kept per boot: on a VM whose memory speed
    drifts by a quarter within seconds, one fast moment took it to 92 GB/s where the step's own moments gave 45-56,
    so ``run`` read a 16x1M step at 38% of it where ``compare`` read 90%."""
    try:
        from rmsprop_impls.measure.roof import time_beside_roof, working_set
    except ImportError:
        return None
    if device != "cpu" or not getattr(limits.get("cpu"), "best_kernels", None):  # a number, or a roof of no kernels
        return None
    timing, roof_gbps = time_beside_roof(step, limits["cpu"], working_set(step_bytes, optimizer), *SAME_ROUNDS)
    return step_bytes / timing.median / 1e9 / roof_gbps if roof_gbps else None


def roof_sweep(limits: dict, device: str, of_llc: str) -> tuple:
    """``device``'s roof and the working set of the sweep's point ``of_llc``; ``NotImplementedError`` without one."""
    roof = limits[device]
    if not hasattr(roof, "working_sets"):
        raise NotImplementedError("n/a (no GPU)" if roof is None else "this commit measures one limit, not a roof")
    from rmsprop_impls.measure.roof import sweep_size

    return roof, sweep_size(of_llc, roof.last_level_cache)


def variant_declared_device(variant: str) -> str | None:
    """The device ``variant``'s class declares (``"cpu"``, ``"gpu"``, ``"default"``); ``None`` where a commit's
    variants declare none, or the name is unknown or its module does not import."""
    try:
        return getattr(rmsprop_impls.variant_class("flat" if variant == FLAT_PACKED else variant), "device", None)
    except (AttributeError, ValueError, RuntimeError):
        return None


def variant_device(variant: str) -> str:
    """``"cpu"`` or ``"gpu"``: where ``variant`` runs in this process; a commit whose variants declare no device
    ran them all on MLX's default device."""
    declared = variant_declared_device(variant)
    if declared in ("cpu", "gpu"):
        return declared
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
