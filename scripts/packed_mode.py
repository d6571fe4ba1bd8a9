"""Would a packed-for-the-run mode pay? Times, on one many-leaf tree, a whole training step on the
per-leaf path (forward and backward, then a ``cpu_kernel`` step) against the least a packed mode
must still do each step: hand the model one array per leaf (views into the flat parameters), pack
the per-leaf gradients into one buffer, and run one kernel call over the flat buffers.

    python scripts/packed_mode.py 4096x256 16384x256

Medians of interleaved rounds, in ms and us per leaf; every timed result is evaluated.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from rmsprop_impls import create
from rmsprop_impls.kernels import _cpu_ext
from rmsprop_impls.measure.trees import leaves_of, tree_by_name


def loss(params: dict, x: mx.array) -> mx.array:
    """A forward pass that touches every leaf once: the sum over leaves of (w * x)^2."""
    return sum(((w * x[: w.shape[-1]]) ** 2).sum() for w in leaves_of(params))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def measure(tree: str, rounds: int) -> dict[str, float]:
    params = tree_by_name(tree)
    x = mx.random.normal((max(w.shape[-1] for w in leaves_of(params)),))
    opt = create("cpu_kernel", 1e-3)
    grad_fn = mx.value_and_grad(loss)
    grads = grad_fn(params, x)[1]
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state, grads)

    shapes = [w.shape for w in leaves_of(params)]
    sizes = [w.size for w in leaves_of(params)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    flat_w = mx.concatenate([w.reshape(-1) for w in leaves_of(params)])
    flat_v = mx.zeros_like(flat_w)
    mx.eval(flat_w, flat_v)
    lr = mx.array(1e-3)

    def views() -> list[mx.array]:
        return [flat_w[o : o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)]

    def pack() -> mx.array:
        return mx.concatenate([g.reshape(-1) for g in leaves_of(grads)])

    flat_g = pack()
    mx.eval(flat_g)

    def flat_step() -> list[mx.array]:
        nw, nv = _cpu_ext.rmsprop_update([flat_w], [flat_g], [flat_v], lr, 0.99, 1e-8, opt.threads)
        return nw + nv

    def backward() -> object:
        return grad_fn(params, x)[1]

    def step() -> object:
        nonlocal params
        params = opt.apply_gradients(grads, params)
        return params, opt.state

    parts = {"forward+backward": backward, "per-leaf step": step, "views": views, "pack": pack, "flat step": flat_step}
    samples: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in samples.items()} | {"leaves": len(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", default=["4096x256", "16384x256"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for tree in args.trees:
        m = measure(tree, args.rounds)
        n = m.pop("leaves")
        per_leaf = "  ".join(f"{k} {v * 1e3:.1f} ms ({v / n * 1e6:.2f} us/leaf)" for k, v in m.items())
        training = m["forward+backward"] + m["per-leaf step"]
        packed = m["forward+backward"] + m["views"] + m["pack"] + m["flat step"]
        print(f"{tree}: {per_leaf}")
        print(
            f"  training step, per leaf: {training * 1e3:.1f} ms; packed, at least: {packed * 1e3:.1f} ms "
            f"({packed / training:.2f}x); the per-leaf optimizer step is {m['per-leaf step'] / training:.0%} of it"
        )


if __name__ == "__main__":
    main()
