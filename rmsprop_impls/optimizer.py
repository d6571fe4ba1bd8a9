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

from .formula import DEFAULT_ALPHA, DEFAULT_EPS, check_hyperparameters
from .tree_paths import TreeMismatchError, match_leaves

LearningRate = float | mx.array | Callable[[mx.array], mx.array]

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
        if not isinstance(gradients, dict):
            # The state dict holds "step" and "learning_rate" beside the tree, as stock's does.
            raise TreeMismatchError(
                (), f"gradients must be a dict at the top, like a model's parameters, not a {type(gradients).__name__}"
            )
        if not self._initialized:
            match_leaves(gradients, parameters)  # a bad tree fails before any state is made
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1
        leaves = match_leaves(gradients, parameters, self.state)
        new_w, new_v = self.update_leaves(
            leaves.parameters, leaves.gradients, [s["v"] for s in leaves.states], self.learning_rate
        )
        for s, v in zip(leaves.states, new_v):
            s["v"] = v
        return leaves.rebuild(new_w)

    def update_leaves(
        self, w: list[mx.array], g: list[mx.array], v: list[mx.array], lr: mx.array
    ) -> tuple[list[mx.array], list[mx.array]]:
        """Return the new parameters and the new ``v``, leaf for leaf."""
        raise NotImplementedError
