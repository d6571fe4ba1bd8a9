"""The drop-in classes (``rmsprop_impls.AdamW(..., variant=...)``) used the ways MLX's own optimizer tests and
training scripts use the stock classes, each side by side with the stock class in the same program, bit for bit:
a training loop with an ``nn.Module`` and ``nn.value_and_grad``, its step compiled with the model's and the
optimizer's state as inputs and outputs, ``optimizer.init``, schedules and learning-rate changes, ``tree_map``
over the state, a state saved to safetensors by one variant and loaded into another or into stock, and
``MultiOptimizer`` with mixed rules (mlx-lm's Muon-plus-AdamW split)."""

from __future__ import annotations

import inspect
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from program_oracle import assert_same_bits
from trajectory import (
    FULL_GRID,
    SLOW_TO_BUILD,
    far_from_defaults,
    gradient_sequence,
    sample,
    sampled_settings,
    setting_id,
)

import rmsprop_impls
from rmsprop_impls import available_variants
from rmsprop_impls.rules import RULE_NAMES, rule

#: The variants a drop-in class runs (``auto`` picks among them by timing, so it is not held to one here).
VARIANTS = [v for v in ("eager", "compiled", "flat", "cpu_stream", "cpu_kernel") if v in available_variants()]


def drop_in(name: str):
    return getattr(rmsprop_impls, rule(name).title)


def cases(variants=VARIANTS, everything_for=("eager",)):
    """``(variant, rule, hyper)``: every setting for eager, :data:`trajectory.SAMPLE` for the others."""
    return [
        pytest.param(v, name, hyper, id=f"{v}-{setting_id(name, hyper)}")
        for v in variants
        for name, hyper in (sample() if v in SLOW_TO_BUILD else sampled_settings(v, everything_for))
    ]


def rotation(variants=VARIANTS):
    """Each rule once, the variants in turn (:data:`trajectory.SAMPLE`'s settings where it has one): for the
    patterns under ``mx.compile``, where ``g++`` builds each new graph's kernels (``RMSPROP_RULE_GRID=full``:
    :func:`cases`)."""
    if FULL_GRID:
        return cases(variants)
    sampled = dict(sample())
    settings = [(name, sampled.get(name) or far_from_defaults(rule(name).defaults)) for name in RULE_NAMES]
    return [
        pytest.param(
            variants[i % len(variants)], name, hyper, id=f"{variants[i % len(variants)]}-{setting_id(name, hyper)}"
        )
        for i, (name, hyper) in enumerate(settings)
    ]


def pair(variant: str, name: str, hyper: dict, learning_rate):
    """The drop-in class running ``variant`` and the stock class, with the same arguments."""
    return drop_in(name)(learning_rate, **hyper, variant=variant), rule(name).stock(learning_rate, **hyper)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(6, 8), nn.Linear(8, 3)]
        self.norm = nn.LayerNorm(3)

    def __call__(self, x):
        return self.norm(self.layers[1](nn.relu(self.layers[0](x))))


def twin_models():
    mx.random.seed(11)
    a = MLP()
    b = MLP()
    b.update(tree_map(lambda x: mx.array(x), a.parameters()))
    mx.eval(a.parameters(), b.parameters())
    return a, b


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def batches(n: int):
    keys = mx.random.split(mx.random.key(5), 2 * n)
    return [(mx.random.normal((4, 6), key=a), mx.random.normal((4, 3), key=b)) for a, b in zip(keys[::2], keys[1::2])]


def train(model, optimizer, data, compiled: bool):
    """The loop of MLX's examples: ``nn.value_and_grad``, ``optimizer.update``, ``mx.eval`` of the model's
    parameters and the optimizer's state; ``compiled``: the step under ``mx.compile`` with both as state."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    if compiled:
        state = [model.state, optimizer.state]
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses = []
    for x, y in data:
        losses.append(step(x, y))
        mx.eval(losses[-1], model.parameters(), optimizer.state)
    return losses


@pytest.mark.parametrize(
    "variant, name, hyper, compiled",
    [pytest.param(*p.values, False, id=f"{p.id}-eager-step") for p in cases()]
    + [pytest.param(*p.values, True, id=f"{p.id}-compiled-step") for p in rotation()],
)
def test_a_training_loop_is_stocks(variant, name, hyper, compiled):
    model, stock_model = twin_models()
    opt, stock = pair(variant, name, hyper, optim.cosine_decay(0.05, 20, 1e-3))
    data = batches(6)
    losses = train(model, opt, data, compiled)
    want = train(stock_model, stock, data, compiled)
    assert_same_bits(losses, want, "losses", any_nan=True)
    assert_same_bits(model.parameters(), stock_model.parameters(), f"{variant} {name}")
    assert_same_bits(opt.state, stock.state, f"{variant} {name} state")


@pytest.mark.parametrize("variant, name, hyper", rotation())
def test_a_pure_compiled_step_with_the_state_as_argument_and_result(variant, name, hyper):
    """MLX's ``test_compiled_optimizer``: ``optimizer.state = opt_state`` inside a compiled function."""
    params = {"w": mx.random.normal((5, 4), key=mx.random.key(2)), "b": [mx.zeros((4,))]}

    def run(optimizer):
        optimizer.init(params)

        @mx.compile
        def step(p, opt_state, g):
            optimizer.state = opt_state
            return optimizer.apply_gradients(g, p), optimizer.state

        p, s = params, optimizer.state
        for g in gradient_sequence(params, 4, seed=3):
            p, s = step(p, s, g)
            mx.eval(p, s)
        return p, s

    opt, stock = pair(variant, name, hyper, 0.02)
    assert_same_bits(run(opt), run(stock), f"{variant} {name}")


@pytest.mark.parametrize("variant, name, hyper", rotation())
def test_init_gives_stocks_state_layout_and_a_learning_rate_change_reaches_a_compiled_update(variant, name, hyper):
    """``optimizer.init`` before any step gives stock's state tree; ``opt.learning_rate = ...`` between the calls
    of an update compiled with the optimizer's state is seen (MLX's ``test_update_lr_compiled``)."""
    params = {"w": mx.ones((10,)), "layers": [{"w": mx.ones((2, 3))}]}
    opt, stock = pair(variant, name, hyper, 0.5)
    for o in (opt, stock):
        o.init(params)
    assert_same_bits(opt.state, stock.state, "after init")
    grads = gradient_sequence(params, 2, seed=4)

    def run(optimizer):
        state = [optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(g):
            return optimizer.apply_gradients(g, params)

        first = update(grads[0])
        optimizer.learning_rate = 0.1
        second = update(grads[1])
        mx.eval(first, second, optimizer.state)
        return first, second, optimizer.state

    assert_same_bits(run(opt), run(stock), f"{variant} {name}")
    assert opt.learning_rate.item() == pytest.approx(0.1)


@pytest.mark.parametrize("variant, name, hyper", cases())
def test_hyperparameters_and_state_changed_between_steps(variant, name, hyper):
    """A hyper-parameter set on the optimizer between steps (as on stock) and the state mapped by ``tree_map``
    (a checkpoint restored as copies, or cast)."""
    params = {"a": mx.random.normal((7,), key=mx.random.key(8)), "b": mx.random.normal((3, 2), key=mx.random.key(9))}
    grads = gradient_sequence(params, 6, seed=8)
    changed = [k for k, v in hyper.items() if isinstance(v, float) and v > 0][:1]  # eps, alpha, momentum, ...

    def run(optimizer):
        p = params
        for i, g in enumerate(grads):
            if i == 2:
                for key in changed:
                    setattr(optimizer, key, getattr(optimizer, key) * 0.5)
            if i == 4:
                optimizer.state = tree_map(lambda x: x * 1, optimizer.state)
            p = optimizer.apply_gradients(g, p)
            mx.eval(p, optimizer.state)
        return p, optimizer.state

    opt, stock = pair(variant, name, hyper, 0.03)
    assert_same_bits(run(opt), run(stock), f"{variant} {name}")


def hand_over(variants):
    """Who saves and who loads: each variant into stock and from stock, and into the next variant."""
    out = []
    for i, v in enumerate(variants):
        out += [("stock", v), (v, "stock"), (v, variants[(i + 1) % len(variants)])]
    return out


#: The rules the hand-over runs: one or two states, a branch, a sign; RMSPROP_RULE_GRID=full: every rule.
HANDED_OVER = RULE_NAMES if FULL_GRID else ("rmsprop", "adamw", "sgd", "lion", "adadelta")


@pytest.mark.parametrize("name", HANDED_OVER)
@pytest.mark.parametrize("source, target", hand_over(VARIANTS), ids=lambda x: x)
def test_a_state_saved_by_one_loads_into_another(source, target, name, tmp_path):
    """``tree_flatten`` to safetensors and back (MLX's guide): the loaded optimizer continues stock's run."""
    if not FULL_GRID and {source, target} & set(SLOW_TO_BUILD) and name not in HANDED_OVER[:2]:
        pytest.skip("compiled hands over RMSprop and AdamW only (g++ builds each graph's kernels)")
    hyper = rule(name).hyperparameters(**({"momentum": 0.9, "nesterov": True} if name == "sgd" else {}))
    params = {"w": mx.random.normal((4, 3), key=mx.random.key(1)), "b": [mx.random.normal((3,), key=mx.random.key(2))]}
    grads = gradient_sequence(params, 8, seed=6)

    def make(variant):
        return rule(name).stock(0.02, **hyper) if variant == "stock" else drop_in(name)(0.02, **hyper, variant=variant)

    def steps(optimizer, p, gs):
        for g in gs:
            p = optimizer.apply_gradients(g, p)
            mx.eval(p, optimizer.state)
        return p

    first = make(source)
    mid = steps(first, params, grads[:4])
    path = str(tmp_path / "optimizer.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(first.state)))
    second = make(target)
    second.state = tree_unflatten(list(mx.load(path).items()))
    end = steps(second, mid, grads[4:])
    straight = make("stock")
    want = steps(straight, params, grads)
    assert_same_bits(end, want, f"{source} -> {target}")
    loaded_order = dict(sorted(tree_flatten(second.state)))  # safetensors keeps the keys sorted
    assert_same_bits(loaded_order, dict(sorted(tree_flatten(straight.state))), f"{source} -> {target} state")


def matrices(path: str, w: mx.array) -> bool:
    return w.ndim == 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "first, second",
    [("adamw", "sgd"), ("muon", "adamw"), ("lion", "rmsprop")],
    ids=["adamw+sgd", "muon+adamw", "lion+rmsprop"],
)
def test_multi_optimizer_with_mixed_rules(variant, first, second):
    """``MultiOptimizer``: matrices to the first, the rest to the second, as mlx-lm splits Muon and AdamW."""
    if variant in SLOW_TO_BUILD and first != "adamw":
        pytest.skip(f"{variant} runs the first split only (g++ builds each graph's kernels)")

    def make(name, stock):
        if name == "muon":
            return optim.Muon(0.02)
        hyper = {"momentum": 0.9} if name == "sgd" else {}
        return rule(name).stock(0.02, **hyper) if stock else drop_in(name)(0.02, **hyper, variant=variant)

    model, stock_model = twin_models()
    opt = optim.MultiOptimizer([make(first, False), make(second, False)], [matrices])
    stock = optim.MultiOptimizer([make(first, True), make(second, True)], [matrices])
    data = batches(4)
    assert_same_bits(train(model, opt, data, False), train(stock_model, stock, data, False), "losses")
    assert_same_bits(model.parameters(), stock_model.parameters(), f"{variant} {first}+{second}")
    assert_same_bits(opt.state, stock.state, f"{variant} {first}+{second} state")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_the_drop_in_class_is_stocks_signature_and_isinstance(name):
    cls, stock = drop_in(name), rule(name).stock
    ours = list(inspect.signature(cls).parameters.values())
    theirs = [p for p in inspect.signature(stock.__init__).parameters.values() if p.name != "self"]
    assert ours[: len(theirs)] == theirs
    assert [(p.name, p.kind) for p in ours[len(theirs) :]] == [
        ("variant", inspect.Parameter.KEYWORD_ONLY),
        ("options", inspect.Parameter.VAR_KEYWORD),
    ]
    opt = cls(0.1, variant="eager")
    assert isinstance(opt, cls) and isinstance(opt, optim.Optimizer) and cls.__name__ == stock.__name__
    others = [drop_in(n) for n in RULE_NAMES if n != name]
    # A drop-in class is an instance of another where its stock class is (AdamW's and Adamax's of Adam's).
    assert [isinstance(opt, o) for o in others] == [issubclass(stock, rule(n).stock) for n in RULE_NAMES if n != name]
