"""Time optimizer steps the way MLX must be timed: every output evaluated.

MLX is lazy, so a step counts only once ``mx.eval`` has produced the new
parameters *and* the new state. Each step feeds its output back in, as a
training loop does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..tree_paths import match_leaves


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


def time_calls(step: Callable[[], object], repeats: int = 10, warmup: int = 1) -> StepTiming:
    """Time ``repeats`` calls of ``step`` after the first one (init, compile, kernel build) and
    ``warmup`` more. ``step`` must finish its work before it returns (``mx.eval`` for MLX)."""
    start = time.perf_counter()
    step()
    timing = StepTiming(first_s=time.perf_counter() - start)
    for i in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if i >= warmup:
            timing.samples.append(time.perf_counter() - start)
    return timing


def as_model(params: dict) -> nn.Module:
    """``params`` as an ``nn.Module`` holding the same arrays in lists and dicts of its own (``Module.update``
    assigns into them), for ``optimizer.update(model, grads)``."""
    model = nn.Module()
    for name, x in tree_map(lambda leaf: leaf, params).items():
        model[name] = x
    return model


#: How a timed step calls the optimizer, by name, with the call as a header prints it: the parameters fed back
#: in, or ``opt.update`` on the parameters in an ``nn.Module``, as mlx-examples' and mlx-lm's loops step.
CALLS = {"apply_gradients": "params = opt.apply_gradients(grads, params)", "update": "opt.update(model, grads)"}


def stepping(optimizer: Any, params: Any, grads: Any, call: str = "apply_gradients") -> Callable[[], None]:
    """One evaluated step of ``optimizer`` per call, on parameters of its own (:data:`CALLS`): fed back in and
    rebound before ``mx.eval``, so the old ones are dropped and MLX may donate their buffers, as in
    ``params = opt.apply_gradients(g, params)``; or a model of its own, stepped with ``opt.update``."""
    if call not in CALLS:
        raise ValueError(f"call must be one of {tuple(CALLS)}, not {call!r}")
    if call == "update":
        model = as_model(params)

        def step_the_model() -> None:
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)

        return step_the_model
    current = params

    def step() -> None:
        nonlocal current
        current = optimizer.apply_gradients(grads, current)
        mx.eval(current, optimizer.state)

    return step


def time_steps(optimizer: Any, params: Any, grads: Any, repeats: int = 10, warmup: int = 1) -> StepTiming:
    """Time ``repeats`` steps after the first one and ``warmup`` more.

    Each step rebinds ``params`` before evaluating, so the old parameters are
    dropped and MLX may donate their buffers, as in ``params = opt.apply_gradients(g, params)``.
    """
    mx.eval(params, grads)
    return time_calls(stepping(optimizer, params, grads), repeats, warmup)


class _NoUpdate:
    """Walks and rebuilds the tree against the stock state as every variant does, and updates nothing."""

    def __init__(self, params: Any):
        stock = optim.RMSprop(learning_rate=1e-3)
        stock.init(params)
        self.state = stock.state

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        leaves = match_leaves(gradients, parameters, self.state)
        return leaves.rebuild(leaves.parameters)


def time_floor(params: Any, grads: Any, repeats: int = 10) -> StepTiming:
    """Time the part of a step that no variant can skip: the tree walk, the rebuilt tree and the
    ``mx.eval`` of parameters and state, with nothing updated. Per leaf, it bounds how cheap a
    step on a many-leaf tree can be in MLX's Python API."""
    return time_steps(_NoUpdate(params), params, grads, repeats=repeats)


def time_interleaved(
    optimizers: dict[str, Any],
    params: Any,
    grads: Any,
    budget_s: float,
    min_rounds: int = 3,
    max_rounds: int = 1000,
    warmup: int = 1,
    on_step: Callable[[str, float], None] | None = None,
    between: Callable[[], object] | None = None,
    also: dict[str, Callable[[], object]] | None = None,
    call: str = "apply_gradients",
) -> dict[str, StepTiming]:
    """Time several optimizers round-robin, one step each per round, until ``budget_s`` is spent
    (:func:`time_round_robin`); each feeds its own parameters back in, or with ``call="update"`` steps its
    own model (:data:`CALLS`). ``also``: more calls timed in the same rounds (the roof's kernels:
    ``roof.cpu_roof_probes``)."""
    mx.eval(params, grads)
    calls = {name: stepping(opt, params, grads, call) for name, opt in optimizers.items()} | (also or {})
    return time_round_robin(calls, budget_s, min_rounds, max_rounds, warmup, on_step, between)


def time_round_robin(
    calls: dict[str, Callable[[], object]],
    budget_s: float,
    min_rounds: int = 3,
    max_rounds: int = 1000,
    warmup: int = 1,
    on_step: Callable[[str, float], None] | None = None,
    between: Callable[[], object] | None = None,
) -> dict[str, StepTiming]:
    """Time several calls round-robin, one each per round, until ``budget_s`` is spent.

    Interleaving spreads a busy moment on the machine over every candidate
    instead of landing on one, so the ranking survives noise that sequential
    timing would not. Each call's first run (init, compile, kernel build) is
    recorded apart, then ``warmup`` untimed rounds run; neither is charged to
    the budget. Then at least ``min_rounds`` and at most ``max_rounds`` timed
    rounds run. Each call must finish its work before it returns
    (``mx.eval``); ``on_step`` gets the name and seconds of every call (for a
    progress bar). ``between``, untimed, runs before every call: what a training loop does
    between optimizer steps, which leaves the machine otherwise than a step back to back.
    """
    timings: dict[str, StepTiming] = {}

    def one_round(record: bool) -> None:
        for name, call in calls.items():
            if between:
                between()
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
            if name not in timings:
                timings[name] = StepTiming(first_s=seconds)
            elif record:
                timings[name].samples.append(seconds)
            if on_step:
                on_step(name, seconds)

    for _ in range(1 + warmup):
        one_round(record=False)
    started = time.perf_counter()
    for done in range(max_rounds):
        if done >= min_rounds and time.perf_counter() - started >= budget_s:
            break
        one_round(record=True)
    return timings
