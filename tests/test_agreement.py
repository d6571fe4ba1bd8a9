"""Every variant that runs here computes what stock RMSprop and the float64 reference compute."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from trajectory import as_f64, check_against_reference_and_stock, gradient_sequence, max_rel_error, run, tolerance

from rmsprop_impls import available_variants, create

VARIANTS = available_variants()
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def nested_tree(dtype):
    """Dicts in lists in dicts, odd shapes, a 0-d leaf and a transposed leaf."""
    mx.random.seed(3)
    return {
        "embed": mx.random.normal((7, 5)).astype(dtype),
        "layers": [
            {"w": mx.random.normal((5, 3)).T.astype(dtype), "b": mx.random.normal((3,)).astype(dtype)},
            {"w": mx.random.normal((3, 3)).astype(dtype), "scale": mx.array(0.5, dtype=dtype)},
        ],
        "head": {"deep": {"w": mx.random.normal((2, 3, 4)).astype(dtype)}},
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_and_stock_over_100_steps(variant, dtype):
    params = nested_tree(dtype)
    check_against_reference_and_stock(variant, params, gradient_sequence(params, 100), 1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_over_1000_steps(variant):
    params = {"a": mx.random.normal((64,)), "b": [mx.random.normal((3, 5))]}
    check_against_reference_and_stock(variant, params, gradient_sequence(params, 1000, seed=1), 1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_schedule(variant):
    params = nested_tree(mx.float32)
    schedule = optim.cosine_decay(1e-2, 50, 1e-4)
    opt, _ = check_against_reference_and_stock(variant, params, gradient_sequence(params, 60), schedule)
    assert opt.learning_rate.item() == pytest.approx(schedule(mx.array(59)).item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_hyperparameters_reach_the_math(variant):
    params = nested_tree(mx.float32)
    check_against_reference_and_stock(variant, params, gradient_sequence(params, 20), 3e-3, alpha=0.5, eps=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_tree(variant):
    opt = create(variant, 1e-2)
    assert opt.apply_gradients({}, {}) == {}
    assert int(opt.state["step"]) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_may_hold_more_than_gradients(variant):
    params = {"trained": mx.ones((4,)), "frozen": mx.ones((2,))}
    out = create(variant, 0.1).apply_gradients({"trained": mx.full((4,), 0.5)}, params)
    want = optim.RMSprop(0.1).apply_gradients({"trained": mx.full((4,), 0.5)}, params)
    assert set(out) == {"trained"}
    assert np.allclose(np.array(out["trained"]), np.array(want["trained"]), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_model_in_place(variant):
    import mlx.nn as nn

    model = nn.Linear(4, 3)
    stock_model = nn.Linear(4, 3)
    stock_model.update(model.parameters())
    opt, stock = create(variant, 1e-2), optim.RMSprop(1e-2)
    for g in gradient_sequence(model.trainable_parameters(), 5):
        opt.update(model, g)
        stock.update(stock_model, g)
        mx.eval(model.parameters(), stock_model.parameters(), opt.state, stock.state)
    assert max_rel_error(as_f64(model.parameters()), as_f64(stock_model.parameters())) <= tolerance(mx.float32, 5)


@pytest.mark.parametrize("source", VARIANTS + ["stock"])
@pytest.mark.parametrize("target", VARIANTS + ["stock"])
def test_state_round_trip(source, target):
    """Save after 30 steps from one, load into another: the next 30 follow the same trajectory."""
    params = nested_tree(mx.float32)
    grads = gradient_sequence(params, 60, seed=5)

    def make(name):
        return optim.RMSprop(1e-2) if name == "stock" else create(name, 1e-2)

    first = make(source)
    mid = run(first, params, grads[:30])
    path_state = dict(first.state)
    mx.eval(path_state)
    second = make(target)
    second.state = path_state
    end = run(second, mid, grads[30:])
    straight = run(optim.RMSprop(1e-2), params, grads)
    assert int(second.state["step"]) == 60
    assert max_rel_error(as_f64(end), as_f64(straight)) <= 2 * tolerance(mx.float32, 60)
