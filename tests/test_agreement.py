"""Every rule through every variant that runs here, in float32, float16 and bfloat16: bit for bit what its stock
class computes (NaN equal to NaN), over nested trees, schedules, hyper-parameters far from the defaults, each
branch (momentum, dampening, Nesterov, weight decay, bias correction) and zero, negative-zero, subnormal,
infinite and NaN gradients; and within rounding of the float64 reference where every value is finite."""

from __future__ import annotations

from collections import namedtuple

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_map
from program_oracle import assert_same_bits
from trajectory import (
    FULL_GRID,
    ROUNDING,
    SLOW_TO_BUILD,
    as_f64,
    gradient_sequence,
    make_optimizer,
    max_rel_error,
    rule_settings,
    run,
    sample,
    setting_id,
    variant_rule_grid,
    with_special_values,
)

from rmsprop_impls import available_variants, reference_trajectory
from rmsprop_impls.rules import RULE_NAMES, rule

VARIANTS = available_variants()
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
SETTINGS = rule_settings()
SETTING_IDS = [setting_id(*s) for s in SETTINGS]
Pair = namedtuple("Pair", ["first", "second"])


def nested_tree(dtype):
    """Dicts, lists, a tuple and a namedtuple; odd shapes, a 0-d leaf and a transposed leaf; ``"mixed"``: the
    leaves take float32, float16 and bfloat16 in turn."""
    mx.random.seed(3)
    dtypes = iter(DTYPES * 3 if dtype == "mixed" else [dtype] * 9)

    def leaf(x):
        return x.astype(next(dtypes))

    return {
        "embed": leaf(mx.random.normal((7, 5))),
        "layers": [
            {"w": leaf(mx.random.normal((5, 3)).T), "b": leaf(mx.random.normal((3,)))},
            {"w": leaf(mx.random.normal((3, 3))), "scale": leaf(mx.array(0.5))},
        ],
        "head": (leaf(mx.random.normal((2, 3, 4))), Pair(leaf(mx.random.normal((6,))), leaf(mx.ones(1)))),
    }


def grid(variants):
    """Every setting of every rule, in each dtype, for each variant; a variant slow to build (``compiled``) runs
    the sample, each rule in one tree of all three dtypes (``RMSPROP_RULE_GRID=full``: everything)."""
    out = []
    for v in variants:
        slow = v in SLOW_TO_BUILD and not FULL_GRID
        settings = sample() if slow else SETTINGS
        kinds = [("mixed", "mixed")] if slow else list(zip(DTYPES, DTYPE_IDS))
        for name, hyper in settings:
            for dtype, dtype_id in kinds:
                out.append(pytest.param(v, name, hyper, dtype, id=f"{v}-{setting_id(name, hyper)}-{dtype_id}"))
    return out


def both(variant, name, hyper, learning_rate, params, grads, **options):
    """Run ``variant`` and the stock class over ``grads``: the same bits in every parameter and every state."""
    opt = make_optimizer(variant, learning_rate, name, hyper, **options)
    stock = make_optimizer("stock", learning_rate, name, hyper)
    got, want = run(opt, params, grads), run(stock, params, grads)
    assert_same_bits(got, want, f"{variant} {name} parameters", any_nan=True)
    assert_same_bits(opt.state, stock.state, f"{variant} {name} state", any_nan=True)
    return opt, got


SCHEDULE = optim.join_schedules([optim.linear_schedule(0.0, 0.05, 3), optim.cosine_decay(0.05, 10, 1e-3)], [3])


@pytest.mark.parametrize("variant, name, hyper, dtype", grid(VARIANTS))
def test_bit_identical_with_stock(variant, name, hyper, dtype):
    """A warm-up-then-cosine schedule; special gradients on every third step."""
    params = nested_tree(dtype)
    grads = with_special_values(gradient_sequence(params, 9, seed=2))
    opt, _ = both(variant, name, hyper, SCHEDULE, params, grads)
    assert int(opt.state["step"]) == 9


@pytest.mark.parametrize("variant, name, hyper", variant_rule_grid(VARIANTS))
def test_many_steps_at_a_float_learning_rate(variant, name, hyper):
    """Every setting for eager, the sample for the others (the qemu and clang lanes run cpu_kernel's)."""
    params = {"a": mx.random.normal((64,), key=mx.random.key(1)), "b": [mx.random.normal((3, 5))]}
    both(variant, name, hyper, 3e-3, params, gradient_sequence(params, 120, seed=1))


def reference_leaves(name, hyper, params, grads, learning_rate):
    """The float64 reference's final w of every leaf."""
    steps = [as_f64(g) for g in grads]
    return [
        reference_trajectory(w0, [g[i] for g in steps], learning_rate, optimizer=name, **hyper)[0]
        for i, w0 in enumerate(as_f64(params))
    ]


def largest_reference_step(name, hyper, params, grads, learning_rate) -> float:
    """The largest |change of w| in one step of the float64 reference: how big the rounding of w's update is."""
    w, _ = reference_trajectory(as_f64(params)[0], [as_f64(grads[0])[0]], learning_rate, optimizer=name, **hyper)
    return float(np.max(np.abs(w - as_f64(params)[0])))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, hyper", SETTINGS, ids=SETTING_IDS)
def test_within_rounding_of_the_float64_reference(name, hyper, dtype):
    """Finite gradients bounded away from zero; the variants give stock's bits (above), so stock is held here.
    Lion takes the sign of a sum: in float16 and bfloat16 a sum near zero may round to the other sign."""
    if name == "lion" and dtype != mx.float32:
        pytest.skip("Lion's sign(c) flips where c rounds across zero in float16 and bfloat16")
    params = {"a": mx.random.normal((200,), key=mx.random.key(4)).astype(dtype)}
    grads = gradient_sequence(params, 60, seed=4)
    lr = 1e-2
    stock = make_optimizer("stock", lr, name, hyper)
    # Stock's own copies: MLX 0.30's SGD adds weight decay into the caller's gradient in place (`gradient +=`).
    got = run(stock, params, [tree_map(mx.array, g) for g in grads])
    scale = largest_reference_step(name, hyper, params, grads, lr) / lr
    want = reference_leaves(name, hyper, params, grads, lr)
    # Each step's rounding bound, added up in one direction: a decay w*(1 - lr*wd) rounds the same way every
    # step in float16, so the errors do not cancel as a random walk would.
    assert max_rel_error(as_f64(got), want) <= ROUNDING[dtype] * len(grads) * max(1.0, scale)


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_tree(variant, name):
    opt = make_optimizer(variant, 1e-2, name, rule(name).defaults)
    assert opt.apply_gradients({}, {}) == {}
    assert int(opt.state["step"]) == 1


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_may_hold_more_than_gradients(variant, name):
    params = {"trained": mx.ones((4,)), "frozen": mx.ones((2,))}
    grads = {"trained": mx.full((4,), 0.5)}
    out = make_optimizer(variant, 0.1, name, rule(name).defaults).apply_gradients(grads, params)
    want = make_optimizer("stock", 0.1, name, rule(name).defaults).apply_gradients(grads, params)
    assert set(out) == {"trained"}
    assert_same_bits(out, want, f"{variant} {name}")


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_dtypes_in_one_tree(variant, name):
    """float32, float16 and bfloat16 leaves side by side, and a float32 gradient for a bfloat16 leaf (stock's
    promotion)."""
    params = {"a": mx.ones((5,)), "b": mx.ones((4,), mx.float16), "c": mx.ones((3,), mx.bfloat16)}
    grads = gradient_sequence(params, 4, seed=6)
    grads = [{**g, "c": g["c"].astype(mx.float32)} for g in grads]
    both(variant, name, rule(name).hyperparameters(**({"momentum": 0.5} if name == "sgd" else {})), 0.1, params, grads)
