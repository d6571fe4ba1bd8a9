"""The optimizer update alone, outside ``mx.compile`` and inside ``mx.compile(inputs=state, outputs=state)``
(the way mlx-lm's trainer compiles a step), interleaved in one process, median per call:

    python scripts/update_in_compile.py cpu_kernel 1x1K 16x1M 256x64K 1024x16K 4096x4K 16384x256 transformer-base

The first argument is a variant name or ``stock``; every timed call evaluates the whole state. Beside them, in
the same rounds, MLX's own floor for such a call: the same state (w and v per leaf) compiled the same way around
the least an update can be, one elementwise op per array it outputs (``w - lr * g``, ``v + g``). No update
inside ``mx.compile`` can cost less than that, so where the floor alone is over 1.25 times the update outside,
the 1.25x target is out of any variant's reach.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

import rmsprop_impls
from rmsprop_impls.measure.trees import random_like, tree_by_name

SECONDS = 6


def make(kind: str, tree: str, compiled: bool):
    params = tree_by_name(tree)
    grads = random_like(params)
    mx.eval(params, grads)
    opt = optim.RMSprop(1e-3) if kind == "stock" else rmsprop_impls.create(kind, 1e-3)
    opt.init(params)
    holder = {"p": params}
    state = [holder, opt.state]

    def step(g):
        holder["p"] = opt.apply_gradients(g, holder["p"])
        return holder["p"]

    return (partial(mx.compile, inputs=state, outputs=state)(step) if compiled else step), grads, state


def floor(tree: str):
    """MLX's floor for a compiled update of this state: one elementwise op per output array, compiled the same way."""
    params = tree_by_name(tree)
    grads = random_like(params)
    holder = {"p": params, "v": tree_map(mx.zeros_like, params)}
    mx.eval(holder, grads)
    state = [holder]

    def step(g):
        holder["p"] = tree_map(lambda w, g: w - 1e-3 * g, holder["p"], g)
        holder["v"] = tree_map(lambda v, g: v + g, holder["v"], g)
        return holder["p"]

    return partial(mx.compile, inputs=state, outputs=state)(step), grads, state


def main(kind: str, trees: list[str]) -> None:
    for tree in trees:
        runs = {"outside": make(kind, tree, False), "inside": make(kind, tree, True), "floor": floor(tree)}
        for fn, g, state in runs.values():
            for _ in range(3):
                fn(g)
                mx.eval(state)
        times: dict[str, list[float]] = {name: [] for name in runs}
        end = time.time() + SECONDS
        while time.time() < end:
            for name, (fn, g, state) in runs.items():
                start = time.perf_counter()
                fn(g)
                mx.eval(state)
                times[name].append(time.perf_counter() - start)
        outside, inside, least = (statistics.median(times[name]) for name in runs)
        print(
            f"{kind} {tree}: outside {outside * 1e3:.3f} ms, inside compile {inside * 1e3:.3f} ms, "
            f"ratio {inside / outside:.2f}; MLX's floor inside compile {least * 1e3:.3f} ms, "
            f"{least / outside:.2f} of outside",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
