"""Which variants exist, which run here, and how to make one.

Each variant lives in its own module under ``rmsprop_impls.variants`` and is
imported only when asked for, so one that cannot import (a missing compiled
extension, say) is reported unavailable instead of breaking the package.
"""

from __future__ import annotations

import importlib
import inspect

from .optimizer import LearningRate, OptimizerBase
from .rules import DEFAULT_RULE, Rule, rule

#: variant name -> module (under rmsprop_impls) that defines ``VARIANT``.
_MODULES: dict[str, str] = {
    "eager": "variants.eager",
    "compiled": "variants.compiled",
    "flat": "variants.flat",
    "cpu_stream": "variants.cpu_stream",
    "cpu_kernel": "variants.cpu_kernel",
    "metal_kernel": "variants.metal_kernel",
    "cuda_kernel": "variants.cuda_kernel",
}

#: Optimizers that ``create`` makes but that pick among the variants rather than being one, so
#: ``variant_names`` (what the benchmarks, the agreement tests and ``choose`` loop over) leaves them out.
#: ``auto`` chooses by timing, so it lives with the measuring code.
_SELECTORS: dict[str, str] = {"auto": "measure.auto"}


class UnknownVariantError(ValueError):
    """The name is not a registered variant; the message lists the known ones."""


class VariantUnavailableError(RuntimeError):
    """The variant exists but cannot run on this machine; ``reason`` says why."""

    def __init__(self, variant: str, reason: str):
        self.variant = variant
        self.reason = reason
        super().__init__(f"variant '{variant}' is unavailable here: {reason}")


def variant_names() -> list[str]:
    """Every variant the package knows, including those that cannot run here."""
    return list(_MODULES)


def variant_class(name: str) -> type[OptimizerBase]:
    """The class behind ``name``; raises if unknown or if its module cannot import."""
    modules = {**_MODULES, **_SELECTORS}
    if name not in modules:
        raise UnknownVariantError(f"unknown variant '{name}'; known variants: {', '.join(modules)}")
    try:
        module = importlib.import_module(f"rmsprop_impls.{modules[name]}")
    except ImportError as e:
        raise VariantUnavailableError(name, f"cannot import its module: {e}") from e
    return module.VARIANT


def variant_device(name: str, resolve: bool = True) -> str:
    """Where variant ``name`` runs: ``"cpu"`` or ``"gpu"`` now, or as declared (``"default"`` too) unresolved."""
    cls = variant_class(name)
    return cls.concrete_device() if resolve else cls.device


def unavailable_reason(name: str) -> str | None:
    """``None`` where ``name`` runs here, else the reason it does not."""
    try:
        return variant_class(name).unavailable_reason()
    except VariantUnavailableError as e:
        return e.reason


def availability() -> dict[str, str | None]:
    """Each variant -> ``None`` if it runs here, else why it does not."""
    return {name: unavailable_reason(name) for name in _MODULES}


def available_variants() -> list[str]:
    return [name for name, reason in availability().items() if reason is None]


def partition_available(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` (default: every variant) into those that run here and, for the rest, why not."""
    names = variant_names() if names is None else names
    reasons = {name: unavailable_reason(name) for name in names}
    runnable = [name for name, reason in reasons.items() if reason is None]
    return runnable, {name: reason for name, reason in reasons.items() if reason is not None}


def create(
    name: str,
    learning_rate: LearningRate,
    *hyper,
    optimizer: str | Rule = DEFAULT_RULE,
    **options,
) -> OptimizerBase:
    """A ready optimizer of variant ``name`` running rule ``optimizer`` (RMSprop by default), a drop-in for its
    stock class: ``create("cpu_kernel", 1e-3, optimizer="adamw", weight_decay=0.1)``.

    ``hyper`` and the named ``options`` are the rule's hyper-parameters (stock's names, defaults and checks) and
    the variant's own options (``threads``, ``precision``).
    """
    cls = variant_class(name)
    the_rule = rule(optimizer)
    reason = cls.unavailable_reason()
    if reason is not None:
        raise VariantUnavailableError(name, reason)
    own = set(inspect.signature(cls.__init__).parameters) - {"self", "learning_rate", "hyper", "named", "optimizer"}
    accepted = own | set(the_rule.defaults)
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise TypeError(
            f"variant '{name}' of {the_rule.title} got unknown option(s) {', '.join(unknown)}; it takes: {takes}"
        )
    return cls(learning_rate, *hyper, optimizer=the_rule, **options)
