"""Times one rule's ``cpu_kernel`` at an earlier commit against this checkout's, interleaved in one process.

Timings taken in separate processes drift on a shared machine by more than the changes they compare
(10-30% from one process to the next here). So the earlier commit's package is extracted
(``git archive``) under another name, ``rmsprop_before``, its own extension built as usual (the user
cache keys it by its sources), and both optimizers step round-robin on the same trees
(``time_interleaved``). Printed per tree: the median step of each and their ratio::

    python scripts/before_after.py c57ea4d --tree 1x1K 16x1M 256x64K 1024x16K 4096x4K 16384x256 transformer-base

Back to back, each step finds the machine busy from the last. In a training loop forward and backward
run between two steps, and MLX's CPU ops there mostly keep one core busy: ``--between idle`` sleeps
and ``--between one-core`` streams memory on one thread for 50 ms before every step, untimed.
``--gradients transposed`` hands every matrix's gradient over as backward hands a Linear's weight
gradient: the transpose of a row-major matrix::

    python scripts/before_after.py f2614ed --tree mlp-base transformer-base --gradients transposed
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from rmsprop_impls import create
from rmsprop_impls.measure.timing import time_interleaved
from rmsprop_impls.measure.trees import random_like, tree_by_name
from rmsprop_impls.rules import RULE_NAMES

REPO = Path(__file__).resolve().parent.parent
# The package's absolute self-references ("rmsprop_impls.variants.eager" in the registry).
SELF_REFERENCE = re.compile(r"""(["'])rmsprop_impls\.""")
# A C++ class the extension binds: nanobind registers one type per C++ name in the process.
BOUND_CLASS = re.compile(r"nb::class_<(\w+)>")


def rename_bound_classes(extension: Path) -> None:
    """Renames the earlier extension's bound C++ classes (keeping their Python names), so that both
    extensions load in one process: the second ``TreeStep`` is otherwise refused as already registered."""
    sources = [p for p in extension.rglob("*") if p.suffix in (".cpp", ".h")]
    names = {name for p in sources for name in BOUND_CLASS.findall(p.read_text())}
    for source in sources:
        text = source.read_text()
        for name in names:
            text = re.sub(rf"\b{name}\b", f"{name}Before", text).replace(f'"{name}Before"', f'"{name}"')
        source.write_text(text)


def import_before(commit: str, into: Path):
    """``rmsprop_impls`` as it was at ``commit``, imported as ``rmsprop_before`` from ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "rmsprop_impls"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        sys.exit(f"before_after: git archive {commit}: {archive.stderr.decode().strip()}")
    tar_path = into / "before.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    package = into / "rmsprop_before"
    (into / "rmsprop_impls").rename(package)
    for source in package.rglob("*.py"):
        text = source.read_text()
        source.write_text(SELF_REFERENCE.sub(r"\1rmsprop_before.", text))
    rename_bound_classes(package / "kernels" / "_cpu_ext")
    sys.path.insert(0, str(into))
    return importlib.import_module("rmsprop_before")


GAP_S = 0.05


def idle() -> None:
    time.sleep(GAP_S)


def one_core() -> None:
    """Streams 128 MB on one thread (NumPy's elementwise ops are single-threaded) until the gap is over."""
    a, b = np.ones(16 << 20, np.float32), np.empty(16 << 20, np.float32)
    end = time.perf_counter() + GAP_S
    while time.perf_counter() < end:
        np.add(a, 1.0, out=b)


BETWEEN = {"nothing": None, "idle": idle, "one-core": one_core}


def transposed(grads):
    """The same values, each matrix laid out as the transpose of a row-major one (column-major)."""
    return tree_map(lambda g: mx.contiguous(g.T).T if g.ndim == 2 else g, grads)


GRADIENTS = {"row-major": lambda grads: grads, "transposed": transposed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the earlier commit (or branch, or tag)")
    parser.add_argument("--tree", nargs="+", default=["1x1K", "16x1M", "16384x256"])
    parser.add_argument("--optimizer", default="rmsprop", choices=RULE_NAMES)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per tree")
    parser.add_argument(
        "--between", choices=BETWEEN, default="nothing", help="what runs, untimed, for 50 ms before every step"
    )
    parser.add_argument(
        "--gradients", choices=GRADIENTS, default="row-major",
        help="the matrices' gradients row-major, or transposed as backward gives a Linear's weights",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="before-after-") as where:
        before = import_before(args.commit, Path(where))
        # An earlier package may predate the optimizer argument: RMSprop, its default, is asked for by omission.
        rule = {} if args.optimizer == "rmsprop" else {"optimizer": args.optimizer}
        print(f"| tree | {args.commit} | this checkout | this / {args.commit} |")
        print("|---|---|---|---|")
        for tree_name in args.tree:
            params = tree_by_name(tree_name)
            grads = GRADIENTS[args.gradients](random_like(params))
            mx.eval(grads)
            pair = {"before": before.create("cpu_kernel", 1e-3, **rule), "after": create("cpu_kernel", 1e-3, **rule)}
            timings = time_interleaved(
                pair, params, grads, args.budget, min_rounds=10, warmup=5, between=BETWEEN[args.between]
            )
            median = {side: statistics.median(t.samples) for side, t in timings.items()}
            print(
                f"| {tree_name} | {median['before'] * 1e3:.4f} ms | {median['after'] * 1e3:.4f} ms | "
                f"{median['after'] / median['before']:.2f} |",
                flush=True,
            )
            del params, grads, pair, timings
            mx.clear_cache()


if __name__ == "__main__":
    main()
