"""Shared by the program tests: a variant and its stock class (``mlx.optimizers.RMSprop`` unless a rule is
named) run the same program, and every array the program holds is compared bit for bit (NaN and -0.0
included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from rmsprop_impls import available_variants, create
from rmsprop_impls.rules import rule

#: Far from the defaults (alpha=0.99, eps=1e-8), so a variant that drops or swaps one fails.
LR, ALPHA, EPS = 0.03, 0.8, 1e-4
VARIANTS = available_variants()
UNSIGNED = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
#: Ways a program makes a second array over a 1-D array's buffer.
ALIASES = {
    "reshape": lambda v: mx.reshape(v, (-1,)),
    "stop_gradient": mx.stop_gradient,
    "contiguous": mx.contiguous,
    "as_strided": lambda v: mx.as_strided(v, v.shape, (1,)),
}


def make(variant: str, learning_rate: Any = LR, name: str = "rmsprop", hyper: dict | None = None) -> optim.Optimizer:
    """``variant``'s optimizer for rule ``name``, or its stock class for ``"stock"``; RMSprop with the tests'
    hyper-parameters by default."""
    if hyper is None:
        hyper = {"alpha": ALPHA, "eps": EPS} if name == "rmsprop" else {}
    if variant == "stock":
        return rule(name).stock(learning_rate, **hyper)
    return create(variant, learning_rate, optimizer=name, **hyper)


def bits(x: mx.array) -> np.ndarray:
    """The raw bits of ``x``: equal bits are the only equality the programs' oracle accepts."""
    mx.eval(x)
    return np.array(x.view(UNSIGNED[x.dtype.size])) if x.size else np.zeros((0,), np.uint8)


def as_float(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float64) if x.dtype != mx.float64 else x)


def difference(a: mx.array, b: mx.array, any_nan: bool = False) -> str | None:
    """``None`` where ``a`` and ``b`` hold the same bits, else what differs (for the failure message);
    with ``any_nan``, a NaN equals any NaN (its sign and payload are not stock's promise)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {a.shape} against {b.dtype} {b.shape}"
    ba, bb = bits(a), bits(b)
    if np.array_equal(ba, bb):
        return None
    fa, fb = as_float(a).reshape(-1), as_float(b).reshape(-1)
    differ = ba.reshape(-1) != bb.reshape(-1)
    if any_nan and a.dtype in (mx.float32, mx.float16, mx.bfloat16, mx.float64):
        differ &= ~(np.isnan(fa) & np.isnan(fb))
    wrong = np.flatnonzero(differ)
    if not wrong.size:
        return None
    i = wrong[0]
    return f"{len(wrong)} of {a.size} elements differ, first at {i}: {fa[i]:.9g} against stock's {fb[i]:.9g}"


def differences(got: Any, want: Any, any_nan: bool = False) -> list[str]:
    """Every array of ``got`` whose bits differ from ``want``'s (trees of one layout), by path."""
    fg, fw = tree_flatten(got), tree_flatten(want)
    if [k for k, _ in fg] != [k for k, _ in fw]:
        return [f"the trees differ: {[k for k, _ in fg]} against stock's {[k for k, _ in fw]}"]
    out = []
    for (path, a), (_, b) in zip(fg, fw):
        why = difference(a, b, any_nan)
        if why is not None:
            out.append(f"{path or '<array>'}: {why}")
    return out


def assert_same_bits(got: Any, want: Any, what: str = "", any_nan: bool = False) -> None:
    wrong = differences(got, want, any_nan)
    assert not wrong, f"{what}: " + "; ".join(wrong)


def same_program(
    variant: str,
    program: Callable[[optim.Optimizer], Any],
    learning_rate: Any = LR,
    setting: tuple[str, dict | None] = ("rmsprop", None),
) -> Any:
    """Runs ``program`` (optimizer -> every array it holds) on ``variant`` and on stock, for the rule and
    hyper-parameters of ``setting`` (the tests' RMSprop by default); same bits."""
    got = program(make(variant, learning_rate, *setting))
    want = program(make("stock", learning_rate, *setting))
    assert_same_bits(got, want, variant)
    return got


def snapshot(tree: Any) -> list[tuple[str, mx.Dtype, tuple, np.ndarray]]:
    """Every array of ``tree`` as it is now, to check later that nothing wrote into them."""
    return [(k, x.dtype, tuple(x.shape), bits(x)) for k, x in tree_flatten(tree)]


def changed_since(tree: Any, before: list[tuple[str, mx.Dtype, tuple, np.ndarray]]) -> list[str]:
    now = snapshot(tree)
    if [k for k, *_ in now] != [k for k, *_ in before]:
        return [f"its entries changed: {[k for k, *_ in before]} -> {[k for k, *_ in now]}"]
    return [k for (k, d, s, b), (_, d0, s0, b0) in zip(now, before) if (d, s) != (d0, s0) or not np.array_equal(b, b0)]
