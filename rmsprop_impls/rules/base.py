"""What every rule module defines, and what the optimizers and kernels ask of a rule.

A rule says *what* an update computes; a variant says *how* it runs. A rule
module holds one :class:`Rule` subclass: its stock class, its state names, its
per-step inputs and its per-element update (:mod:`.element`). Everything else
is derived from those, once, here: stock's hyper-parameter defaults (read from
the stock class's signature, so they are stock's by construction), stock's
validation (the stock class is built with the same values, so a bad value gets
stock's own error), the bytes a step moves, and the update in MLX ops.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, ClassVar

import mlx.core as mx
import mlx.optimizers as optim

from . import element


class Rule:
    """One elementwise optimizer rule of ``mlx.optimizers``; subclasses fill in the class attributes and
    :meth:`element`."""

    #: The name ``create(..., optimizer=name)`` and the CLI's ``--optimizer`` take.
    name: ClassVar[str] = ""
    #: The stock class whose numbers every variant gives.
    stock: ClassVar[type[optim.Optimizer]]
    #: The state arrays of each leaf, by stock's names, each starting as zeros like the parameter.
    states: ClassVar[tuple[str, ...]] = ()
    #: Float32 values computed once per step from the step count (:meth:`step_values`), e.g. bias corrections.
    step_inputs: ClassVar[tuple[str, ...]] = ()

    @property
    def title(self) -> str:
        """The stock class's name: ``AdamW``."""
        return self.stock.__name__

    @functools.cached_property
    def defaults(self) -> dict[str, Any]:
        """Stock's hyper-parameters and their defaults, in the order of stock's signature."""
        parameters = list(inspect.signature(self.stock.__init__).parameters.values())[2:]  # self, learning_rate
        return {p.name: p.default for p in parameters}

    def hyperparameters(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Stock's hyper-parameters from positional and named values, checked as stock checks them."""
        names = list(self.defaults)
        if len(args) > len(names):
            raise TypeError(f"{self.title} takes at most {len(names)} hyper-parameters after the learning rate")
        given = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in self.defaults:
                raise TypeError(f"{self.title} has no hyper-parameter {key!r}; it takes: {', '.join(names)}")
            if key in given:
                raise TypeError(f"{self.title} got {key!r} twice")
            given[key] = value
        # A copy of each list: stock's default betas is one list shared by every instance it makes.
        hyper = {k: list(v) if isinstance(v, list) else v for k, v in {**self.defaults, **given}.items()}
        self.stock(0.0, **hyper)  # raises stock's own error for a bad value
        return hyper

    def uses_step(self, hyper: Mapping[str, Any]) -> bool:
        """Whether :meth:`step_values` reads the step count with these hyper-parameters: a step that does not
        need it computes no ``step + 1``."""
        return bool(self.step_inputs)

    def step_values(self, hyper: Mapping[str, Any], step: Any, e: Any = element.MLX_OPS) -> dict[str, Any]:
        """This step's float32 inputs, in stock's MLX ops (or ``e``'s: the float64 reference passes NumPy's);
        ``step`` is the step being taken, counted from 1 (stock increments its counter before the update)."""
        return {}

    def element(self, e: Any, h: Any, x: Any) -> tuple[Any, dict[str, Any]]:
        """The update of one element, or of whole arrays (see :mod:`.element`): ``(new w, changed states)``."""
        raise NotImplementedError

    def configurations(self) -> list[dict[str, Any]]:
        """Hyper-parameter values that take every branch of :meth:`element` between them (one each): the
        kernels built ahead of time (the C++ one) are generated for the traces of these. The default has no
        branches; a rule with some lists one setting per path."""
        return [self.defaults]

    def init_state(self, parameter: mx.array, state: dict) -> None:
        for name in self.states:
            state[name] = mx.zeros_like(parameter)

    def update(
        self,
        hyper: Mapping[str, Any],
        w: mx.array,
        g: mx.array,
        states: Mapping[str, mx.array],
        lr: mx.array,
        step_values: Mapping[str, mx.array],
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """Stock's update of one array (or one packed buffer) in MLX ops: ``(new w, changed states)``."""
        x = SimpleNamespace(w=w, g=g, lr=lr, **states, **step_values)
        return self.element(element.MLX_OPS, SimpleNamespace(**hyper), x)

    def trace(self, hyper: Mapping[str, Any]) -> element.Trace:
        """The update recorded for these hyper-parameters: what the kernels are generated from."""
        return _trace(self, _frozen(hyper))

    def bytes_per_element(self, hyper: Mapping[str, Any], itemsize: int = 4) -> int:
        """Bytes a step moves per parameter: the arrays it reads (w, g, the states it uses) and writes (w, the
        states it changes). RMSprop 20 in float32; Adam and AdamW 28; SGD 12, with momentum 20."""
        t = self.trace(hyper)
        arrays = ("w", "g", *self.states)
        return itemsize * (len(t.used_inputs() & set(arrays)) + 1 + len(t.state_out))


def _frozen(hyper: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in hyper.items())


@functools.lru_cache(maxsize=256)
def _trace(rule: Rule, hyper: tuple) -> element.Trace:
    return element.trace(rule.element, dict(hyper), rule.states, rule.step_inputs)
