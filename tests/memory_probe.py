"""What a program's arrays keep allocated, measured in a fresh process (the allocator's state and
other tests' arrays would blur it otherwise): ``python tests/memory_probe.py SCENARIO VARIANT``
prints the bytes as JSON. ``VARIANT`` is a variant's name or ``stock``."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from program_oracle import make  # noqa: E402


def active() -> int:
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


def tree(leaves: int, size: int, seed: int) -> dict:
    mx.random.seed(seed)
    out = {f"p{i}": mx.random.normal((size,)) for i in range(leaves)}
    mx.eval(out)
    return out


def keep_one_leaf_per_step(variant: str) -> dict:
    """A 1024x1K tree for 40 steps, keeping one parameter of each step (a log, an EMA, a snapshot)."""
    params, grads = tree(1024, 1024, 0), tree(1024, 1024, 1)
    start = active()
    opt = make(variant)
    p = params
    for _ in range(3):  # the optimizer's own memory in place: stock's v, and cpu_kernel's spare w's (step 3 on)
        p = opt.apply_gradients(grads, p)
        mx.eval(p, opt.state)
    before = active()
    kept = []
    for step in range(40):
        p = opt.apply_gradients(grads, p)
        mx.eval(p, opt.state)
        kept.append(p[f"p{step}"])
    return {
        "growth": active() - before,
        "own": before - start,
        "kept_bytes": sum(x.nbytes for x in kept),
        "parameter_bytes": sum(x.nbytes for x in params.values()),
    }


def kept_leaf(variant: str, keep: bool) -> int:
    """Active bytes after 6 steps of a 40x60K tree, keeping (or not) one 240 KB parameter of the second."""
    params, grads = tree(40, 60_000, 0), tree(40, 60_000, 1)
    opt = make(variant)
    p, kept = params, None
    for step in range(6):
        p = opt.apply_gradients(grads, p)
        mx.eval(p, opt.state)
        if step == 1 and keep:
            kept = p["p7"]
    assert kept is not None or not keep
    return active()


def one_kept_leaf(variant: str) -> dict:
    without = kept_leaf(variant, keep=False)
    return {"retained": kept_leaf(variant, keep=True) - without, "leaf_bytes": 60_000 * 4}


def all_dropped(variant: str) -> dict:
    """What stays allocated after 6 steps of a 40x60K tree once the optimizer and every result are
    dropped, while the caller still holds the first parameter and gradient trees; and, for the
    report, what the optimizer alone held before it was dropped."""
    params, grads = tree(40, 60_000, 0), tree(40, 60_000, 1)
    before = active()
    opt = make(variant)
    p = params
    for _ in range(6):
        p = opt.apply_gradients(grads, p)
        mx.eval(p, opt.state)
    del p
    held_by_optimizer = active() - before
    del opt
    return {"left": active() - before, "held_by_optimizer": held_by_optimizer}


SCENARIOS = {
    "keep_one_leaf_per_step": keep_one_leaf_per_step,
    "one_kept_leaf": one_kept_leaf,
    "all_dropped": all_dropped,
}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])))
