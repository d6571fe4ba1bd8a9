"""Deprecated aliases for the modules that moved into ``kernels/``, ``measure/`` and ``analysis/`` in 0.2.

``import rmsprop_impls.results`` (and every other 0.1 module path) still works
for one release: it warns with ``DeprecationWarning`` and hands back the module
at its new place, the same object, so monkeypatching either name patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: 0.1 module (under rmsprop_impls) -> its place since 0.2.
MOVED: dict[str, str] = {
    "gpu_kernels": "kernels.gpu_kernels",
    "multi_tensor": "kernels.multi_tensor",
    "packing": "kernels.packing",
    "_cpu_ext": "kernels._cpu_ext",
    "timing": "measure.timing",
    "bandwidth": "measure.bandwidth",
    "compare": "measure.compare",
    "choose": "measure.choose",
    "choice_cache": "measure.choice_cache",
    "profile": "measure.profile",
    "trees": "measure.trees",
    "variants.auto": "measure.auto",
    "suite": "analysis.suite",
    "results": "analysis.results",
    "regressions": "analysis.regressions",
    "plots": "analysis.plots",
    "report": "analysis.report",
    "dashboard": "analysis.dashboard",
    "tables": "analysis.tables",
}
_PACKAGE = __name__.rpartition(".")[0]


def moved_module(old: str) -> ModuleType:
    """The module that ``rmsprop_impls.<old>`` became, imported, after a deprecation warning."""
    new = f"{_PACKAGE}.{MOVED[old]}"
    warnings.warn(f"{_PACKAGE}.{old} moved to {new}; the old name goes in 0.3", DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import rmsprop_impls.<old>`` with the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{_PACKAGE}.")
        if fullname.startswith(f"{_PACKAGE}.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return moved_module(spec.name.removeprefix(f"{_PACKAGE}."))

    def exec_module(self, module):
        """Nothing to run: ``create_module`` handed back a module that is already imported."""


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
