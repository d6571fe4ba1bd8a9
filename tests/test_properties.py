"""Property tests: random trees and hyper-parameters, every variant against float64 and stock (RMSprop), and
every rule against its stock class bit for bit."""

from __future__ import annotations

import mlx.core as mx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from program_oracle import assert_same_bits
from trajectory import (
    SLOW_TO_BUILD,
    check_against_reference_and_stock,
    gradient_sequence,
    make_optimizer,
    run,
    with_special_values,
)

from rmsprop_impls import available_variants
from rmsprop_impls.rules import RULE_NAMES, rule

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)
leaf = shapes.map(lambda s: ("leaf", s))
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), children, min_size=1, max_size=3),
    ),
    max_leaves=8,
)
FLOAT16_SMALLEST_NORMAL = 2.0**-14

#: Optimizer state sits beside the tree in one dict, so the top of a tree is a dict, as in stock MLX.
top_level = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), trees, min_size=0, max_size=3)


def build(spec, dtype, key):
    if isinstance(spec, tuple):
        return mx.random.normal(spec[1], key=key).astype(dtype)
    keys = mx.random.split(key, len(spec))
    if isinstance(spec, list):
        return [build(s, dtype, k) for s, k in zip(spec, keys)]
    return {name: build(s, dtype, k) for (name, s), k in zip(spec.items(), keys)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=top_level,
    variant=st.sampled_from(available_variants()),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16]),
    lr=st.floats(1e-4, 0.1),
    alpha=st.floats(0.0, 0.999),
    eps=st.floats(1e-8, 1e-2),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_random_trees_and_hyperparameters(spec, variant, dtype, lr, alpha, eps, steps, seed):
    # In float16, a first v of (1-alpha)*g^2 below 6.1e-5 is subnormal and keeps only a few bits, so stock
    # itself leaves float64 far behind (README: float16 findings). The gradients' smallest |g| is 0.05.
    assume(dtype != mx.float16 or (1 - alpha) * 0.05**2 >= FLOAT16_SMALLEST_NORMAL)
    params = build(spec, dtype, mx.random.key(seed))
    grads = gradient_sequence(params, steps, seed=seed)
    check_against_reference_and_stock(variant, params, grads, lr, alpha=alpha, eps=eps)


#: Each hyper-parameter's values, by stock's name: zeros (a branch off) as often as not.
HYPER = {
    "alpha": st.floats(0.0, 0.999),
    "rho": st.floats(0.0, 0.999),
    "eps": st.floats(1e-8, 1e-2),
    "momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
    "dampening": st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    "nesterov": st.booleans(),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
    "betas": st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2),
    "bias_correction": st.booleans(),
}


@st.composite
def rule_and_hyper(draw):
    name = draw(st.sampled_from(RULE_NAMES))
    r = rule(name)
    hyper = {key: draw(HYPER[key]) for key in r.defaults}
    try:
        return name, r.hyperparameters(**hyper)
    except ValueError:  # Nesterov without momentum, or with dampening: stock refuses it too
        assume(False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=top_level,
    variant=st.sampled_from([v for v in available_variants() if v not in SLOW_TO_BUILD]),
    setting=rule_and_hyper(),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16]),
    lr=st.floats(1e-4, 0.1),
    steps=st.integers(1, 8),
    every=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_every_rule_on_random_trees_and_hyperparameters_gives_stocks_bits(
    spec, variant, setting, dtype, lr, steps, every, seed
):
    """Any rule, any hyper-parameters stock takes, special gradients every ``every`` steps: stock's bits.
    (``compiled`` would have g++ build kernels for every example; test_agreement.py holds it to a sample.)"""
    name, hyper = setting
    params = build(spec, dtype, mx.random.key(seed))
    grads = with_special_values(gradient_sequence(params, steps, seed=seed), every)
    opt, stock = make_optimizer(variant, lr, name, hyper), make_optimizer("stock", lr, name, hyper)
    assert_same_bits(run(opt, params, grads), run(stock, params, grads), f"{variant} {name} {hyper}", any_nan=True)
    assert_same_bits(opt.state, stock.state, f"{variant} {name} {hyper} state", any_nan=True)
