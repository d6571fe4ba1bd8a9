"""Explain why a variant is as fast as it is on one tree, and name the fix for the known slow patterns.

Per variant: the time of the update call (building the lazy graph: Python and
op dispatch; ``cpu_kernel`` also updates its small leaves right there) against
the time to evaluate it, the first step (init, compile, kernel build), MLX's
peak and active memory, how far a step raises memory, the minor page faults
per step and the effective GB/s against the bandwidth limit of the device it
runs on.

* New allocations are measured with MLX's memory statistics, as the step's
  peak growth: its peak memory (after ``mx.reset_peak_memory``) minus the
  active memory before it. That is the most the step holds at once on top of
  what was live, so a variant that frees old leaves while it makes new ones
  shows less than it allocates in all. MLX does not count allocations.
* Page faults are ``resource.getrusage(RUSAGE_SELF).ru_minflt`` growth over
  the timed steps, for the whole process (MLX's worker threads included).
* Retraces are counted where a variant counts its traces (``compiled`` has
  ``traces``): a trace after the warm-up means the step is being recompiled.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from ..registry import create, partition_available, variant_device
from ..rules import DEFAULT_RULE, Rule, rule
from .bandwidth import limit_at, measure_limits
from .mlx_settings import current_cache_limit, on_cpu_allocator
from .roof import working_set
from .trees import leaves_of, step_bytes

#: A step whose page faults cover this fraction of its peak growth is fed by the OS, not by MLX's cache.
FAULTING_FRACTION = 0.25
#: From this many leaves on, a tree is "many-leaf" for the launch-overhead finding.
MANY_LEAVES = 64
#: Per-leaf overhead dominates when the time beyond the bandwidth bound is more than this fraction of the step.
OVERHEAD_FRACTION = 0.5
MULTI_TENSOR = ["flat", "cpu_kernel"]
MB = 1024 * 1024


@dataclass
class VariantProfile:
    """Seconds are medians per step over the timed steps; bytes are MLX memory statistics."""

    variant: str
    device: str  # "cpu" or "gpu": where its steps ran, whose limit of_limit divides by
    first_step_s: float
    build_s: float
    eval_s: float
    step_s: float
    gbps: float
    of_limit: float
    peak_bytes: int
    active_bytes: int
    peak_growth_bytes: float  # peak memory during a step minus the active memory before it
    faults_per_step: float
    traces_per_step: float | None  # None where the variant does not count its traces
    findings: list[str] = field(default_factory=list)
    optimizer: str = DEFAULT_RULE  # the rule it ran
    step_bytes: int = 0  # what one step of that rule reads and writes over the tree


def moved_bytes(optimizer: Any, params: Any) -> int:
    """What one step of ``optimizer`` moves over ``params``, by its rule and hyper-parameters (a stock class's:
    the rule of its name, its attributes)."""
    the_rule = getattr(optimizer, "rule", None) or rule(type(optimizer).__name__)
    hyper = {k: getattr(optimizer, k, default) for k, default in the_rule.defaults.items()}
    return step_bytes(params, the_rule, hyper)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_optimizer(
    optimizer: Any, params: Any, grads: Any, bandwidth_gbps: float, steps: int = 10, warmup: int = 2
) -> VariantProfile:
    """Profile ``steps`` evaluated steps of ``optimizer`` after its first step and ``warmup`` more.

    ``bandwidth_gbps`` is the limit of the device ``optimizer`` runs on."""
    mx.eval(params, grads)
    mx.reset_peak_memory()
    start = time.perf_counter()
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    first = time.perf_counter() - start
    peak = mx.get_peak_memory()
    for _ in range(warmup):
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    traces_before = getattr(optimizer, "traces", None)
    builds, evals, news = [], [], []
    faults_before = _minor_faults()
    for _ in range(steps):
        active_before = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        params = optimizer.apply_gradients(grads, params)
        built = time.perf_counter()
        mx.eval(params, optimizer.state)
        builds.append(built - start)
        evals.append(time.perf_counter() - built)
        news.append(mx.get_peak_memory() - active_before)
        peak = max(peak, mx.get_peak_memory())
    faults = (_minor_faults() - faults_before) / steps
    step_s = statistics.median(b + e for b, e in zip(builds, evals))
    nbytes = moved_bytes(optimizer, params)
    gbps = nbytes / step_s / 1e9
    traces = getattr(optimizer, "traces", None)
    result = VariantProfile(
        variant=getattr(optimizer, "name", type(optimizer).__name__),
        device=optimizer.concrete_device() if hasattr(optimizer, "concrete_device") else "cpu",
        first_step_s=first,
        build_s=statistics.median(builds),
        eval_s=statistics.median(evals),
        step_s=step_s,
        gbps=gbps,
        of_limit=gbps / bandwidth_gbps,
        peak_bytes=peak,
        active_bytes=mx.get_active_memory(),
        peak_growth_bytes=statistics.median(news),
        faults_per_step=faults,
        traces_per_step=None if traces is None else (traces - traces_before) / steps,
        optimizer=getattr(getattr(optimizer, "rule", None), "name", type(optimizer).__name__.lower()),
        step_bytes=nbytes,
    )
    result.findings = findings(result, params, bandwidth_gbps, [v for v in MULTI_TENSOR if v != result.variant])
    return result


def findings(p: VariantProfile, params: Any, bandwidth_gbps: float, alternatives: list[str]) -> list[str]:
    """Plain sentences, each naming a known slow pattern in ``p`` and its fix.

    ``alternatives`` are the multi-tensor variants to suggest against per-leaf overhead.
    """
    out = []
    cache_limit = current_cache_limit()
    fault_bytes = p.faults_per_step * resource.getpagesize()
    # The cache must hold what the last step freed to serve the next: its buffers and temporaries, with room.
    needed = 2 * max(p.peak_growth_bytes, p.step_bytes)
    if cache_limit < needed and fault_bytes >= FAULTING_FRACTION * p.peak_growth_bytes > 0:
        suggest = -(-int(needed) // MB)
        if on_cpu_allocator():
            allocator, source, or_default = "MLX's CPU allocator", "they come from the OS each time", ""
        else:  # Metal's (or CUDA's) allocator: its own default cache is large, so a small one was set on purpose
            allocator = f"MLX's {mx.default_device()} allocator"
            source = "new GPU buffers are allocated (and their pages faulted in) each time"
            or_default = ", or leave out --cache-limit-mb to keep MLX's own default for the GPU"
        out.append(
            f"{p.variant}: every step page-faults ({p.faults_per_step:,.0f} minor faults, "
            f"{fault_bytes / MB:.0f} MB, per step) because {allocator} cache limit ({cache_limit / MB:.0f} MB) "
            f"cannot hold a step's buffers (it raises memory by {p.peak_growth_bytes / MB:.0f} MB and moves "
            f"{p.step_bytes / MB:.0f} MB), so {source}; raise it: "
            f"--cache-limit-mb {suggest} or mx.set_cache_limit({suggest} * 1024**2){or_default}."
        )
    if p.traces_per_step:
        out.append(
            f"{p.variant}: mx.compile retraces on {100 * min(p.traces_per_step, 1):.0f}% of the steps, paying the "
            f"first-step cost ({p.first_step_s * 1e3:.1f} ms) again; keep the compiled function's input shapes, "
            "dtypes and Python constants fixed (pass changing scalars such as the learning rate as mx.array inputs)."
        )
    n_leaves = len(leaves_of(params))
    bound_s = p.step_bytes / (bandwidth_gbps * 1e9)
    overhead_s = p.step_s - bound_s
    if n_leaves >= MANY_LEAVES and overhead_s > OVERHEAD_FRACTION * p.step_s:
        fix = (
            f"a multi-tensor variant runs one update for the whole tree: try {' or '.join(alternatives)}"
            if alternatives
            else "no multi-tensor variant was faster here, so fewer, larger leaves are the remaining fix"
        )
        out.append(
            f"{p.variant}: per-leaf overhead dominates: {overhead_s / n_leaves * 1e6:.1f} µs per leaf over "
            f"{n_leaves:,} leaves is {100 * overhead_s / p.step_s:.0f}% of the step, which the bandwidth limit "
            f"allows in {bound_s * 1e3:.3f} ms; {fix}."
        )
    return out


def capture_steps(optimizer: Any, params: Any, grads: Any, steps: int, start_capture, stop_capture) -> None:
    """Run ``steps`` evaluated steps of ``optimizer`` between ``start_capture()`` and ``stop_capture()``, after
    its first step and one more outside: a GPU trace (``mx.metal.start_capture``) of the steps alone."""
    mx.eval(params, grads)
    for _ in range(2):
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    start_capture()
    try:
        for _ in range(steps):
            params = optimizer.apply_gradients(grads, params)
            mx.eval(params, optimizer.state)
    finally:
        stop_capture()


def profile_variants(
    params: Any,
    grads: Any,
    variants: list[str] | None = None,
    steps: int = 10,
    limits: dict[str, float | None] | None = None,
    learning_rate: float = 1e-3,
    progress: bool = False,
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
) -> tuple[list[VariantProfile], dict[str, str], dict[str, float | None]]:
    """Profile each variant that runs here, running ``optimizer`` with ``hyper``; returns the profiles, why the
    others cannot run, and each device's bandwidth limit (measured here once unless given), which each
    variant's GB/s is a fraction of."""
    the_rule = rule(optimizer)
    hyper = the_rule.hyperparameters(**(hyper or {}))
    runnable, unavailable = partition_available(variants)
    if limits is None:
        limits = measure_limits()

    touched = working_set(step_bytes(params, the_rule, hyper))

    def limit_of(name: str) -> float:  # the roof at this tree's working set
        return limit_at(limits, variant_device(name), touched) or float("nan")

    def made(name: str):
        return create(name, learning_rate, optimizer=the_rule, **hyper)

    profiles = [
        profile_optimizer(made(name), params, grads, limit_of(name), steps)
        for name in tqdm(runnable, desc="profiling", unit="variant", disable=not progress, leave=False)
    ]
    for p in profiles:  # now that every variant ran, suggest only the multi-tensor ones that were faster here
        faster = [q.variant for q in profiles if q.variant in MULTI_TENSOR and q.step_s < p.step_s]
        p.findings = findings(p, params, limit_of(p.variant), faster)
    return profiles, unavailable, limits


def plot_profiles(profiles: list[VariantProfile], title: str, path: str) -> None:
    """A bar chart of graph-build and evaluation time per step, stacked, with GB/s on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{p.variant} ({p.device})" for p in profiles]
    build = [p.build_s * 1e3 for p in profiles]
    evaluate = [p.eval_s * 1e3 for p in profiles]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 3, 4))
    ax.bar(names, build, label="update call (graph build)")
    ax.bar(names, evaluate, bottom=build, label="evaluate (mx.eval)")
    for i, p in enumerate(profiles):
        ax.annotate(f"{p.gbps:.2f} GB/s", (i, build[i] + evaluate[i]), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("variant")
    ax.set_ylabel("time per step (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
