"""Time every variant running one rule on one tree, with the peers and the roof, interleaved in one process.

This machine's memory speed drifts by a quarter from one second to the next, so figures timed one after the
other compare moments as much as variants. Every candidate (a variant, a peer, the roof's kernels at the tree's
working set) is therefore built first and then timed round-robin (:func:`time_round_robin`), one call each
per round: each ratio, and each fraction of the roof, is between figures of the same moments.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from ..registry import availability, create, variant_device
from ..rules import DEFAULT_RULE, Rule, rule
from .roof import Probe
from .timing import StepTiming, stepping, time_round_robin
from .trees import step_bytes

#: The share of physical memory the candidates timed together may keep: more of them are timed in groups.
MEMORY_SHARE = 0.5


@dataclass
class VariantResult:
    variant: str
    timing: StepTiming | None  # None where the variant cannot run here
    reason: str | None = None  # why it cannot
    gbps: float | None = None
    device: str | None = None  # "cpu" or "gpu": where it runs, whose limit its GB/s is a fraction of
    differs: str | None = None  # a peer's: how its math differs from stock's, where it does
    group: int = 0  # which of the round-robin groups it was timed in (one group where all fit in memory)


@dataclass
class Candidate:
    """Something to time: ``build()`` sets it up (its state, its copy of the tree) and returns the call that runs
    one step and returns once it is done; ``reason`` instead says why it cannot run here."""

    name: str
    device: str
    build: Callable[[], Callable[[], None]] | None
    reason: str | None = None
    differs: str | None = None


def variant_candidates(
    params: Any,
    grads: Any,
    variants: Sequence[str] | None = None,
    learning_rate: float = 1e-3,
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
    call: str = "apply_gradients",
) -> list[Candidate]:
    """Each variant (default: all) running ``optimizer`` with stock's hyper-parameters ``hyper``; each step feeds
    its parameters back in and drops the old ones before ``mx.eval``, so MLX may donate their buffers. With
    ``call="update"`` each steps a model of its own instead, ``opt.update(model, grads)`` and
    ``mx.eval(model.parameters(), opt.state)``, as mlx-examples' loops do (``timing.CALLS``)."""
    r = rule(optimizer)
    h = r.hyperparameters(**(hyper or {}))
    reasons = availability()

    def build(name: str) -> Callable[[], None]:
        return stepping(create(name, learning_rate, optimizer=r, **h), params, grads, call)

    return [
        Candidate(
            name, variant_device(name), None if reasons.get(name) else functools.partial(build, name), reasons.get(name)
        )
        for name in variants or list(reasons)
    ]


def physical_memory() -> int:
    """Bytes of physical memory (POSIX ``sysconf``, Linux and macOS); 8 GiB where it does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def groups_that_fit(count: int, bytes_each: float, memory: int | None = None) -> list[range]:
    """``count`` candidates, each keeping about ``bytes_each``, cut into consecutive groups that together keep at
    most :data:`MEMORY_SHARE` of ``memory`` (default: this machine's); one where all fit. ``time_candidates``
    passes the bytes a step moves (AdamW 28 per float32 parameter): more than a candidate's own w and state, for
    the temporaries of a step and the peers' copies of g."""
    memory = physical_memory() if memory is None else memory
    per_group = max(1, int(memory * MEMORY_SHARE // max(bytes_each, 1.0)))
    return [range(lo, min(lo + per_group, count)) for lo in range(0, count, per_group)]


def time_candidates(
    candidates: list[Candidate],
    params: Any,
    repeats: int,
    probes: Callable[[], AbstractContextManager[Sequence[Probe]]] = lambda: contextlib.nullcontext(()),
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[VariantResult], list[dict[str, float]]]:
    """Each candidate's median step and effective GB/s (the rule's bytes on ``params``), ``repeats`` timed rounds,
    round-robin with the others of its group and with the probes ``probes()`` makes (the roof's kernels, made
    anew for each group and released after it: :func:`~rmsprop_impls.measure.roof.cpu_roof_probes`); and per
    group, each probe's GB/s in those rounds (:meth:`~rmsprop_impls.measure.roof.Probe.gbps`). Unavailable
    candidates come back with their reason."""
    r = rule(optimizer)
    nbytes = step_bytes(params, r, r.hyperparameters(**(hyper or {})))
    runnable = [c for c in candidates if c.build is not None]
    timed: dict[str, tuple[StepTiming, int]] = {}
    probe_rates: list[dict[str, float]] = []
    total = len(runnable) * (repeats + 2)
    with tqdm(total=total, desc="timing", unit="step", disable=not progress, leave=False) as bar:
        for number, group in enumerate(groups_that_fit(len(runnable), nbytes)):
            members = [runnable[i] for i in group]
            with probes() as built:
                calls = {c.name: c.build() for c in members}
                calls.update({f"roof: {p.kernel}": p.run for p in built})
                timings = time_round_robin(
                    calls, 0.0, repeats, repeats, on_step=lambda name, _: bar.update(not name.startswith("roof: "))
                )
                probe_rates.append({p.kernel: p.gbps(timings[f"roof: {p.kernel}"]) for p in built})
            timed.update({c.name: (timings[c.name], number) for c in members})
            del calls, timings
            mx.clear_cache()
    results = []
    for c in candidates:
        if c.name not in timed:
            results.append(VariantResult(c.name, None, c.reason, device=c.device))
            continue
        timing, number = timed[c.name]
        results.append(VariantResult(c.name, timing, None, nbytes / timing.median / 1e9, c.device, c.differs, number))
    return results, probe_rates
