"""Shared by the agreement tests: run a variant, stock MLX and the float64 reference side by side."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from rmsprop_impls import create, reference_step
from rmsprop_impls.reference import ROUNDING, largest_step, tolerance  # noqa: F401 (the tests import them here)


def gradient_sequence(params, steps: int, seed: int = 0):
    """Gradients bounded away from zero: in float16 stock RMSprop divides by zero
    once (1-alpha)*g^2 underflows, because eps=1e-8 rounds to 0 there."""
    key = mx.random.key(seed)
    out = []
    for k in mx.random.split(key, steps):
        leaves = tree_flatten(params)
        keys = iter(mx.random.split(k, max(2 * len(leaves), 2)))

        def one(x, keys=keys):
            mag = mx.random.uniform(0.05, 2.0, x.shape, key=next(keys))
            sign = mx.where(mx.random.bernoulli(0.5, x.shape, key=next(keys)), 1.0, -1.0)
            return (mag * sign).astype(x.dtype)

        out.append(tree_map(one, params))
    mx.eval(out)
    return out


def as_f64(tree):
    return [np.array(x.astype(mx.float32), dtype=np.float64) for _, x in tree_flatten(tree)]


def run(opt, params, grads):
    for g in grads:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params


def reference(params, grads, learning_rate, alpha=0.99, eps=1e-8):
    """Final (w, v) leaves of the float64 reference; ``learning_rate`` may be a schedule."""
    w = as_f64(params)
    v = [np.zeros_like(x) for x in w]
    for step, g in enumerate(grads):
        lr = float(learning_rate(mx.array(step))) if callable(learning_rate) else learning_rate
        pairs = [reference_step(wi, gi, vi, lr, alpha, eps) for wi, gi, vi in zip(w, as_f64(g), v)]
        w, v = [p[0] for p in pairs], [p[1] for p in pairs]
    return w, v


def max_rel_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    errs = [np.max(np.abs(a - e) / (1 + np.abs(e)), initial=0.0) for a, e in zip(actual, expected)]
    return max(errs, default=0.0)


def v_leaves(state):
    return [np.array(x.astype(mx.float32), dtype=np.float64) for k, x in tree_flatten(state) if k.endswith(".v")]


def check_against_reference_and_stock(variant, params, grads, learning_rate, alpha=0.99, eps=1e-8, **options):
    """Run ``variant`` and stock over ``grads``; both must stay within tolerance of float64."""
    dtype = next((x.dtype for _, x in tree_flatten(params)), mx.float32)
    tol = tolerance(dtype, len(grads))
    w_tol = tolerance(dtype, len(grads), largest_step(learning_rate, alpha))
    opt = create(variant, learning_rate, alpha=alpha, eps=eps, **options)
    stock = optim.RMSprop(learning_rate, alpha=alpha, eps=eps)
    got = run(opt, params, grads)
    want = run(stock, params, grads)
    ref_w, ref_v = reference(params, grads, learning_rate, alpha, eps)
    assert max_rel_error(as_f64(got), ref_w) <= w_tol, f"{variant} w drifts from float64"
    assert max_rel_error(v_leaves(opt.state), ref_v) <= tol, f"{variant} v drifts from float64"
    assert max_rel_error(as_f64(want), ref_w) <= w_tol, "stock drifts from float64 (tolerance too tight)"
    assert max_rel_error(as_f64(got), as_f64(want)) <= 2 * w_tol, f"{variant} disagrees with stock"
    assert int(opt.state["step"]) == len(grads)
    return opt, got


# ------------------------------------------------------------------ every rule ---

#: Hyper-parameters far from stock's defaults, put over each of a rule's ``configurations()`` without changing
#: the branch it takes: a value > 0 stays > 0, a zero stays zero (momentum, dampening, weight decay).
FAR = {"alpha": 0.7, "eps": 1e-3, "rho": 0.6, "betas": [0.7, 0.85], "momentum": 0.6, "dampening": 0.3}
FAR_WEIGHT_DECAY = 0.05


def far_from_defaults(hyper: dict) -> dict:
    """``hyper`` with every value that does not choose a branch moved far from stock's default."""
    out = dict(hyper)
    for key, value in FAR.items():
        if key in out and not (key in ("momentum", "dampening") and out[key] <= 0):
            out[key] = value
    if out.get("weight_decay", 0) > 0:
        out["weight_decay"] = FAR_WEIGHT_DECAY
    return out


def rule_settings(names=None) -> list[tuple[str, dict]]:
    """``(rule name, hyper-parameters)``: every configuration of every rule (or of ``names``), far from the
    defaults; the branches (momentum, Nesterov, dampening, weight decay, bias correction) as configured."""
    from rmsprop_impls.rules import RULE_NAMES, rule

    return [(name, far_from_defaults(c)) for name in names or RULE_NAMES for c in rule(name).configurations()]


#: The hyper-parameters that choose a branch of some rule's update; a test id names those that are on.
BRANCHES = ("momentum", "dampening", "nesterov", "weight_decay", "bias_correction")


def setting_id(name: str, hyper: dict) -> str:
    """A short test id: the rule and its branches that are on (``sgd-momentum-nesterov``)."""
    return "-".join([name, *(k for k in BRANCHES if hyper.get(k))])


def make_optimizer(variant: str, learning_rate, name: str, hyper: dict, **options):
    """``variant``'s optimizer for rule ``name``, or the stock class for ``"stock"``."""
    from rmsprop_impls.rules import rule

    if variant == "stock":
        return rule(name).stock(learning_rate, **hyper)
    return create(variant, learning_rate, optimizer=name, **hyper, **options)


def special_values(dtype: mx.Dtype) -> mx.array:
    """Zero, negative zero, a subnormal of ``dtype``, the infinities and NaN."""
    subnormal = {mx.float16: 2.0**-20, mx.bfloat16: 2.0**-130, mx.float32: 2.0**-140}[dtype]
    return mx.array([0.0, -0.0, subnormal, -subnormal, float("inf"), -float("inf"), float("nan")]).astype(dtype)


def with_special_values(grads: list, every: int = 3) -> list:
    """``grads`` with the special values written over the first elements of every leaf on every ``every``-th step,
    at positions that move with the step, so that NaN and infinity reach w and the state at different times."""
    out = []
    for step, g in enumerate(grads):
        if step % every:
            out.append(g)
            continue

        def put(x, step=step):
            flat = x.reshape(-1)
            specials = special_values(x.dtype)
            k = min(flat.size, specials.size)
            index = (mx.arange(k) * 5 + step) % max(flat.size, 1)
            flat[index] = specials[(mx.arange(k) + step // every) % specials.size]
            return flat.reshape(x.shape)

        out.append(tree_map(put, g))
    mx.eval(out)
    return out


#: The rules every variant runs in the sampled tests: RMSprop, AdamW with bias correction, SGD with Nesterov
#: momentum and weight decay, Lion with weight decay; eager runs every setting of every rule.
SAMPLE = {
    "rmsprop": {},
    "adamw": {"bias_correction": True},
    "sgd": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "lion": {"weight_decay": 0.1},
}
#: ``RMSPROP_RULE_GRID=full`` runs every setting of every rule through every variant instead of the sample.
FULL_GRID = os.environ.get("RMSPROP_RULE_GRID") == "full"


#: Variants too slow to build for the whole grid by default: ``compiled`` has ``g++`` build each new graph's
#: kernels (about 2 s each here, six per tree and dtype), so it runs :data:`SAMPLE` unless the grid is full.
SLOW_TO_BUILD = ("compiled",)


def sample() -> list[tuple[str, dict]]:
    from rmsprop_impls.rules import rule

    return [(name, far_from_defaults(rule(name).hyperparameters(**h))) for name, h in SAMPLE.items()]


def sampled_settings(variant: str, everything_for: tuple[str, ...] = ("eager",)) -> list[tuple[str, dict]]:
    """The ``(rule, hyper-parameters)`` that ``variant`` runs in a sampled test: every setting for the variants
    in ``everything_for`` (and for all under ``RMSPROP_RULE_GRID=full``), else :data:`SAMPLE`."""
    return rule_settings() if FULL_GRID or variant in everything_for else sample()


def variant_rule_grid(variants: list[str]) -> list:
    """``pytest.param(variant, rule, hyper)`` over :func:`sampled_settings`, with readable ids."""
    import pytest

    return [
        pytest.param(v, name, hyper, id=f"{v}-{setting_id(name, hyper)}")
        for v in variants
        for name, hyper in sampled_settings(v)
    ]
