"""Time optimizer steps the way MLX must be timed: every output evaluated.

MLX is lazy, so a step counts only once ``mx.eval`` has produced the new
parameters *and* the new state. Each step feeds its output back in, as a
training loop does.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx


@dataclass
class StepTiming:
    """Seconds per step: the first (init, compile, kernel build) and the rest."""

    first_s: float
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=4, method="inclusive")[int(q * 4) - 1]


def run_step(optimizer: Any, params: Any, grads: Any) -> Any:
    """One evaluated step; returns the new parameters.

    The caller still holds the old ``params`` while this evaluates the new ones,
    so MLX cannot reuse (donate) their buffers; :func:`time_steps` drops them
    first, as a training loop does.
    """
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    return params


def time_steps(optimizer: Any, params: Any, grads: Any, repeats: int = 10, warmup: int = 1) -> StepTiming:
    """Time ``repeats`` steps after the first one and ``warmup`` more.

    Each step rebinds ``params`` before evaluating, so the old parameters are
    dropped and MLX may donate their buffers, as in ``params = opt.apply_gradients(g, params)``.
    """
    mx.eval(params, grads)
    start = time.perf_counter()
    params = run_step(optimizer, params, grads)
    timing = StepTiming(first_s=time.perf_counter() - start)
    for i in range(warmup + repeats):
        start = time.perf_counter()
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        if i >= warmup:
            timing.samples.append(time.perf_counter() - start)
    return timing
