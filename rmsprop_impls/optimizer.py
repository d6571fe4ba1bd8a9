"""The one interface every variant shares, for every rule.

:class:`OptimizerBase` is an ``mlx.optimizers.Optimizer``: it owns the rule
(:mod:`rmsprop_impls.rules`: what the update computes, its hyper-parameters and
their checks), the schedule, the step counter, the tree walk and the stock
state layout (``state[...]["m"]``, ``["v"]``, ... per leaf, by the rule's stock
names). A variant only says how the update runs over the matched leaves, in
:meth:`OptimizerBase.update_leaves`, and never which rule it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlx.core as mx
import mlx.optimizers as optim

from .rules import DEFAULT_RULE, Rule, rule
from .tree_paths import TreeMismatchError, match_leaves

LearningRate = float | mx.array | Callable[[mx.array], mx.array]
#: Each state array's leaves, by the rule's state name: ``{"m": [...], "v": [...]}``.
StateLists = dict[str, list[mx.array]]

#: The dtypes every variant's update takes; leaves of other dtypes get stock's ops.
UPDATE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

#: Where a variant's update runs: the CPU, the GPU, or MLX's default device when the step runs.
DEVICES = ("cpu", "default", "gpu")


def resolve_device(declared: str) -> str:
    """The concrete device, ``"cpu"`` or ``"gpu"``, that a variant declaring ``declared`` runs on now.

    ``"default"`` follows ``mx.default_device()``: the GPU on Apple silicon and CUDA builds, the CPU elsewhere
    (or where a program moved the default), so it is resolved when the step runs, not at import.
    """
    if declared not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {declared!r}")
    if declared == "default":
        return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    return declared


@dataclass
class StepScalars:
    """What one step's update needs besides the arrays: the learning rate (as stock holds it, before the
    cast to each leaf's dtype) and the rule's per-step float32 inputs (Adam's bias corrections)."""

    lr: mx.array
    values: dict[str, mx.array] = field(default_factory=dict)


class OptimizerBase(optim.Optimizer):
    """An ``mlx.optimizers`` rule with the update strategy left to subclasses.

    Args:
        learning_rate: a float, or a schedule called with the step count.
        *hyper: the rule's hyper-parameters in stock's order (RMSprop: ``alpha``, ``eps``).
        optimizer: the rule, by name (``"adamw"``) or as a :class:`~rmsprop_impls.rules.Rule`; RMSprop by default.
        **named: the rule's hyper-parameters by name, with stock's defaults and stock's checks.

    Each hyper-parameter is also an attribute, as on the stock class (``opt.betas``, ``opt.eps``), read
    afresh on every step.
    """

    #: The registry name of the variant.
    name: ClassVar[str] = ""
    #: One line for tables: how this variant runs the update.
    summary: ClassVar[str] = ""
    #: Where the update runs (one of ``DEVICES``); its bandwidth limit is the one its GB/s is a fraction of.
    device: ClassVar[str] = "default"

    def __init__(self, learning_rate: LearningRate, *hyper: Any, optimizer: str | Rule = DEFAULT_RULE, **named: Any):
        super().__init__()
        if not (callable(learning_rate) or isinstance(learning_rate, (int, float, mx.array))):
            raise TypeError(f"learning_rate must be a float or a schedule callable, not {type(learning_rate).__name__}")
        self.rule = rule(optimizer)
        for key, value in self.rule.hyperparameters(*hyper, **named).items():
            setattr(self, key, value)
        self._maybe_schedule("learning_rate", learning_rate)

    @property
    def hyper(self) -> dict[str, Any]:
        """The rule's hyper-parameters as they are now (a program may change ``opt.eps`` between steps)."""
        return {key: getattr(self, key) for key in self.rule.defaults}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` where the variant runs on this machine, else why not."""
        return None

    @classmethod
    def concrete_device(cls) -> str:
        """``"cpu"`` or ``"gpu"``: where this variant's steps run now (``device`` resolved)."""
        return resolve_device(cls.device)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        self.rule.init_state(parameter, state)

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        """Stock's step, computed whole before the state changes: an error leaves the state as it was,
        so a retry does not apply the update twice."""
        if not isinstance(gradients, dict):
            # The state dict holds "step" and "learning_rate" beside the tree, as stock's does.
            raise TreeMismatchError(
                (), f"gradients must be a dict at the top, like a model's parameters, not a {type(gradients).__name__}"
            )
        if not self._initialized:
            match_leaves(gradients, parameters)  # a bad tree fails before any state is made
            self.init(gradients)
        scheduled, scalars = self._scheduled()
        leaves = match_leaves(gradients, parameters, self.state, self.rule.states)
        new_w, new_states = self.step_leaves(leaves.parameters, leaves.gradients, leaves.states, scalars)
        new_parameters = leaves.rebuild(new_w)
        self.state.update(scheduled)
        self.state["step"] = self.step + 1
        for name, arrays in new_states.items():
            for s, x in zip(leaves.states, arrays):
                s[name] = x
        return new_parameters

    def _scheduled(self) -> tuple[dict[str, mx.array], StepScalars]:
        """This step's scheduled values, not yet stored, and the step's scalars (the learning rate among them)."""
        scheduled, values = {}, {}  # most optimizers have no schedule and most rules no per-step inputs
        if self._schedulers:
            scheduled = {param: scheduler(self.step) for param, scheduler in self._schedulers.items()}
        lr = scheduled.get("learning_rate", self.learning_rate)
        if self.rule.step_inputs:  # most rules have none: no hyper-parameters to read on their steps
            hyper = self.hyper
            if self.rule.uses_step(hyper):
                values = self.rule.step_values(hyper, self.step + 1)
        return scheduled, StepScalars(lr, values)

    def step_leaves(
        self, w: list[mx.array], g: list[mx.array], states: list[dict], scalars: StepScalars
    ) -> tuple[list[mx.array], StateLists]:
        """The new w and changed states of every leaf (``states``: each leaf's state dict), state unchanged:
        the variant's update for the leaves it takes, stock's ops for the others (other dtypes, mixed dtypes
        as stock promotes them), and stock's ops leaf after leaf where two leaves share one state dict,
        since stock then feeds a's new state to b."""
        if len({id(s) for s in states}) < len(states):
            return self.stock_leaf_by_leaf(w, g, states, scalars)
        s = {name: [d[name] for d in states] for name in self.rule.states}
        taken = [i for i in range(len(w)) if self.takes_leaf(w[i], g[i], [s[k][i] for k in s])]
        if w and len(taken) == len(w):  # no leaves: no variant call (its update may be for another rule)
            return self.update_leaves(w, g, s, scalars)
        new_w, new_s = list(w), {name: list(x) for name, x in s.items()}
        if taken:
            pick = lambda xs: [xs[i] for i in taken]  # noqa: E731
            tw, ts = self.update_leaves(pick(w), pick(g), {k: pick(x) for k, x in s.items()}, scalars)
            for k, i in enumerate(taken):
                new_w[i] = tw[k]
                for name, x in ts.items():
                    new_s[name][i] = x[k]
        hyper = self.hyper
        for i in sorted(set(range(len(w))) - set(taken)):  # in tree order, as stock builds them
            own = {name: s[name][i] for name in s}
            new_w[i], changed = self.rule.update(hyper, w[i], g[i], own, scalars.lr, scalars.values)
            for name, x in changed.items():
                new_s[name][i] = x
        return new_w, new_s

    def stock_leaf_by_leaf(
        self, w: list[mx.array], g: list[mx.array], states: list[dict], scalars: StepScalars
    ) -> tuple[list[mx.array], StateLists]:
        """Stock's ops in stock's order, each leaf reading the newest state of its state dict."""
        hyper = self.hyper
        newest: dict[int, dict[str, mx.array]] = {}
        new_w: list[mx.array] = []
        new_s: StateLists = {name: [] for name in self.rule.states}
        for wi, gi, s in zip(w, g, states):
            own = newest.setdefault(id(s), {name: s[name] for name in self.rule.states})
            nw, changed = self.rule.update(hyper, wi, gi, dict(own), scalars.lr, scalars.values)
            own.update(changed)
            new_w.append(nw)
            for name in new_s:
                new_s[name].append(own[name])
        return new_w, new_s

    @classmethod
    def takes_leaf(cls, w: mx.array, g: mx.array, states: list[mx.array]) -> bool:
        """Whether ``update_leaves`` computes this leaf as stock does; the others get stock's ops.
        Every variant takes leaves whose w, g and state arrays share one shape and one of float32, float16
        and bfloat16; a variant with other limits (a size, a device, a rule) narrows this."""
        return (
            w.dtype == g.dtype
            and w.dtype in UPDATE_DTYPES
            and w.shape == g.shape
            and all(x.dtype == w.dtype and x.shape == w.shape for x in states)
        )

    def update_leaves(
        self, w: list[mx.array], g: list[mx.array], s: StateLists, scalars: StepScalars
    ) -> tuple[list[mx.array], StateLists]:
        """Return the new parameters and the new state arrays the rule changes, leaf for leaf."""
        raise NotImplementedError
