"""Several ways to run MLX's RMSprop, behind one interface, with the tools to time them.

>>> import rmsprop_impls as r
>>> r.availability()                      # which variants run here, and why not
>>> opt = r.create("compiled", 1e-3)      # a drop-in for mlx.optimizers.RMSprop
"""

from .choice_cache import clear_choices
from .choose import Choice, choose
from .optimizer import RMSpropBase
from .packing import FlatLayout, PackedGradients
from .reference import reference_step, reference_trajectory
from .registry import (
    UnknownVariantError,
    VariantUnavailableError,
    availability,
    available_variants,
    create,
    variant_class,
    variant_names,
)
from .tree_paths import TreeMismatchError

__all__ = [
    "Choice",
    "choose",
    "clear_choices",
    "FlatLayout",
    "PackedGradients",
    "RMSpropBase",
    "TreeMismatchError",
    "UnknownVariantError",
    "VariantUnavailableError",
    "availability",
    "available_variants",
    "create",
    "reference_step",
    "reference_trajectory",
    "variant_class",
    "variant_names",
]
