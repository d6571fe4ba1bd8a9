"""The bandwidth roof: the fastest a device moves memory, as a function of the working set's size.

A step whose arrays fit in the caches runs back to back on cache-resident
buffers, so one limit measured far beyond the caches is no roof for it (a step
reached 147% of such a limit). As the cache-aware roofline and the Empirical
Roofline Toolkit do, the roof is measured per working-set size, as the best of
several kernels, and a step is judged against the roof at its own working set
(:meth:`Roof.at`, interpolated in log size between the sweep's points).

**The sweep** (:data:`SWEEP`): working sets from 1/64 of the last-level cache
(about an L2) to 16 times it, where each of the step pattern's three arrays is
more than 4 times the cache (STREAM's rule), capped at :data:`MAX_WORKING_SET`.
The buffers are allocated once at the largest size; smaller points use their
first elements.

**The kernels** (float32, every kernel's bytes counted as it names them; the best
at each size is the roof):

* ``numpy triad``: ``a += b`` in place (2 reads, 1 write per element);
* ``numpy step pattern``: the step's own streams, ``w += g`` then ``v += g`` over
  L1-sized blocks, so that memory sees w, g and v read and w and v written once;
* ``numpy copy``: ``np.copyto``, a memcpy, which glibc does with non-temporal
  stores above its threshold (no read for ownership);
* ``c step pattern`` (with and without non-temporal stores) and ``c two-state
  step pattern`` (Adam's w, m and v in place, g read): :mod:`.stream_kernels`;
* ``mlx triad`` and ``mlx step pattern``: the same as MLX ops on the device, the
  second fused by ``mx.compile`` into one kernel with two outputs, in place (the
  inputs are donated);
* ``torch axpy``: ``a.add_(b, alpha=...)`` on torch's own threads, only where
  torch is installed (the ``[peers]`` extra).

The numpy kernels run on every core this process may use
(:func:`~rmsprop_impls.cpu_threads.default_threads`), each thread taking the next
chunk when it is done, so that fast cores do more of the work. Each point's rate
is the best of :data:`SAMPLES` samples of about :data:`SAMPLE_S` each: a
loaded machine only ever makes a kernel slower.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.util
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import mlx.core as mx
import numpy as np

from ..cpu_threads import default_threads, short_openmp_spin
from ..rules import Rule, rule
from . import stream_kernels
from .caches import FALLBACK_LAST_LEVEL, MIB, CacheSizes, cache_sizes
from .timing import StepTiming, time_round_robin

#: The sweep's working sets, as multiples of the last-level cache (asv's parameter of ``bench_bandwidth.Roof``).
SWEEP = ("1/64", "1/16", "1/4", "1/2", "1", "2", "4", "16")
#: No working set beyond this (bytes), whatever the caches: the largest point is allocated in full.
#: ``$RMSPROP_BENCH_ROOF_MAX_MIB`` lowers it (for a machine short of memory, or a quick run on tiny trees).
MAX_WORKING_SET = 1 << 30
#: Timed samples per kernel and size, and the seconds each aims at.
SAMPLES = 3
SAMPLE_S = 0.03
#: Elements per block of the numpy step pattern: w, g and v blocks of 64 KiB, so g's stays cached between its reads.
BLOCK = 16 * 1024
#: Chunks per thread of the numpy triad and copy, so that faster cores can take more of them.
CHUNKS_PER_THREAD = 8
#: MLX passes queued per ``mx.eval``: one pass can take less than an evaluation costs.
MLX_PASSES_PER_EVAL = 32
#: Bytes per float32 element, the kernels' dtype.
ITEMSIZE = 4
#: Bytes a roof probe moves per call at least: a pass over a cache-resident working set takes less than a call costs.
PROBE_MIN_BYTES = 64 * MIB


def working_set(step_bytes: float, optimizer: str | Rule = "rmsprop") -> float:
    """The bytes a step of ``optimizer`` (its default hyper-parameters) touches, each array it reads or writes once,
    from the bytes it moves, each read and each write: RMSprop's w, g and v of 5 streams, Adam's w, g, m and v of 7.
    """
    return step_bytes * _touched_fraction(rule(optimizer))


@functools.cache
def _touched_fraction(r: Rule) -> float:
    """The arrays a step touches over the streams it moves (RMSprop 3/5), from the rule's trace."""
    hyper = r.defaults
    t = r.trace(hyper)
    touched = (t.used_inputs() & {"w", "g", *r.states}) | {"w"} | set(t.state_out)
    return len(touched) / r.bytes_per_element(hyper, itemsize=1)


@dataclass(frozen=True)
class Roof:
    """One device's roof: the best kernel's GB/s at each working-set size of the sweep."""

    device: str
    working_sets: tuple[int, ...]  # bytes, ascending
    gbps: tuple[float, ...]
    best_kernels: tuple[str, ...] = ()  # which kernel was fastest at each size (unknown in asv's results)
    last_level_cache: int | None = None  # bytes, summed over its instances; None where unknown
    by_kernel: dict[str, tuple[float | None, ...]] = field(default_factory=dict, compare=False)

    def at(self, working_set_bytes: float) -> float:
        """The roof at ``working_set_bytes``: linear in log size between the sweep's points, flat beyond its ends."""
        x = math.log2(max(float(working_set_bytes), 1.0))
        return float(np.interp(x, np.log2(self.working_sets), self.gbps))

    def cache_resident(self, working_set_bytes: float) -> bool:
        """Whether a working set of this size fits in the last-level cache (``False`` where its size is unknown)."""
        return bool(self.last_level_cache) and working_set_bytes <= self.last_level_cache

    @property
    def beyond_caches(self) -> float:
        """The roof at the sweep's largest working set: memory's, the figure a single STREAM-style limit gives."""
        return self.gbps[-1]

    @classmethod
    def flat(cls, device: str, gbps: float, last_level_cache: int | None = None) -> Roof:
        """A roof measured at one size only (results from before the sweep): the same at every working set."""
        return cls(device, (1,), (float(gbps),), ("in-place triad",), last_level_cache)


@dataclass(frozen=True)
class Kernel:
    """A bandwidth kernel: ``make(elements)`` returns ``run(passes)``, or raises where it cannot run here."""

    name: str
    arrays: int  # float32 arrays it touches: its working set is arrays * 4 bytes per element
    moves: int  # elements read plus written per element and pass
    make: Callable[[int], Callable[[int], None]]

    def elements_at(self, working_set_bytes: int) -> int:
        """Elements per array for a working set of this many bytes, in whole blocks of the numpy step pattern."""
        return max(BLOCK, working_set_bytes // (ITEMSIZE * self.arrays) // BLOCK * BLOCK)


def sweep_size(of_llc: str, last_level_cache: int | None) -> int:
    """The working set in bytes of the sweep's point ``of_llc`` (``"1/4"``: a quarter of the last-level cache)."""
    largest = int(os.environ.get("RMSPROP_BENCH_ROOF_MAX_MIB", 0)) * MIB or MAX_WORKING_SET
    return min(largest, int(Fraction(of_llc) * (last_level_cache or FALLBACK_LAST_LEVEL)))


def sweep_sizes(caches: CacheSizes) -> list[int]:
    """The sweep's working sets in bytes for these caches, ascending and distinct."""
    return sorted({sweep_size(f, caches.last_level) for f in SWEEP})


def best_rate(run: Callable[[int], None], bytes_per_pass: int) -> float:
    """The best GB/s of :data:`SAMPLES` timed samples of ``run``, after a warm-up and a calibration of the passes."""
    run(1)  # faults pages in, compiles, builds
    passes, spent = 1, 0.0
    while True:
        start = time.perf_counter()
        run(passes)
        spent = time.perf_counter() - start
        if spent >= SAMPLE_S / 8:
            break
        passes *= 8
    passes = max(1, math.ceil(passes * SAMPLE_S / spent))
    best = 0.0
    for _ in range(SAMPLES):
        start = time.perf_counter()
        run(passes)
        best = max(best, bytes_per_pass * passes / (time.perf_counter() - start) / 1e9)
    return best


def measure_roof(device: str, kernels: list[Kernel], caches: CacheSizes, sizes: list[int] | None = None) -> Roof | None:
    """Sweep ``kernels`` over ``sizes`` (default :func:`sweep_sizes`); ``None`` where none of them runs."""
    sizes = sizes or sweep_sizes(caches)
    by_kernel: dict[str, list[float | None]] = {}
    for kernel in kernels:
        rates: list[float | None] = []
        for size in sizes:
            elements = kernel.elements_at(size)
            try:
                rates.append(best_rate(kernel.make(elements), kernel.moves * ITEMSIZE * elements))
            except (RuntimeError, ValueError, MemoryError):  # no compiler for mx.compile, no memory: not a roof here
                rates.append(None)
        by_kernel[kernel.name] = rates
        mx.clear_cache()
    best = [max(((r[i], k) for k, r in by_kernel.items() if r[i] is not None), default=None) for i in range(len(sizes))]
    if any(b is None for b in best):
        return None
    return Roof(
        device,
        tuple(sizes),
        tuple(b[0] for b in best),
        tuple(b[1] for b in best),
        caches.last_level,
        {k: tuple(r) for k, r in by_kernel.items()},
    )


# -- the kernels --------------------------------------------------------------------------------------------------


def _threaded(pool: ThreadPoolExecutor, threads: int, body: Callable, tasks: list[tuple]) -> Callable[[int], None]:
    """``run(passes)``: ``threads`` workers apply ``body`` to ``tasks`` ``passes`` times, each taking the next task."""

    def run(passes: int) -> None:
        counter, total = itertools.count(), passes * len(tasks)

        def worker() -> None:
            while (i := next(counter)) < total:  # next() on one count is atomic under the GIL
                body(*tasks[i % len(tasks)])

        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()

    return run


def _chunks(n: int, threads: int, *arrays: np.ndarray, size: int | None = None) -> list[tuple]:
    """The first ``n`` elements of ``arrays`` cut into aligned chunks: ``size`` each, or enough for ``threads``."""
    size = size or max(BLOCK, n // max(1, threads * CHUNKS_PER_THREAD) // BLOCK * BLOCK)
    return [tuple(a[lo : min(lo + size, n)] for a in arrays) for lo in range(0, n, size)]


def _add_in_place(a: np.ndarray, b: np.ndarray) -> None:
    np.add(a, b, out=a)


def _step_pattern(w: np.ndarray, g: np.ndarray, v: np.ndarray) -> None:
    np.add(w, g, out=w)
    np.add(v, g, out=v)


def numpy_kernels(buffers: list[np.ndarray], pool: ThreadPoolExecutor, threads: int) -> list[Kernel]:
    """The numpy kernels over three float32 ``buffers`` as large as the largest point needs."""
    w, g, v = buffers
    return [
        Kernel("numpy triad", 2, 3, lambda n: _threaded(pool, threads, _add_in_place, _chunks(n, threads, w, g))),
        Kernel(
            "numpy step pattern",
            3,
            5,
            lambda n: _threaded(pool, threads, _step_pattern, _chunks(n, threads, w, g, v, size=BLOCK)),
        ),
        Kernel("numpy copy", 2, 2, lambda n: _threaded(pool, threads, np.copyto, _chunks(n, threads, v, w))),
    ]


def c_kernels(buffers: list[np.ndarray], pool: ThreadPoolExecutor, threads: int) -> list[Kernel]:
    """The step patterns in C (:mod:`.stream_kernels`) over ``buffers`` (w, g and v, as large as the two-array
    kernels' largest point): RMSprop's, with non-temporal stores too where the target has them, and the two-state
    rules', with a fourth array of its own; none where they cannot be built."""
    lib, _ = stream_kernels.load()
    if lib is None:
        return []
    w, g, v = buffers
    # Four arrays in the working set that two fill: the fourth is made when the two-state kernel first runs, so a
    # probe of another kernel does not allocate and fill it.
    fourth = functools.cache(lambda: np.ones(w.size // 2, np.float32))

    def make(function: Callable, *arrays: np.ndarray) -> Callable[[int], Callable[[int], None]]:
        def threaded(n: int) -> Callable[[int], None]:
            chunks = _chunks(n, threads, *arrays)
            return _threaded(pool, threads, function, [(*(a.ctypes.data for a in c), c[0].size) for c in chunks])

        return threaded

    kernels = [Kernel("c step pattern", 3, 5, make(lib.step_pattern, w, g, v))]
    if lib.streaming_stores():
        kernels.append(Kernel("c step pattern, non-temporal stores", 3, 5, make(lib.step_pattern_streaming, w, g, v)))

    def two_state(n: int) -> Callable[[int], None]:
        return make(lib.two_state_pattern, w, g, fourth(), v)(n)

    kernels.append(Kernel("c two-state step pattern", 4, 7, two_state))
    return kernels


def _mlx_chain(step: Callable, arrays: list[mx.array], stream: mx.Device) -> Callable[[int], None]:
    """``run(passes)``: ``arrays = step(*arrays)`` each pass, lazily, evaluated every :data:`MLX_PASSES_PER_EVAL`."""
    mx.eval(arrays)

    def run(passes: int) -> None:
        nonlocal arrays
        for i in range(passes):
            arrays = step(*arrays)
            if (i + 1) % MLX_PASSES_PER_EVAL == 0:
                mx.eval(arrays)
        mx.eval(arrays)
        mx.synchronize(stream)

    return run


def mlx_kernels(device: mx.Device) -> list[Kernel]:
    """The MLX triad and the step pattern fused by ``mx.compile``, in place, on ``device``."""
    fused = mx.compile(lambda w, v, g: (w + g, v + g))

    def triad(n: int) -> Callable[[int], None]:
        g = mx.full((n,), 1e-3, stream=device)
        return _mlx_chain(lambda a, b: (mx.add(a, b, stream=device), b), [mx.ones((n,), stream=device), g], device)

    def step(n: int) -> Callable[[int], None]:
        with mx.stream(device):
            arrays = [mx.ones((n,)), mx.ones((n,)), mx.full((n,), 1e-3)]
            return _mlx_chain(lambda w, v, g: (*fused(w, v, g), g), arrays, device)

    return [Kernel("mlx triad", 2, 3, triad), Kernel("mlx step pattern", 3, 5, step)]


def torch_kernels(buffers: list[np.ndarray], threads: int) -> list[Kernel]:
    """torch's in-place axpy on its own threads over the same buffers; none where torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    short_openmp_spin()  # else its threads spin on into the time of the step timed after it (cpu_threads)
    import torch

    def axpy(n: int) -> Callable[[int], None]:
        torch.set_num_threads(threads)
        a, b = torch.from_numpy(buffers[0][:n]), torch.from_numpy(buffers[1][:n])

        def run(passes: int) -> None:
            for _ in range(passes):
                a.add_(b, alpha=0.5)

        return run

    return [Kernel("torch axpy", 2, 3, axpy)]


def measure_cpu_roof(caches: CacheSizes | None = None, threads: int | None = None) -> Roof:
    """The CPU's roof on every core this process may use, over the sweep for ``caches`` (default: this machine's)."""
    caches = caches or cache_sizes()
    threads = threads or default_threads()
    sizes = sweep_sizes(caches)
    with ThreadPoolExecutor(threads) as pool:
        roof = measure_roof("cpu", cpu_kernels(_buffers(sizes[-1]), pool, threads), caches, sizes)
    assert roof is not None, "the numpy kernels run everywhere"
    return roof


def _buffers(largest_working_set: int) -> list[np.ndarray]:
    """w, g and v, as large as the two-array kernels' point at ``largest_working_set`` bytes."""
    elements = max(BLOCK, largest_working_set // ITEMSIZE // 2)
    return [np.ones(elements, np.float32), np.full(elements, 1e-3, np.float32), np.ones(elements, np.float32)]


def cpu_kernels(buffers: list[np.ndarray], pool: ThreadPoolExecutor, threads: int) -> list[Kernel]:
    """Every CPU kernel of the roof over ``buffers`` (w, g and v, as large as the two-array kernels' largest point)."""
    kernels = numpy_kernels(buffers, pool, threads) + c_kernels(buffers, pool, threads)
    return kernels + torch_kernels(buffers, threads) + mlx_kernels(mx.cpu)


@dataclass(frozen=True)
class Probe:
    """A roof kernel at one working set, to be timed beside the steps: each ``run()`` moves ``nbytes``."""

    kernel: str
    run: Callable[[], None]
    nbytes: int

    def gbps(self, timing: StepTiming) -> float:
        """Its GB/s in timed rounds, from its median call, as a step's is: the same statistic of the same moments.
        Its fastest call was the roof at first, and caught the rare fast call: at 268 MiB a C kernel's calls
        ran at 51 GB/s (median) and 57 (95th percentile), its fastest at 93 to 104, while the step beside it ran
        at 49, so a step at the roof read 47-53% of it, and 52-95% from one rule to the next. From its first call
        where it has no other."""
        return self.nbytes / (timing.median if timing.samples else timing.first_s) / 1e9


def kernels_around(roof: Roof, working_set_bytes: float) -> list[str]:
    """The kernels the roof found fastest at the sweep's points on either side of this working set (those
    :meth:`Roof.at` interpolates between), in the sweep's order; none where it does not name them."""
    if len(roof.best_kernels) != len(roof.working_sets):
        return []
    i = bisect.bisect_left(roof.working_sets, working_set_bytes)
    on_a_point = i < len(roof.working_sets) and roof.working_sets[i] == working_set_bytes
    around = {min(i, len(roof.working_sets) - 1), i if on_a_point else max(i - 1, 0)}
    return list(dict.fromkeys(roof.best_kernels[j] for j in sorted(around)))


#: The roof's kernels of a step's own access pattern, probed at every working set beside those the sweep found
#: fastest there: at transformer-base's 2 GB, AdamW's step ran at 57.5 GB/s where the sweep's best kernel at its
#: largest point (RMSprop's pattern with non-temporal stores) ran at 54, and Adam's pattern at 60.
STEP_PATTERN_KERNELS = ("c step pattern", "c two-state step pattern")


@contextlib.contextmanager
def cpu_roof_probes(roof: Roof, working_set_bytes: float, threads: int | None = None) -> Iterator[list[Probe]]:
    """The roof's best kernels around a step's working set (:func:`kernels_around`) and the step patterns
    (:data:`STEP_PATTERN_KERNELS`, where they build), each a :class:`Probe` at that
    working set (within the sweep's range, as :meth:`Roof.at` is flat beyond it), to be timed round-robin with
    the steps, so that a step and its roof are measured in the same moments; each call moves at least
    :data:`PROBE_MIN_BYTES`. None where the roof names no kernel this process can build (a roof given by hand).
    The buffers and the threads live until the block ends."""
    names = kernels_around(roof, working_set_bytes)
    size = int(min(max(working_set_bytes, roof.working_sets[0]), roof.working_sets[-1]))
    threads = threads or default_threads()
    with ThreadPoolExecutor(threads) as pool:
        kernels = cpu_kernels(_buffers(size), pool, threads)
        named = [k for k in kernels if k.name in names]
        probes: list[Probe] = []
        for kernel in named + [k for k in kernels if named and k.name in STEP_PATTERN_KERNELS and k not in named]:
            n = kernel.elements_at(size)
            per_pass = kernel.moves * ITEMSIZE * n
            passes = max(1, math.ceil(PROBE_MIN_BYTES / per_pass))
            try:
                run = kernel.make(n)
            except (RuntimeError, ValueError, MemoryError):
                continue
            probes.append(Probe(kernel.name, functools.partial(run, passes), per_pass * passes))
        yield probes


def time_beside_roof(
    step: Callable[[], object],
    roof: Roof | None,
    working_set_bytes: float,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 0.5,
) -> tuple[StepTiming, float | None]:
    """``step`` timed round-robin with the CPU roof's probes at its working set (:func:`cpu_roof_probes`), as
    ``compare`` times a tree: its timing, and the best probe's GB/s in the same rounds (:meth:`Probe.gbps`);
    ``None`` for the second where no probe builds (no roof, or one given by hand), the step then timed alone.
    For a step judged on its own (the self-test's, an asv benchmark's), which nothing else is timed beside."""
    with contextlib.ExitStack() as stack:
        probes = stack.enter_context(cpu_roof_probes(roof, working_set_bytes)) if roof else []
        calls = {"step": step, **{f"roof: {p.kernel}": p.run for p in probes}}
        timings = time_round_robin(calls, budget_s, min_rounds, max_rounds)
    rates = [p.gbps(timings[f"roof: {p.kernel}"]) for p in probes]
    return timings["step"], max(rates, default=None)


def gpu_available() -> bool:
    """Whether this MLX has a GPU back-end with a device: Metal, or CUDA."""
    cuda = getattr(mx, "cuda", None)
    return bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def measure_gpu_roof(caches: CacheSizes | None = None) -> Roof | None:
    """The GPU's roof from the MLX kernels on ``mx.gpu``, over the CPU's sweep; ``None`` without a GPU.

    MLX reports no GPU cache sizes: on Apple silicon CPU and GPU share the system-level cache and the
    memory behind it, and a discrete GPU's L2 shows as a step of its roof within the sweep.
    """
    if not gpu_available():
        return None
    return measure_roof("gpu", mlx_kernels(mx.gpu), caches or cache_sizes())
