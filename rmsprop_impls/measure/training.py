"""Whole training steps: forward, backward and update, compiled as mlx-lm's trainer compiles them, and not.

A user runs the optimizer inside a training step, and mostly a compiled one:
mlx-lm's trainer wraps forward, backward and ``optimizer.update`` in
``mx.compile(inputs=state, outputs=state)`` with ``state = [model.state,
optimizer.state, mx.random.state]``. There the update can fuse into the
step's graph, and forward and backward take most of the time, so what a
faster update saves per training step is not what it saves alone. This module
builds that step (and the uncompiled one) for any optimizer, times the
candidates interleaved in one process, and checks that every variant's
parameters stay bit-identical with stock's.

The optimizer of a loop comes from :func:`make_optimizer` ``(rule, variant)``:
the stock class of every rule of :mod:`rmsprop_impls.rules` (``optim.RMSprop``,
``optim.AdamW``, ...) or any variant of this project running that rule, with
stock's hyper-parameters (its defaults unless given).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..registry import create, unavailable_reason, variant_names
from ..rules import RULE_NAMES
from ..rules import rule as rule_named
from .timing import StepTiming, time_round_robin, time_steps
from .training_models import TrainingModel, copy_model

#: The optimizer rules and their stock MLX classes.
STOCK_CLASSES: dict[str, type[optim.Optimizer]] = {name: rule_named(name).stock for name in RULE_NAMES}
#: The rules ``rmsprop-bench train`` times when none is named.
DEFAULT_RULES = ("rmsprop", "adamw")
#: The variant name of a rule's stock MLX class.
STOCK = "stock"
#: The rules this project has variants of (every one); a rule's variants are the registry's.
RULES_WITH_VARIANTS = RULE_NAMES
#: Hyper-parameters per rule name, by stock's names; a rule not named keeps stock's defaults.
Hyper = Mapping[str, Mapping[str, object]]
#: How the step runs: as mlx-lm's trainer compiles it, or op by op.
STEP_KINDS = ("compiled", "uncompiled")
LEARNING_RATE = 1e-3
#: How often a compiled step is traced: on the first step, and again on the second, once the optimizer's
#: state (made inside the first trace) has changed the inputs' structure. mlx-lm's trainer does the same.
EXPECTED_TRACES = 2


def optimizer_variants(rule: str) -> list[str]:
    """``stock`` and, for a rule with variants, every variant the registry knows (runnable here or not)."""
    _check_rule(rule)
    return [STOCK, *(variant_names() if rule in RULES_WITH_VARIANTS else [])]


def _check_rule(rule: str) -> None:
    if rule not in STOCK_CLASSES:
        raise ValueError(f"unknown optimizer rule '{rule}'; choose one of {', '.join(STOCK_CLASSES)}")


def make_optimizer(
    rule: str, variant: str, learning_rate: float = LEARNING_RATE, hyper: Mapping[str, object] | None = None
) -> optim.Optimizer:
    """A fresh optimizer of ``rule`` run by ``variant`` (``stock``: the rule's MLX class), with ``hyper``.

    Raises ``NotImplementedError`` (the message says why) for a pair that has no implementation, stock's
    errors for a bad hyper-parameter, and the registry's for a variant it does not know or that cannot run here.
    """
    _check_rule(rule)
    hyper = dict(hyper or {})
    if variant == STOCK:
        return STOCK_CLASSES[rule](learning_rate=learning_rate, **hyper)
    if rule not in RULES_WITH_VARIANTS:
        raise NotImplementedError(f"no '{variant}' variant of {rule}")
    return create(variant, learning_rate, optimizer=rule, **hyper)


def skip_reason(rule: str, variant: str) -> str | None:
    """Why ``(rule, variant)`` cannot run here, without building it; ``None`` where it can."""
    _check_rule(rule)
    if variant == STOCK:
        return None
    if rule not in RULES_WITH_VARIANTS:
        return f"no '{variant}' variant of {rule}"
    if variant not in variant_names():
        return f"no variant '{variant}'"
    return unavailable_reason(variant)


@dataclass
class TrainingLoop:
    """A copy of a model, its optimizer (``None``: forward and backward only) and its step on one fixed batch.

    ``step()`` runs one step and evaluates everything it produced (the model's and the optimizer's state and
    the loss, as mlx-lm's trainer does), feeding its output back in. ``traces`` counts the runs of the step's
    Python body: every step uncompiled; compiled, :data:`EXPECTED_TRACES` times, unless something in the step
    makes ``mx.compile`` trace it again (a retrace every step would run the update op by op, unfused).
    """

    module: nn.Module
    optimizer: optim.Optimizer | None
    compiled: bool
    step: Callable[[], Any] = field(repr=False, default=None)
    traces: int = 0

    def parameters(self) -> Any:
        return self.module.trainable_parameters()

    def resident_bytes(self) -> int:
        """What the loop keeps between steps: the model's weights and the optimizer's state."""
        leaves = tree_flatten(self.module.parameters()) + tree_flatten(self.optimizer.state if self.optimizer else {})
        return sum(x.nbytes for _, x in leaves if isinstance(x, mx.array))


def training_loop(model: TrainingModel, optimizer: optim.Optimizer | None, compiled: bool) -> TrainingLoop:
    """A loop that trains a copy of ``model`` (same weights, same batch, same loss) with ``optimizer``.

    Compiled, the step is mlx-lm's trainer's: ``mx.compile`` with ``inputs`` and ``outputs`` the model's
    state, the optimizer's state and MLX's random state, traced on the first step (which also makes the
    optimizer's state, inside the trace, as in mlx-lm).
    """
    module = copy_model(model)
    loss_and_grad = loss_and_grad_of(module, model.loss)
    loop = TrainingLoop(module, optimizer, compiled)

    def whole_step(*inputs):
        loop.traces += 1
        value, grads = loss_and_grad(*inputs)
        if optimizer is None:
            return value, grads
        optimizer.update(module, grads)  # as mlx-lm's trainer; cpu_kernel writes w over here, uncompiled
        return value

    state = [module.state, mx.random.state] + ([optimizer.state] if optimizer is not None else [])
    step = mx.compile(whole_step, inputs=state, outputs=state) if compiled else whole_step

    def run() -> Any:
        out = step(*model.batch)
        mx.eval(state, out)
        return out

    loop.step = run
    return loop


def loss_and_grad_of(module: nn.Module, loss: Callable[..., Any]) -> Callable[..., Any]:
    """The forward and backward pass alone, as a function of the batch (the module's state read at each call)."""
    loss_and_grad = nn.value_and_grad(module, loss)
    return lambda *inputs: loss_and_grad(module, *inputs)


def step_peak_bytes(loop: TrainingLoop) -> int:
    """Peak memory of one step of ``loop``: what it keeps (weights, optimizer state) plus what the step adds.

    Measured as the process's peak during the step over its active memory before it, so other loops alive in
    the same process do not count; ``mx.reset_peak_memory`` starts the count.
    """
    mx.eval(loop.module.state, loop.optimizer.state if loop.optimizer else [])
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    loop.step()
    return loop.resident_bytes() + max(mx.get_peak_memory() - before, 0)


@dataclass
class TrainingRow:
    """One candidate's whole training step, beside its update timed alone; times in seconds.

    ``in_step_s`` is what the update costs inside the step: the whole step less the forward and
    backward pass alone, in the same mode (compiled or not); ``share`` is that over the step.
    ``speedup`` is stock's step over this one (the same rule and mode).
    """

    model: str
    step_kind: str
    rule: str
    variant: str
    step_s: float = float("nan")
    q1_s: float = float("nan")
    q3_s: float = float("nan")
    alone_s: float = float("nan")
    in_step_s: float = float("nan")
    share: float = float("nan")
    speedup: float = float("nan")
    peak_bytes: int = 0
    note: str = ""


@dataclass
class TrainingResult:
    """Every candidate's row, the forward and backward pass alone per mode, and the model's size."""

    model: str
    rows: list[TrainingRow]
    grad_only_s: dict[str, float]
    description: dict[str, Any]

    def saving_per_step(self, variant: str, rule: str = "rmsprop", step_kind: str = "compiled") -> float | None:
        """Seconds per training step that ``variant`` saves over ``rule``'s stock class (negative: it costs), where
        both ran."""
        steps = {r.variant: r.step_s for r in self.rows if r.rule == rule and r.step_kind == step_kind}
        if variant not in steps or STOCK not in steps:
            return None
        return steps[STOCK] - steps[variant]


def winner_saving(
    model: TrainingModel,
    winner: str,
    time_budget_s: float = 10.0,
    rule: str = "rmsprop",
    hyper: Mapping[str, object] | None = None,
) -> dict[str, dict[str, float]]:
    """What swapping ``rule``'s stock class for ``winner`` saves per training step of ``model``, in each step kind:
    ``{"compiled": {"stock_s": .., "winner_s": .., "saved_s": ..}, "uncompiled": {...}}`` (a negative saving costs)."""
    result = measure_training(
        model, [rule], [STOCK, winner], time_budget_s=time_budget_s, alone_repeats=1, hyper={rule: hyper or {}}
    )
    steps = {(r.step_kind, r.variant): r.step_s for r in result.rows}
    return {
        kind: {"stock_s": steps[kind, STOCK], "winner_s": steps[kind, winner],
               "saved_s": result.saving_per_step(winner, rule, step_kind=kind)}
        for kind in STEP_KINDS
    }  # fmt: skip


def candidates(rules: list[str], variants: list[str] | None = None) -> tuple[list[tuple[str, str]], dict]:
    """The ``(rule, variant)`` pairs that run here (``variants`` default: each rule's all), and why the others not."""
    runnable, skipped = [], {}
    for rule in rules:
        for variant in variants or optimizer_variants(rule):
            reason = skip_reason(rule, variant)
            if reason is None:
                runnable.append((rule, variant))
            else:
                skipped[(rule, variant)] = reason
    return runnable, skipped


def measure_training(
    model: TrainingModel,
    rules: list[str],
    variants: list[str] | None = None,
    step_kinds: tuple[str, ...] = STEP_KINDS,
    time_budget_s: float = 10.0,
    min_rounds: int = 3,
    alone_repeats: int = 5,
    on_step: Callable[[str], None] | None = None,
    hyper: Hyper | None = None,
) -> TrainingResult:
    """Time every runnable candidate's whole step, interleaved in one process, per mode.

    Per mode, one loop per candidate (each its own copy of the model: the same weights, batch and loss)
    and one forward-and-backward-only loop run round-robin (:func:`~.timing.time_round_robin`) for
    ``time_budget_s`` split over the modes; then each candidate's peak memory over one step, and its
    update alone on the same tree (its trainable parameters, with the step's real gradients) for
    ``alone_repeats`` steps. ``on_step`` gets a label for every step taken (for a progress bar); ``hyper``
    holds each rule's hyper-parameters (stock's defaults for a rule it does not name).
    """
    hyper = hyper or {}
    runnable, skipped = candidates(rules, variants)
    rows: list[TrainingRow] = []
    grad_only: dict[str, float] = {}

    def stepped(label: str) -> None:
        if on_step:
            on_step(label)

    for kind in step_kinds:
        compiled = kind == "compiled"
        loops = {(r, v): training_loop(model, make_optimizer(r, v, hyper=hyper.get(r)), compiled) for r, v in runnable}
        base = training_loop(model, None, compiled)
        timings = time_round_robin(
            {"grad": base.step, **{pair: loop.step for pair, loop in loops.items()}},
            time_budget_s / len(step_kinds), min_rounds=min_rounds,
            on_step=lambda name, _, kind=kind: stepped(f"{kind} {'grad only' if name == 'grad' else ' '.join(name)}"),
        )  # fmt: skip
        grad_only[kind] = timings["grad"].median
        for pair, loop in loops.items():
            t = timings[pair]
            row = TrainingRow(model.name, kind, *pair, t.median, t.q1, t.q3, peak_bytes=step_peak_bytes(loop))
            row.in_step_s = row.step_s - grad_only[kind]
            row.share = row.in_step_s / row.step_s
            row.alone_s = time_update_alone(model, *pair, repeats=alone_repeats, hyper=hyper.get(pair[0])).median
            if loop.compiled and loop.traces > EXPECTED_TRACES:
                row.note = f"the compiled step was traced {loop.traces} times in {len(t.samples) + 2} steps"
            rows.append(row)
            stepped(f"{kind} {' '.join(pair)}: peak memory and the update alone")
        del loops, base
    for (rule, variant), reason in skipped.items():
        rows += [TrainingRow(model.name, kind, rule, variant, note=f"skipped: {reason}") for kind in step_kinds]
    _add_speedups(rows)
    return TrainingResult(model.name, rows, grad_only, model.describe())


def time_update_alone(
    model: TrainingModel, rule: str, variant: str, repeats: int = 5, hyper: Mapping[str, object] | None = None
) -> StepTiming:
    """A fresh optimizer's step alone, uncompiled, on ``model``'s trainable parameters and the gradients of
    one real forward and backward pass: the update as the optimizer-step suite times it, on the same tree."""
    _, grads = loss_and_grad_of(model.module, model.loss)(*model.batch)
    optimizer = make_optimizer(rule, variant, hyper=hyper)
    return time_steps(optimizer, model.module.trainable_parameters(), grads, repeats=repeats)


def _add_speedups(rows: list[TrainingRow]) -> None:
    stock = {(r.step_kind, r.rule): r.step_s for r in rows if r.variant == STOCK}
    for r in rows:
        if (r.step_kind, r.rule) in stock:
            r.speedup = stock[(r.step_kind, r.rule)] / r.step_s


def trajectories(
    model: TrainingModel, rule: str, variants: list[str], compiled: bool, steps: int = 3
) -> dict[str, dict[str, mx.array]]:
    """Each variant's trainable parameters after ``steps`` training steps from the same start, by leaf path."""
    out = {}
    for variant in variants:
        loop = training_loop(model, make_optimizer(rule, variant), compiled)
        for _ in range(steps):
            loop.step()
        out[variant] = dict(tree_flatten(loop.parameters()))
    return out
