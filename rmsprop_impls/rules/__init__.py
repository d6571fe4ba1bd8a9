"""The elementwise rules of ``mlx.optimizers``, each defined once in a module of its own.

>>> from rmsprop_impls.rules import rule
>>> rule("adamw").defaults
{'betas': [0.9, 0.999], 'eps': 1e-08, 'weight_decay': 0.01, 'bias_correction': False}
"""

from __future__ import annotations

import importlib

from .base import Rule

#: Every rule, in the order tables list them: the default first.
RULE_NAMES = ("rmsprop", "sgd", "adagrad", "adadelta", "adam", "adamw", "adamax", "lion")
#: The rule ``create`` and the commands use when none is named.
DEFAULT_RULE = "rmsprop"


class UnknownRuleError(ValueError):
    """The name is not one of :data:`RULE_NAMES`; the message lists them."""


def rule(name: str | Rule) -> Rule:
    """The rule called ``name`` (case-insensitive: ``"AdamW"`` too); a :class:`Rule` is returned as it is."""
    if isinstance(name, Rule):
        return name
    key = str(name).lower()
    if key not in RULE_NAMES:
        raise UnknownRuleError(f"unknown optimizer {name!r}; known optimizers: {', '.join(RULE_NAMES)}")
    return importlib.import_module(f"{__name__}.{key}").RULE


def all_rules() -> list[Rule]:
    return [rule(name) for name in RULE_NAMES]


__all__ = ["DEFAULT_RULE", "RULE_NAMES", "Rule", "UnknownRuleError", "all_rules", "rule"]
