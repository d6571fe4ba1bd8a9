"""Drop-in classes with stock's signatures: ``rmsprop_impls.AdamW(1e-3, weight_decay=0.1, variant="cpu_kernel")``.

Replacing ``optim.AdamW`` with ``rmsprop_impls.AdamW`` is a one-word change: the
same arguments, the same defaults and checks, the same state layout. The
variant (``variant=``, default ``"auto"``: measure on the first real steps, then
run the fastest) and its options (``threads``, ``precision``) are keyword-only
extras. Calling one returns that variant's optimizer; ``isinstance(opt,
rmsprop_impls.AdamW)`` holds for any variant running AdamW.
"""

from __future__ import annotations

import inspect
from typing import Any

from .optimizer import OptimizerBase
from .registry import create
from .rules import Rule, rule

#: The variant a drop-in class runs when none is named.
DEFAULT_VARIANT = "auto"


class DropIn(type):
    """The type of the drop-in classes: calling one makes a variant's optimizer for its rule."""

    rule: Rule

    def __call__(cls, learning_rate: Any, *hyper: Any, variant: str = DEFAULT_VARIANT, **named: Any) -> OptimizerBase:
        return create(variant, learning_rate, *hyper, optimizer=cls.rule, **named)

    def __instancecheck__(cls, instance: Any) -> bool:
        """As stock's classes: an AdamW (or Adamax) optimizer is an instance of ``Adam`` too."""
        return isinstance(instance, OptimizerBase) and issubclass(instance.rule.stock, cls.rule.stock)


def drop_in_class(name: str) -> DropIn:
    """The drop-in class of rule ``name``, with its stock class's name, docstring and signature."""
    r = rule(name)
    stock = inspect.signature(r.stock.__init__)
    parameters = [p for p in stock.parameters.values() if p.name != "self"]
    parameters += [
        inspect.Parameter("variant", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_VARIANT, annotation=str),
        inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD),
    ]
    doc = (
        f"``mlx.optimizers.{r.title}``, run by any variant of rmsprop_impls (``variant=``, default "
        f"{DEFAULT_VARIANT!r}); the variant's options (``threads``, ``precision``) are keyword arguments too."
        f"\n\n{inspect.getdoc(r.stock) or ''}"
    )
    cls = DropIn(r.title, (), {"__doc__": doc, "__module__": "rmsprop_impls", "rule": r})
    cls.__signature__ = stock.replace(parameters=parameters)
    return cls


SGD = drop_in_class("sgd")
RMSprop = drop_in_class("rmsprop")
Adagrad = drop_in_class("adagrad")
AdaDelta = drop_in_class("adadelta")
Adam = drop_in_class("adam")
AdamW = drop_in_class("adamw")
Adamax = drop_in_class("adamax")
Lion = drop_in_class("lion")
