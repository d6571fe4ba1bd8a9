"""The one interface every variant shares.

:class:`RMSpropBase` is an ``mlx.optimizers.Optimizer``: it owns the
hyper-parameter checks, the schedule, the step counter, the tree walk and the
stock state layout (``state[...]["v"]`` per leaf). A variant only says how the
update runs over the matched leaves, in :meth:`RMSpropBase.update_leaves`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import mlx.core as mx
import mlx.optimizers as optim

from .formula import DEFAULT_ALPHA, DEFAULT_EPS, check_hyperparameters, rmsprop_update
from .tree_paths import MatchedLeaves, TreeMismatchError, match_leaves

LearningRate = float | mx.array | Callable[[mx.array], mx.array]

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


class RMSpropBase(optim.Optimizer):
    """RMSprop with the update strategy left to subclasses.

    ``v = alpha*v + (1-alpha)*g^2``; ``w = w - lr*g/(sqrt(v)+eps)``.

    Args:
        learning_rate: a float, or a schedule called with the step count.
        alpha: the smoothing constant, ``>= 0``.
        eps: added to ``sqrt(v)``, ``> 0``.
    """

    #: The registry name of the variant.
    name: ClassVar[str] = ""
    #: One line for tables: how this variant runs the update.
    summary: ClassVar[str] = ""
    #: Where the update runs (one of ``DEVICES``); its bandwidth limit is the one its GB/s is a fraction of.
    device: ClassVar[str] = "default"

    def __init__(self, learning_rate: LearningRate, alpha: float = DEFAULT_ALPHA, eps: float = DEFAULT_EPS):
        super().__init__()
        if not (callable(learning_rate) or isinstance(learning_rate, (int, float, mx.array))):
            raise TypeError(f"learning_rate must be a float or a schedule callable, not {type(learning_rate).__name__}")
        check_hyperparameters(alpha, eps)
        self._maybe_schedule("learning_rate", learning_rate)
        self.alpha = alpha
        self.eps = eps

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` where the variant runs on this machine, else why not."""
        return None

    @classmethod
    def concrete_device(cls) -> str:
        """``"cpu"`` or ``"gpu"``: where this variant's steps run now (``device`` resolved)."""
        return resolve_device(cls.device)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["v"] = mx.zeros_like(parameter)

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
        scheduled, lr = self._scheduled()
        leaves = match_leaves(gradients, parameters, self.state)
        new_w, new_v = self._step_leaves(leaves, lr)
        new_parameters = leaves.rebuild(new_w)
        self.state.update(scheduled)
        self.state["step"] = self.step + 1
        for s, v in zip(leaves.states, new_v):
            s["v"] = v
        return new_parameters

    def _scheduled(self) -> tuple[dict[str, mx.array], mx.array]:
        """This step's scheduled values, not yet stored, and the learning rate among them."""
        scheduled = {param: scheduler(self.step) for param, scheduler in self._schedulers.items()}
        return scheduled, scheduled.get("learning_rate", self.learning_rate)

    def _step_leaves(self, leaves: MatchedLeaves, lr: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """The new w and v of every leaf: the variant's update for the leaves it takes, stock's ops
        for the others (other dtypes, mixed dtypes as stock promotes them), and stock's ops leaf
        after leaf where two leaves share one state dict, since stock then feeds a's new v to b."""
        w, g, states = leaves.parameters, leaves.gradients, leaves.states
        v = [s["v"] for s in states]
        if len({id(s) for s in states}) < len(states):
            return _stock_leaf_by_leaf(w, g, states, lr, self.alpha, self.eps)
        taken = [i for i in range(len(w)) if self.takes_leaf(w[i], g[i], v[i])]
        if len(taken) == len(w):
            return self.update_leaves(w, g, v, lr)
        new_w, new_v = list(w), list(v)
        if taken:
            tw, tv = self.update_leaves([w[i] for i in taken], [g[i] for i in taken], [v[i] for i in taken], lr)
            for k, i in enumerate(taken):
                new_w[i], new_v[i] = tw[k], tv[k]
        for i in sorted(set(range(len(w))) - set(taken)):  # in tree order, as stock builds them
            new_w[i], new_v[i] = rmsprop_update(w[i], g[i], v[i], lr, self.alpha, self.eps)
        return new_w, new_v

    @classmethod
    def takes_leaf(cls, w: mx.array, g: mx.array, v: mx.array) -> bool:
        """Whether ``update_leaves`` computes this leaf as stock does; the others get stock's ops.
        Every variant takes leaves whose w, g and v share one shape and one of float32, float16 and
        bfloat16; a variant with other limits (a size, a device) narrows this."""
        return w.dtype == g.dtype == v.dtype and w.dtype in UPDATE_DTYPES and w.shape == g.shape == v.shape

    def update_leaves(
        self, w: list[mx.array], g: list[mx.array], v: list[mx.array], lr: mx.array
    ) -> tuple[list[mx.array], list[mx.array]]:
        """Return the new parameters and the new ``v``, leaf for leaf."""
        raise NotImplementedError


def _stock_leaf_by_leaf(
    w: list[mx.array], g: list[mx.array], states: list[dict], lr: mx.array, alpha: float, eps: float
) -> tuple[list[mx.array], list[mx.array]]:
    """Stock's ops in stock's order, each leaf reading the newest v of its state dict."""
    newest: dict[int, mx.array] = {}
    new_w, new_v = [], []
    for wi, gi, s in zip(w, g, states):
        nw, nv = rmsprop_update(wi, gi, newest.get(id(s), s["v"]), lr, alpha, eps)
        newest[id(s)] = nv
        new_w.append(nw)
        new_v.append(nv)
    return new_w, new_v
