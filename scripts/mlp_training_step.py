"""Issue 23's reference training step: 4 x nn.Linear(2048, 2048), batch 8, float32, MSE loss, eager or
compiled as mlx-lm compiles it (``inputs=outputs=[model.state, optimizer.state]``). Median of steps 4-12:

    python scripts/mlp_training_step.py cpu_kernel compiled

KIND is a variant, ``stock``, or ``none`` (forward and backward only); MODE is ``eager`` or ``compiled``.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import rmsprop_impls


def main(kind: str, mode: str, steps: int = 12) -> None:
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])
    mx.eval(model.parameters())
    opt = optim.RMSprop(1e-4) if kind in ("stock", "none") else rmsprop_impls.create(kind, 1e-4)
    x, y = mx.random.normal((8, 2048)), mx.random.normal((8, 2048))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        if kind == "none":
            return loss, grads
        opt.update(model, grads)
        return loss

    state = [model.state, opt.state]
    fn = partial(mx.compile, inputs=state, outputs=state)(step) if mode == "compiled" else step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(fn(x, y), state)
        times.append(time.perf_counter() - start)
    print(f"{kind} {mode} {statistics.median(times[3:]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:3])
