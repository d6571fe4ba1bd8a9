"""Several ways to run MLX's elementwise optimizers, behind one interface, with the tools to time them.

>>> import rmsprop_impls as r
>>> r.availability()                                  # which variants run here, and why not
>>> opt = r.create("compiled", 1e-3)                  # a drop-in for mlx.optimizers.RMSprop
>>> opt = r.AdamW(1e-3, weight_decay=0.1, variant="cpu_kernel")   # for mlx.optimizers.AdamW

The package is layered: the rules (``rules/``: what each optimizer computes,
defined once), the one interface and the variants at the top level
(``optimizer``, ``tree_paths``, ``registry``, ``drop_in``, ``reference``,
``variants/``), their kernels in ``kernels/``, timing them in ``measure/``,
reading asv's results in ``analysis/``, and the command line in ``cli/``.
Each layer imports only from the ones before it.
"""

from . import (
    _mlx_backend,  # noqa: F401  (first: a clear error where MLX has no back-end)
    _moved,
)
from .drop_in import SGD, AdaDelta, Adagrad, Adam, Adamax, AdamW, Lion, RMSprop
from .kernels.packing import FlatLayout, PackedGradients
from .measure.choice_cache import clear_choices
from .measure.choose import Choice, choose
from .optimizer import OptimizerBase
from .reference import reference_step, reference_trajectory
from .registry import (
    UnknownVariantError,
    VariantUnavailableError,
    availability,
    available_variants,
    create,
    variant_class,
    variant_device,
    variant_names,
)
from .rules import RULE_NAMES, UnknownRuleError, rule
from .tree_paths import TreeMismatchError

_moved.install()


def __getattr__(name: str):
    """``rmsprop_impls.results`` and the other 0.1 module names, for one release (see ``_moved``)."""
    if name in _moved.MOVED:
        return _moved.moved_module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Choice",
    "choose",
    "clear_choices",
    "FlatLayout",
    "PackedGradients",
    "OptimizerBase",
    "RULE_NAMES",
    "UnknownRuleError",
    "rule",
    "SGD",
    "RMSprop",
    "Adagrad",
    "AdaDelta",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "TreeMismatchError",
    "UnknownVariantError",
    "VariantUnavailableError",
    "availability",
    "available_variants",
    "create",
    "variant_device",
    "reference_step",
    "reference_trajectory",
    "variant_class",
    "variant_names",
]
