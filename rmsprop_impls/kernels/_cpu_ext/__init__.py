"""The ``cpu_kernel`` variant's C++ extension: ``rmsprop_cpu.cpp``, its CMake build and the compiled ``_ext``.

It runs every rule through kernels generated from the rules' traces (``generate.py`` writes
``generated/*.h``); :func:`kernel_for` finds the one for a rule's hyper-parameters, and
:func:`rmsprop_update` is the RMSprop step of the tests and the import-time checks.

``_ext`` is loaded on first use of one of its names (``_cpu_ext.rmsprop_update``), from

1. the directory in ``$RMSPROP_BENCH_CPU_EXT_DIR``, when set: a prebuilt ``_ext*.so``
   (the CI lanes build their own with ``build.build_extension``);
2. else the per-user cache, where ``build.cached_extension`` builds it for the running
   mlx on first use (``RMSPROP_BENCH_NO_EXTENSION=1`` says not to, and not to load it).

Where it cannot load, using it raises :class:`ExtensionUnavailable` (an ``ImportError``)
with the reason: the build's first error line, ``unsupported platform``, and so on.
It refuses to load under another mlx than the one it was built against, since
MLX's C++ ABI changes between releases.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import build

if TYPE_CHECKING:
    from ...rules import Rule

DIR_VARIABLE = "RMSPROP_BENCH_CPU_EXT_DIR"
SKIP_VARIABLE = "RMSPROP_BENCH_NO_EXTENSION"

_FROM_EXT = {
    "EAGER_MAX_ELEMENTS",
    "MLX_VERSION",
    "STREAM_MIN_BYTES",
    "donated_buffers",
    "hardware_threads",
    "huge_page_moves",
    "huge_page_tries",
    "optimizer_update",
    "states_updated_in_place",
    "TreeStep",
    "w_into_spares",
    "w_updated_in_place",
    "uses_avx2",
}
__all__ = sorted(_FROM_EXT - {"MLX_VERSION"}) + ["Kernel", "kernel_for", "rmsprop_update"]


class ExtensionUnavailable(ImportError):
    """``_ext`` cannot load here; the message is the reason, one line."""


_loaded: ModuleType | None = None
_failure: ExtensionUnavailable | None = None


def load() -> ModuleType:
    """The ``_ext`` module, built first if need be; else raises :class:`ExtensionUnavailable`, the same each call."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise _failure
    try:
        _loaded = _import(_find())
    except ExtensionUnavailable as e:
        _failure = e
        raise
    return _loaded


def _find() -> Path:
    if os.environ.get(DIR_VARIABLE):
        where = Path(os.environ[DIR_VARIABLE])
        found = sorted(where.glob("_ext*.so"))
        if not found:
            raise ExtensionUnavailable(f"${DIR_VARIABLE} is {where}, which holds no _ext*.so")
        return found[0]
    if os.environ.get(SKIP_VARIABLE) == "1":
        raise ExtensionUnavailable(f"{SKIP_VARIABLE}=1 is set, so it is neither built nor loaded")
    try:
        return build.cached_extension()
    except build.BuildError as e:
        raise ExtensionUnavailable(
            f"its build failed: {e.reason}" + (f" (log: {e.log})" if e.log else "") + "; after fixing that, "
            "python -m rmsprop_impls.kernels._cpu_ext.build --force rebuilds it"
        ) from e


def _import(path: Path) -> ModuleType:
    import mlx.core as mx  # loads libmlx and registers mx.array with nanobind before _ext needs them

    name = f"{__name__}._ext"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise ExtensionUnavailable(f"{path} does not load: {e}") from e
    if module.MLX_VERSION != mx.__version__:
        raise ExtensionUnavailable(
            f"{path} was built against mlx {module.MLX_VERSION} but mlx {mx.__version__} is running"
        )
    registries = build.mlx_nanobind_keys()
    if len(registries) > 1:
        raise ExtensionUnavailable(
            f"{path} was built with another nanobind than mlx.core (registries {', '.join(registries)}): "
            "it could not take an mx.array"
        )
    sys.modules[name] = module
    return module


@dataclass(frozen=True)
class Kernel:
    """A generated kernel for one rule's hyper-parameters: its index in the extension and its slot values."""

    index: int
    slots: tuple[float, ...]


def kernel_for(rule: Rule, hyper: Mapping[str, Any]) -> Kernel | None:
    """The generated kernel that runs ``rule`` at ``hyper``, or ``None`` where none does (then stock's ops run).
    Checks that the loaded extension was generated from these rules (a stale build would run other math)."""
    frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in hyper.items())
    return _kernel_for(rule, frozen)


@functools.lru_cache(maxsize=256)
def _kernel_for(rule: Rule, hyper: tuple) -> Kernel | None:
    from . import generate  # imports the rules, so mlx: not needed to build

    trace = rule.trace(dict(hyper))
    index = generate.kernel_index(trace)
    if index is None:
        return None
    table = load().kernels_table()
    if index >= len(table) or table[index][1] != generate.digest(trace):
        raise ExtensionUnavailable(
            f"the loaded extension's kernel {index} is not {rule.title}'s at {dict(hyper)}: it was built from "
            "other rules; rebuild it (python -m rmsprop_impls.kernels._cpu_ext.build --force)"
        )
    return Kernel(index, tuple(trace.slots))


def rmsprop_update(w, g, v, lr, alpha: float, eps: float, threads: int, precision: str = "stock"):
    """RMSprop's step over lists of leaves through the generic entry point: ``(new w list, new v list)``."""
    from ...rules import rule

    kernel = kernel_for(rule("rmsprop"), {"alpha": alpha, "eps": eps})
    new_w, states = load().optimizer_update(kernel.index, kernel.slots, w, g, [v], lr, [], threads, precision)
    return new_w, states[0]


def __getattr__(name: str):
    if name in _FROM_EXT:
        return getattr(load(), name)
    if name == "_ext":
        return load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
