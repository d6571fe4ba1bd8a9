"""The eight failures of issue 21, each as what a Python program does around its steps, against
stock ``mlx.optimizers.RMSprop`` bit for bit on every array the program holds: two v's over one
buffer, parameters tied in place, a v swapped by another thread mid-step, a state dict shared by two
leaves, a namedtuple and a step that raises, gradients through a step, the memory a kept leaf pins,
and inputs stock accepts. Every variant that runs here is held to them."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import threading
import time
from collections import OrderedDict, namedtuple
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from program_oracle import (
    ALIASES,
    LR,
    VARIANTS,
    assert_same_bits,
    bits,
    changed_since,
    differences,
    make,
    same_program,
    snapshot,
)
from trajectory import FULL_GRID, gradient_sequence, rule_settings, sample, setting_id

from rmsprop_impls.rules import rule

pytestmark = pytest.mark.skipif("cpu_kernel" not in VARIANTS, reason="cpu_kernel does not run here")


#: A leaf the kernel packs and updates at once, and one past its 256K-element limit (a graph node).
ON_BOTH_PATHS = pytest.mark.parametrize("size", [300, 300_000], ids=["packed", "graph"])
#: The rules the failures are replayed with: the tests' RMSprop, then AdamW with bias correction, SGD with Nesterov
#: momentum and Lion with weight decay (trajectory.SAMPLE); RMSPROP_RULE_GRID=full: every setting of every rule.
_SETTINGS = [("rmsprop", None), *(rule_settings() if FULL_GRID else sample()[1:])]
EVERY_RULE = pytest.mark.parametrize("setting", _SETTINGS, ids=[setting_id(n, h or {}) for n, h in _SETTINGS])


def first_state(setting) -> str:
    """The state array the program aliases, shares or replaces: ``v`` for RMSprop, ``m`` for AdamW and Lion."""
    return rule(setting[0]).states[0]


def leaves(*sizes: int, dtype=mx.float32, seed: int = 0) -> dict:
    mx.random.seed(seed)
    return {f"p{i}": mx.random.normal((n,)).astype(dtype) for i, n in enumerate(sizes)}


def steps(opt, params, grads):
    for g in grads:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params


# ---------------------------------------------------------------- 1: two v's over one buffer ---


# The multi-tensor variants (flat, and the GPU kernels over its packing) hand back views into one buffer per dtype and
# reduce over that buffer: a kept leaf keeps its buffer, and a gradient through a step is summed in another order.
# That is their documented contract (docs/guides/correctness.md); every other variant keeps stock's per leaf.
PER_LEAF = [v for v in VARIANTS if v not in ("flat", "metal_kernel", "cuda_kernel")]


@EVERY_RULE
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", [*ALIASES, "overlapping slices"])
def test_two_state_vs_over_one_buffer(variant, how, setting):
    v = first_state(setting)

    def program(opt):
        p = leaves(300, 300)
        grads = gradient_sequence(p, 5, seed=1)
        p = steps(opt, p, grads[:2])
        if how == "overlapping slices":
            mx.random.seed(7)
            base = mx.abs(mx.random.normal((400,)))
            mx.eval(base)
            opt.state["p0"][v], opt.state["p1"][v] = base[:300], base[100:]
            del base
        else:
            opt.state["p1"][v] = ALIASES[how](opt.state["p0"][v])
        mx.eval(opt.state)
        return {"p": steps(opt, p, grads[2:]), "state": opt.state}

    same_program(variant, program, setting=setting)


# ---------------------------------------------------------------- 2: parameters tied in place ---


@EVERY_RULE
@pytest.mark.parametrize("variant", VARIANTS)
@ON_BOTH_PATHS
@pytest.mark.parametrize("evaluated", [False, True], ids=["lazy", "evaluated"])
def test_parameters_tied_in_place_by_the_caller(variant, size, evaluated, setting):
    """After each step but the last (whose results then show how the tied leaf was updated), on the
    step's lazy or its evaluated results."""

    def program(opt):
        p = leaves(size, size)
        grads = gradient_sequence(p, 4, seed=1)
        for k, g in enumerate(grads):
            p = opt.apply_gradients(g, p)
            if evaluated:
                mx.eval(p, opt.state)
            if k < len(grads) - 1:
                p["p1"][:] = mx.stop_gradient(p["p0"])
            mx.eval(p, opt.state)
        return {"p": p, "state": opt.state}

    same_program(variant, program, setting=setting)


# ------------------------------------------------- 3: another thread swaps a v mid-step ---


def slow_zero() -> mx.array:
    """A lazy 0.0 that takes a while to evaluate: the step releases the GIL to evaluate gradients."""
    mx.random.seed(11)
    a = mx.random.normal((512, 512)) * (1 / 23)
    h = a
    for _ in range(4):
        h = h @ a
    return h.sum() * 0


def stock_interleavings(stock, p, g, replacement):
    """Stock's (parameters, state) for each order a step and the swap of p0's v can run in."""
    outcomes = []
    for order in ("step, swap", "swap, step", "read, swap, write"):
        s = copy.deepcopy(stock)
        if order == "swap, step":
            s.state["p0"]["v"] = replacement
        new = s.apply_gradients(g, p)
        if order == "step, swap":
            s.state["p0"]["v"] = replacement
        mx.eval(new, s.state)
        outcomes.append({"p": new, "state": s.state})
    return outcomes


def race_once(variant: str, seed: int) -> None:
    """Two steps, then a third on lazy gradients while another thread replaces p0's v, which the
    user holds: the held v keeps its values, and the outcome is one of stock's orders."""
    opt, stock = make(variant), make("stock")
    first = leaves(256, 256)
    grads = gradient_sequence(first, 3, seed=seed)
    p, pk = steps(opt, first, grads[:2]), steps(stock, first, grads[:2])
    held = opt.state["p0"]["v"]
    held_bits = bits(held)
    replacement = mx.zeros((256,))
    mx.eval(replacement)
    zero = slow_zero()
    lazy = {k: x + zero for k, x in grads[2].items()}
    go = threading.Event()

    def swap():
        go.wait()
        time.sleep(0.02)  # inside the step's evaluation of the lazy gradients
        opt.state["p0"]["v"] = replacement

    racer = threading.Thread(target=swap)
    racer.start()
    go.set()
    new = opt.apply_gradients(lazy, p)
    mx.eval(new, opt.state)
    racer.join()
    assert np.array_equal(bits(held), held_bits), (
        f"run {seed}: the held v changed: {np.array(held)[:3]}, was {held_bits.view(np.float32)[:3]}"
    )
    got = {"p": new, "state": opt.state}
    outcomes = stock_interleavings(stock, pk, grads[2], replacement)
    assert any(not differences(got, want) for want in outcomes), differences(got, outcomes[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_v_swapped_by_another_thread_mid_step_keeps_the_values_the_user_holds(variant):
    for seed in range(3):
        race_once(variant, seed)


# ------------------------------------------------------ 4: two leaves share one state dict ---


@EVERY_RULE
@pytest.mark.parametrize("variant", VARIANTS)
@ON_BOTH_PATHS
def test_two_leaves_sharing_one_state_dict_step_leaf_by_leaf(variant, size, setting):
    def program(opt):
        p = leaves(size, size)
        grads = gradient_sequence(p, 4, seed=1)
        p = steps(opt, p, grads[:2])
        opt.state["p1"] = opt.state["p0"]
        p = steps(opt, p, grads[2:])
        assert opt.state["p1"] is opt.state["p0"]
        return {"p": p, "state": opt.state}

    same_program(variant, program, setting=setting)


# ------------------------------------------------- 5: a namedtuple; a step that raises ---

Layer = namedtuple("Layer", ["weight", "bias"])


def layered(seed: int = 0, layer=Layer) -> dict:
    mx.random.seed(seed)
    return {"layer": layer(mx.random.normal((6, 5)), mx.random.normal((5,))), "head": mx.random.normal((7,))}


@EVERY_RULE
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_namedtuple_in_the_parameters_and_gradients(variant, setting):
    def program(opt):
        p = layered()
        for seed in range(1, 5):
            p = opt.apply_gradients(layered(seed), p)
            mx.eval(p, opt.state)
        assert type(p["layer"]) is Layer
        return {"p": p, "state": opt.state}

    same_program(variant, program, setting=setting)


def with_last_leaf(g: dict, x) -> dict:
    return {**g, "p2": x}


#: Calls after two good steps that raise in the variant (today, or by contract): (gradients, parameters).
BAD_STEPS = {
    "float16 cast mid-training": lambda g, p: (
        {k: x.astype(mx.float16) for k, x in g.items()},
        {k: x.astype(mx.float16) for k, x in p.items()},
    ),
    "a wrong shape in the last leaf": lambda g, p: (with_last_leaf(g, mx.ones((5,))), p),
    "a last leaf that is not an array": lambda g, p: (with_last_leaf(g, "not an array"), p),
}


def outcome(opt, g, p):
    try:
        new = opt.apply_gradients(g, p)
        mx.eval(new, opt.state)
        return new
    except Exception as e:  # noqa: BLE001 (any error: the state must be as it was)
        return e


@EVERY_RULE
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", BAD_STEPS)
def test_a_step_that_raises_leaves_the_state_as_it_was(variant, bad, setting):
    """Then a retry does not apply the update twice: the run goes on as stock's without that call."""
    schedule = optim.cosine_decay(LR, 20)
    opt, stock = make(variant, schedule, *setting), make("stock", schedule, *setting)
    first = leaves(300, 7, 300_000)
    grads = gradient_sequence(first, 3, seed=1)
    p, pk = steps(opt, first, grads[:2]), steps(stock, first, grads[:2])
    before = snapshot(opt.state)
    got = outcome(opt, *BAD_STEPS[bad](grads[2], p))
    if isinstance(got, Exception):
        assert not changed_since(opt.state, before), f"{got!r} changed {changed_since(opt.state, before)}"
    else:
        pk = outcome(stock, *BAD_STEPS[bad](grads[2], pk))
        assert not isinstance(pk, Exception), f"ran where stock raised {pk!r}"
        assert_same_bits({"p": got, "state": opt.state}, {"p": pk, "state": stock.state}, bad)
        p = got
    p, pk = steps(opt, p, grads[2:]), steps(stock, pk, grads[2:])
    assert_same_bits({"p": p, "state": opt.state}, {"p": pk, "state": stock.state}, f"the step after {bad}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_first_step_with_a_namedtuple_raises_nothing_or_changes_nothing(variant):
    opt = make(variant)
    before = snapshot(opt.state)
    got = outcome(opt, layered(1), layered())
    if isinstance(got, Exception):
        assert not changed_since(opt.state, before), f"{got!r} changed {changed_since(opt.state, before)}"
    else:
        want = outcome(make("stock"), layered(1), layered())
        assert_same_bits(got, want, "the first step")


# ------------------------------------------------------------ 6: gradients through a step ---


def one_step_of_leaves_sharing_w(variant: str, k: int):
    """The meta-learning shape: a loss after one step whose leaves all come from one array."""

    def loss(w):
        opt = make(variant)
        p = {f"p{i}": w for i in range(k)}
        opt.init(p)
        new = opt.apply_gradients({key: mx.cos(w) + 1.5 for key in p}, p)
        return sum((mx.sin(x) * (i + 2)).sum() for i, x in enumerate(new.values()))

    return loss


@pytest.mark.parametrize("variant", PER_LEAF)
@pytest.mark.parametrize("k, n", [(2, 300), (3, 5), (8, 300), (3, 70_000)])
def test_grad_through_a_step_of_several_leaves_is_stocks(variant, k, n):
    mx.random.seed(0)
    w = mx.random.normal((n,))
    got = mx.grad(one_step_of_leaves_sharing_w(variant, k))(w)
    want = mx.grad(one_step_of_leaves_sharing_w("stock", k))(w)
    assert_same_bits(got, want, "d loss / d w")


def coupled_loss(p: dict) -> mx.array:
    """A model's loss in which every leaf's gradient depends on every leaf."""
    s = sum(mx.tanh(x).sum() for x in p.values())
    return sum((mx.sin(x) * s).sum() for x in p.values())


def two_steps(variant: str, p: dict):
    def loss(lr):
        opt = make(variant)
        opt.state["learning_rate"] = lr
        q = p
        for _ in range(2):
            q = opt.apply_gradients(mx.grad(coupled_loss)(q), q)
        return coupled_loss(q)

    return loss


@pytest.mark.parametrize("variant", PER_LEAF)
@pytest.mark.parametrize("sizes", [(64,) * 8, (1000, 70_000)], ids=["8x64", "1000+70000"])
def test_grad_with_respect_to_the_learning_rate_through_two_steps_is_stocks(variant, sizes):
    p = leaves(*sizes)
    got = mx.grad(two_steps(variant, p))(mx.array(LR))
    want = mx.grad(two_steps("stock", p))(mx.array(LR))
    assert_same_bits(got, want, "d loss / d lr")


def meta_loss(variant: str):
    def loss(p):
        opt = make(variant)
        opt.init(p)
        for _ in range(2):
            p = opt.apply_gradients(mx.grad(coupled_loss)(p), p)
        return coupled_loss(p)

    return loss


@pytest.mark.parametrize("variant", PER_LEAF)
def test_grad_with_respect_to_the_parameters_through_two_steps_is_stocks(variant):
    p = leaves(*(64,) * 8, seed=1)
    assert_same_bits(mx.grad(meta_loss(variant))(p), mx.grad(meta_loss("stock"))(p), "d loss / d w")


# ---------------------------------------------------------------------------- 7: memory ---

PROBE = Path(__file__).with_name("memory_probe.py")


@functools.cache
def probe(scenario: str, variant: str) -> dict:
    """A memory_probe scenario in a fresh process: no other test's arrays or allocator state (stock's
    figures are measured once per scenario)."""
    done = subprocess.run(
        [sys.executable, str(PROBE), scenario, variant], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MIB = 2**20


@pytest.mark.parametrize("variant", PER_LEAF)
def test_keeping_one_small_parameter_per_step_costs_what_it_costs_stock(variant):
    """What keeping costs, beyond the optimizer's own memory, which may exceed stock's by at most one copy of
    the parameters (cpu_kernel's spare w's of the small leaves, docs/kernels/cpu.md) and a MiB."""
    got, want = probe("keep_one_leaf_per_step", variant), probe("keep_one_leaf_per_step", "stock")
    assert got["growth"] <= want["growth"] + MIB, (
        f"{got['growth'] / MIB:.1f} MiB after keeping 40 leaves of 4 KiB, stock {want['growth'] / MIB:.2f} MiB"
    )
    assert got["own"] <= want["own"] + got["parameter_bytes"] + MIB, (
        f"the optimizer holds {got['own'] / MIB:.1f} MiB, stock {want['own'] / MIB:.1f} MiB"
    )


@pytest.mark.parametrize("variant", PER_LEAF)
def test_one_kept_leaf_retains_at_most_twice_its_size_and_a_bounded_constant(variant):
    got = probe("one_kept_leaf", variant)
    assert got["retained"] <= 2 * got["leaf_bytes"] + MIB, (
        f"one kept {got['leaf_bytes'] / 1e3:.0f} KB leaf retains {got['retained'] / MIB:.2f} MiB"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_outlives_the_optimizer_and_its_results(variant):
    got, want = probe("all_dropped", variant), probe("all_dropped", "stock")
    assert got["left"] <= want["left"] + 64 * 1024, (
        f"{got['left'] / MIB:.2f} MiB left with the optimizer and its results dropped, stock {want['left'] / MIB:.2f}"
    )


# ------------------------------------------------------------- 8: inputs stock accepts ---


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_parameters_on_the_cpu(variant):
    def program(opt):
        with mx.stream(mx.cpu):
            p = leaves(300, 7, dtype=mx.float64)
            grads = [{k: x.astype(mx.float64) for k, x in g.items()} for g in gradient_sequence(p, 3, seed=1)]
            return {"p": steps(opt, p, grads), "state": opt.state}

    same_program(variant, program)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_gradients_for_bfloat16_parameters(variant):
    def program(opt):
        p = leaves(300, 7, dtype=mx.bfloat16)
        grads = [{k: x.astype(mx.float32) for k, x in g.items()} for g in gradient_sequence(p, 3, seed=1)]
        return {"p": steps(opt, p, grads), "state": opt.state}

    same_program(variant, program)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_cast_to_float16_mid_training(variant):
    """As a model does after ``set_dtype(mx.float16)``: its gradients come in its parameters' dtype."""

    def program(opt):
        p = leaves(300, 7, 300_000)
        grads = gradient_sequence(p, 5, seed=1)
        p = steps(opt, p, grads[:2])
        p = {k: x.astype(mx.float16) for k, x in p.items()}
        for g in grads[2:]:
            p = steps(opt, p, [{k: x.astype(p[k].dtype) for k, x in g.items()}])
        return {"p": p, "state": opt.state}

    same_program(variant, program)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_ordered_dict_as_a_leafs_state(variant):
    def program(opt):
        p = leaves(300, 7)
        grads = gradient_sequence(p, 4, seed=1)
        p = steps(opt, p, grads[:1])
        opt.state["p0"] = OrderedDict(opt.state["p0"])
        p = steps(opt, p, grads[1:])
        assert type(opt.state["p0"]) is OrderedDict
        return {"p": p, "state": opt.state}

    same_program(variant, program)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_exported_step_imports_and_runs_as_stock(variant, tmp_path):
    def step(name):
        def f(w0, w1, g0, g1):
            opt = make(name)
            p = {"p0": w0, "p1": w1}
            opt.init(p)
            new = opt.apply_gradients({"p0": g0, "p1": g1}, p)
            return new["p0"], new["p1"], opt.state["p0"]["v"], opt.state["p1"]["v"]

        return f

    p = leaves(300, 7)
    g = gradient_sequence(p, 1, seed=1)[0]
    args = [p["p0"], p["p1"], g["p0"], g["p1"]]
    path = str(tmp_path / "step.mlxfn")
    mx.export_function(path, step(variant), *args)
    got = mx.import_function(path)(*args)
    assert_same_bits(list(got), list(step("stock")(*args)), "the imported step")
