"""The optimizer update alone, outside ``mx.compile`` and inside ``mx.compile(inputs=state, outputs=state)``
(the way mlx-lm's trainer compiles a step), interleaved in one process, median per call:

    python scripts/update_in_compile.py cpu_kernel 1x1K 16x1M 256x64K 1024x16K 4096x4K 16384x256 transformer-base

The first argument is a variant name or ``stock``; every timed call evaluates the whole state.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim

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


def main(kind: str, trees: list[str]) -> None:
    for tree in trees:
        runs = {compiled: make(kind, tree, compiled) for compiled in (False, True)}
        for fn, g, state in runs.values():
            for _ in range(3):
                fn(g)
                mx.eval(state)
        times: dict[bool, list[float]] = {False: [], True: []}
        end = time.time() + SECONDS
        while time.time() < end:
            for compiled, (fn, g, state) in runs.items():
                start = time.perf_counter()
                fn(g)
                mx.eval(state)
                times[compiled].append(time.perf_counter() - start)
        outside, inside = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"{kind} {tree}: outside {outside * 1e3:.3f} ms, inside compile {inside * 1e3:.3f} ms, "
            f"ratio {inside / outside:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
