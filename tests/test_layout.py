"""The folders are the layers: no module imports from a layer above its own, and 0.1's module paths still work."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import rmsprop_impls
from rmsprop_impls._moved import MOVED

PACKAGE = Path(rmsprop_impls.__file__).parent
#: Lower number, lower layer: the top-level modules (the one interface, the math, the registry) first, then the
#: kernels, the variants built on them, measuring, reading results, the command line. The package's __init__ is its
#: facade; the registry names the variants by string, so it imports none of them.
LAYERS = {"core": 0, "kernels": 1, "variants": 2, "measure": 3, "analysis": 4, "cli": 5}


def _layer_of(module: str) -> int:
    """``module`` is dotted, relative to the package: ``measure.trees``, ``registry``."""
    top = module.split(".")[0]
    return LAYERS.get(top, LAYERS["core"])


def _imported_modules(path: Path) -> list[str]:
    """Every package-internal module ``path`` imports, dotted relative to the package."""
    own = path.relative_to(PACKAGE).with_suffix("").parts
    package_parts = list(own[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            found += [".".join([*target, alias.name]) if not node.module else ".".join(target) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rmsprop_impls."):
            found.append(node.module.removeprefix("rmsprop_impls."))
    return found


@pytest.mark.parametrize(
    "path",
    [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_upward_import(path):
    own = _layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = [m for m in _imported_modules(path) if _layer_of(m) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a higher layer: {upward}"


def test_the_top_level_shows_the_layers():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert {"variants", "kernels", "measure", "analysis", "cli"} <= folders
    assert not set(MOVED) & {p.stem for p in PACKAGE.glob("*.py")}, "a moved module is back at the top"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_warns_and_is_the_moved_module(old):
    sys.modules.pop(f"rmsprop_impls.{old}", None)
    if old == "_cpu_ext" and "rmsprop_impls.kernels._cpu_ext" not in sys.modules:
        try:
            importlib.import_module("rmsprop_impls.kernels._cpu_ext")
        except ImportError as e:
            pytest.skip(f"the C++ extension does not load here: {e}")
    with pytest.warns(DeprecationWarning, match=f"rmsprop_impls.{old} moved to rmsprop_impls.{MOVED[old]}"):
        module = importlib.import_module(f"rmsprop_impls.{old}")
    assert module is importlib.import_module(f"rmsprop_impls.{MOVED[old]}")


def test_documented_old_paths_keep_working(monkeypatch):
    monkeypatch.delitem(sys.modules, "rmsprop_impls.results", raising=False)
    if "trees" in vars(rmsprop_impls):  # an earlier import of the old name set it (else the package's __getattr__)
        monkeypatch.delattr(rmsprop_impls, "trees")
    with pytest.warns(DeprecationWarning):
        from rmsprop_impls.results import load_asv_results
    from rmsprop_impls.analysis.results import load_asv_results as moved

    assert load_asv_results is moved
    with pytest.warns(DeprecationWarning):
        assert rmsprop_impls.trees is importlib.import_module("rmsprop_impls.measure.trees")
