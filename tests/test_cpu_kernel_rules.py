"""``cpu_kernel`` for every rule: the generated kernels are current and bit-identical with the stock class in
float32, float16 and bfloat16 (zeros, -0, subnormals, inf and NaN included, every NaN counted as one value;
hyper-parameters far from the defaults), sound in place for a two-state rule (AdamW), and right under grad,
jvp and vmap.

By default each kernel runs in one dtype (they take turns) and, in float32, one precision (about 25 s
here); ``RMSPROP_FULL_GRID=1`` runs every kernel in every dtype and both precisions (about 40 s).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from rmsprop_impls import create
from rmsprop_impls.kernels._cpu_ext import generate
from rmsprop_impls.registry import unavailable_reason

REASON = unavailable_reason("cpu_kernel")
needs_extension = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext

FULL = os.environ.get("RMSPROP_FULL_GRID") == "1"
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
KERNELS = generate.kernels()
STEPS = 6


def test_the_checked_in_headers_are_what_the_generator_writes():
    assert generate.stale() == [], "a rule changed: run python -m rmsprop_impls.kernels._cpu_ext.generate"


def test_every_setting_of_every_rule_has_a_kernel_and_the_kernels_differ():
    from rmsprop_impls.rules import all_rules

    assert len(KERNELS) == 18
    for rule in all_rules():
        for hyper in rule.configurations():
            assert generate.kernel_index(rule.trace(hyper)) is not None, (rule.name, hyper)
    assert len({k.digest for k in KERNELS}) == len(KERNELS)


@needs_extension
def test_the_extension_runs_the_generated_kernels():
    assert _cpu_ext._ext.kernels_table() == [(k.title, k.digest) for k in KERNELS]


def far_from_defaults(hyper: dict) -> dict:
    """Every number in (0, 1) moved half-way to 0.5 (0.9 to 0.7, 1e-8 to 0.25): the same branches, so the same
    kernel, with other slot values."""

    def move(x):
        if isinstance(x, (list, tuple)):
            return type(x)(move(y) for y in x)
        return (x + 0.5) / 2 if isinstance(x, float) and 0 < x < 1 else x

    return {k: move(v) for k, v in hyper.items()}


def special_values(dtype) -> list[float]:
    """Zeros, a subnormal of ``dtype``, the largest finite values, infinities and NaN."""
    tiny = {mx.float32: 1e-40, mx.float16: 3e-6, mx.bfloat16: 1e-39}[dtype]
    big = {mx.float32: 3e38, mx.float16: 6e4, mx.bfloat16: 3e38}[dtype]
    return [0.0, -0.0, tiny, -tiny, big, -big, float("inf"), -float("inf"), float("nan")]


def with_specials(x: mx.array, seed: int) -> mx.array:
    """``x`` with the special values of its dtype at a few places that move from step to step."""
    flat = np.array(x.astype(mx.float32)).reshape(-1)
    values = special_values(x.dtype)
    places = np.random.default_rng(seed).choice(flat.size, size=min(flat.size, 3 * len(values)), replace=False)
    flat[places] = np.resize(values, places.size)
    return mx.array(flat).reshape(x.shape).astype(x.dtype)


def bits(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint32 if x.dtype == mx.float32 else mx.uint16))


def nan_bits(x: mx.array) -> np.ndarray:
    """:func:`bits`, with every NaN as one value: the contract (docs/kernels/cpu.md) leaves a NaN's sign and
    payload open, since where two NaNs meet in one operation IEEE 754 lets either through, and the compilers
    (of stock's MLX too) pick either operand."""
    out = bits(x).astype(np.int64)
    out[np.isnan(np.array(x.astype(mx.float32)))] = -1
    return out


SHAPES = {"odd": (37,), "matrix": (19, 53), "list": [(3,), (2, 5)]}


def tree(make, dtype):
    return {k: [make(x) for x in s] if isinstance(s, list) else make(s) for k, s in SHAPES.items()}


def leaves(t):
    return [x for v in t.values() for x in (v if isinstance(v, list) else [v])]


def grid():
    """(kernel, dtype, precision): every kernel in every dtype, and in float32 in both precisions (which are one
    contract there); or each kernel in one dtype and, in float32, one precision."""
    for k in KERNELS:
        for d, dtype in enumerate(DTYPES):
            if FULL or d == k.index % len(DTYPES):
                precisions = ("stock", "float32") if dtype == mx.float32 and FULL else ("stock",)
                if dtype == mx.float32 and not FULL:
                    precisions = (("stock", "float32")[k.index // len(DTYPES) % 2],)
                for p in precisions:
                    yield pytest.param(k, dtype, p, id=f"{k.index}-{k.rule.name}-{str(dtype).split('.')[-1]}-{p}")


@needs_extension
@pytest.mark.parametrize("kernel, dtype, precision", list(grid()))
def test_every_kernel_is_bit_identical_with_stock_over_many_steps(kernel, dtype, precision):
    hyper = far_from_defaults(kernel.hyper)
    assert generate.kernel_index(kernel.rule.trace(hyper)) == kernel.index
    mx.random.seed(kernel.index)
    params = tree(lambda s: with_specials(mx.random.normal(s).astype(dtype), 1), dtype)
    opt = create("cpu_kernel", 0.3, optimizer=kernel.rule, precision=precision, **hyper)
    stock = kernel.rule.stock(0.3, **hyper)
    mine, theirs = params, params
    for step in range(STEPS):
        g = tree(lambda s, step=step: with_specials(mx.random.normal(s).astype(dtype) * 3, step), dtype)
        mine, theirs = opt.apply_gradients(g, mine), stock.apply_gradients(g, theirs)
        mx.eval(mine, theirs, opt.state, stock.state)
        for a, b in zip(leaves(mine), leaves(theirs)):
            assert np.array_equal(nan_bits(a), nan_bits(b)), f"w after step {step + 1}"
        for name in kernel.rule.states:
            for a, b in zip(leaves(_states(opt.state, name)), leaves(_states(stock.state, name))):
                assert np.array_equal(nan_bits(a), nan_bits(b)), f"{name} after step {step + 1}"


def _states(state, name):
    return {k: [s[name] for s in v] if isinstance(v, list) else v[name] for k, v in state.items() if k in SHAPES}


def float32_grid():
    for k in KERNELS:
        for d, dtype in enumerate(DTYPES[1:]):
            if FULL or d == k.index % 2:
                yield pytest.param(k, dtype, id=f"{k.index}-{k.rule.name}-{str(dtype).split('.')[-1]}")


@needs_extension
@pytest.mark.parametrize("kernel, dtype", list(float32_grid()))
@pytest.mark.parametrize("n", [1001, "graph"], ids=["small", "graph-sized"])
def test_precision_float32_is_stock_in_float32_rounded_once(kernel, dtype, n):
    """``precision="float32"``: stock's step on the float32 values, rounded once to the storage dtype."""
    n = _cpu_ext.EAGER_MAX_ELEMENTS + 1 if n == "graph" else n
    hyper = far_from_defaults(kernel.hyper)
    mx.random.seed(kernel.index)
    w, g = (with_specials(mx.random.normal((n,)).astype(dtype), seed) for seed in (1, 2))
    states = {name: mx.abs(mx.random.normal((n,))).astype(dtype) for name in kernel.rule.states}
    lr = mx.array(0.3)
    values = kernel.rule.step_values(hyper, mx.array(3, mx.uint64))
    got_w, got_s = kernel_step(kernel, hyper, w, g, states, lr, values, precision="float32")
    f32 = {name: x.astype(mx.float32) for name, x in states.items()}
    want_w, want_s = kernel.rule.update(hyper, w.astype(mx.float32), g.astype(mx.float32), f32, lr, values)
    assert np.array_equal(nan_bits(got_w), nan_bits(want_w.astype(dtype)))
    assert set(got_s) == set(want_s)
    for name in want_s:
        assert np.array_equal(nan_bits(got_s[name]), nan_bits(want_s[name].astype(dtype))), name


def kernel_step(kernel, hyper, w, g, states, lr, values, precision="stock"):
    """One leaf through ``optimizer_update``: (new w, {changed state: new array})."""
    k = _cpu_ext.kernel_for(kernel.rule, hyper)
    ordered = [[states[name]] for name in kernel.rule.states]
    inputs = [values.get(name, mx.array(0.0)) for name in kernel.rule.step_inputs]
    (nw,), new = _cpu_ext.optimizer_update(k.index, k.slots, [w], [g], ordered, lr, inputs, 2, precision)
    return nw, {name: x[0] for name, x in zip(kernel.rule.states, new) if x}


# ------------------------------------------------------------ AdamW in place ---

ADAMW = next(k for k in KERNELS if k.rule.name == "adamw" and k.hyper["bias_correction"])


def training(opt, params, n_steps, seed=0):
    mx.random.seed(seed)
    for _ in range(n_steps):
        g = {k: mx.random.normal(x.shape) for k, x in params.items()}
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params


def small_params(n=6):
    mx.random.seed(9)
    return {f"p{i}": mx.random.normal((300 + i,)) for i in range(n)}


@needs_extension
def test_adamw_updates_both_states_in_place_and_held_states_never_change():
    opt = create("cpu_kernel", 1e-2, optimizer="adamw", bias_correction=True)
    stock = ADAMW.rule.stock(1e-2, bias_correction=True)
    params = small_params()
    first = training(opt, params, 2)
    held = {k: (opt.state[k]["m"], opt.state[k]["v"]) for k in first}
    kept = {k: (np.array(m), np.array(v)) for k, (m, v) in held.items()}
    del held
    before = _cpu_ext.states_updated_in_place()
    got = training(opt, first, 3, seed=1)
    assert _cpu_ext.states_updated_in_place() - before >= 2 * len(first) * 2  # m and v of every leaf
    held = {k: (opt.state[k]["m"], opt.state[k]["v"]) for k in got}
    kept = {k: (np.array(m), np.array(v)) for k, (m, v) in held.items()}
    training(opt, got, 2, seed=2)
    for k, (m, v) in held.items():
        assert np.array_equal(np.array(m), kept[k][0]) and np.array_equal(np.array(v), kept[k][1]), k
    want = training(stock, training(stock, params, 2), 3, seed=1)
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)


@needs_extension
@pytest.mark.parametrize("how", ["m is v", "m views another array", "v is a slice of m's buffer"])
def test_adamw_states_that_share_memory_are_not_written_in_place(how):
    """Each state array is checked: a state that is, or views, other memory is never written into."""
    params = {"a": mx.random.normal((256,)), "b": mx.random.normal((256,))}
    opt = create("cpu_kernel", 1e-2, optimizer="adamw")
    stock = ADAMW.rule.stock(1e-2)
    opt.init(params)
    stock.init(params)
    base = mx.abs(mx.random.normal((512,)))
    mx.eval(base)
    for state in (opt.state["a"], stock.state["a"]):
        if how == "m is v":
            state["m"] = state["v"] = base[:256] * 1
        elif how == "m views another array":
            state["m"], state["v"] = base[:256], base[256:] * 1
        else:
            state["m"], state["v"] = base[256:], base[:256]
    mx.eval(opt.state, stock.state)
    kept = np.array(base)
    got = training(opt, params, 2, seed=3)
    want = training(stock, params, 2, seed=3)
    assert np.array_equal(np.array(base), kept)
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)
    for name in ("m", "v"):
        assert np.array_equal(np.array(opt.state["a"][name]), np.array(stock.state["a"][name])), name


@needs_extension
def test_adamw_leaves_sharing_one_state_dict_step_as_stock():
    params = {"a": mx.random.normal((64,)), "b": mx.random.normal((64,))}
    opt = create("cpu_kernel", 1e-2, optimizer="adamw")
    stock = ADAMW.rule.stock(1e-2)
    for o in (opt, stock):
        o.init(params)
        o.state["b"] = o.state["a"]
    got, want = training(opt, params, 3), training(stock, params, 3)
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)
    assert np.array_equal(np.array(opt.state["a"]["m"]), np.array(stock.state["a"]["m"]))


# ---------------------------------------------------------- AdamW transformed ---

LR = mx.array(0.01)
STEP_VALUES = ADAMW.rule.step_values(ADAMW.hyper, mx.array(2, mx.uint64))


def adamw_kernel(w, g, m, v, lr=LR, precision="stock"):
    nw, s = kernel_step(ADAMW, ADAMW.hyper, w, g, {"m": m, "v": v}, lr, STEP_VALUES, precision)
    return nw, s["m"], s["v"]


def adamw_stock(w, g, m, v, lr=LR):
    nw, s = ADAMW.rule.update(ADAMW.hyper, w, g, {"m": m, "v": v}, lr, STEP_VALUES)
    return nw, s["m"], s["v"]


def loss_after(step):
    def loss(w):
        nw, nm, nv = step(w, mx.sin(w) * 2, mx.cos(w), mx.abs(w) * 0.1)
        return (nw * nw).sum() + nm.sum() + nv.sum()

    return loss


@needs_extension
@pytest.mark.parametrize("n", [300, 70_000], ids=["small", "graph-sized"])
def test_adamw_grad_through_a_step_matches_stock(n):
    mx.random.seed(3)
    w = mx.random.normal((n,))
    got, want = mx.grad(loss_after(adamw_kernel))(w), mx.grad(loss_after(adamw_stock))(w)
    assert np.allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    got_lr = mx.grad(lambda lr: adamw_kernel(w, mx.sin(w), mx.cos(w), mx.abs(w), lr)[0].sum())(LR)
    want_lr = mx.grad(lambda lr: adamw_stock(w, mx.sin(w), mx.cos(w), mx.abs(w), lr)[0].sum())(LR)
    assert np.allclose(got_lr.item(), want_lr.item(), rtol=1e-5)


@needs_extension
def test_adamw_compiled_step_keeps_the_node_and_its_vjp_and_jvp_match_stock():
    """States that are inputs of a compiled function keep the OptimizerStep node; its vjp and jvp run the
    generated formula."""
    mx.random.seed(4)
    w, g, m, v, t = (mx.random.normal((70_000,)) for _ in range(5))
    v = mx.abs(v)
    compiled = mx.compile(adamw_kernel)
    for a, b in zip(compiled(w, g, m, v), adamw_stock(w, g, m, v)):
        assert np.array_equal(np.array(a), np.array(b))
    cot = [mx.ones_like(w)] * 3
    _, got = mx.vjp(lambda *x: list(compiled(*x)), [w, g, m, v], cot)
    _, want = mx.vjp(lambda *x: list(adamw_stock(*x)), [w, g, m, v], cot)
    for a, b in zip(got, want):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    _, got = mx.jvp(lambda *x: list(compiled(*x)), [w, g, m, v], [t] * 4)
    _, want = mx.jvp(lambda *x: list(adamw_stock(*x)), [w, g, m, v], [t] * 4)
    for a, b in zip(got, want):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


@needs_extension
@pytest.mark.parametrize("axes", [(0, 0, 0, 0), (1, 0, None, 0), (None, 1, 0, None)])
def test_adamw_vmap_over_a_step_matches_stock(axes):
    mx.random.seed(5)
    shapes = {0: (4, 30), 1: (30, 4), None: (30,)}
    w, g, m, v = (mx.random.normal(shapes[a]) for a in axes)
    v = mx.abs(v)
    got = mx.vmap(adamw_kernel, in_axes=axes)(w, g, m, v)
    want = mx.vmap(adamw_stock, in_axes=axes)(w, g, m, v)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert np.array_equal(np.array(a), np.array(b))


@needs_extension
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.index}-{k.rule.name}")
def test_every_instruction_set_gives_stocks_bits(kernel):
    """Each kernel on each instruction set this CPU runs (AVX2 or NEON, and the scalar loop), one step with
    special values in w, g and every state (negative ones too) on a leaf with a vector tail, in the dtype it
    takes its turn in."""
    dtype = DTYPES[kernel.index % len(DTYPES)]
    hyper = far_from_defaults(kernel.hyper)
    mx.random.seed(kernel.index)
    w, g = (with_specials(mx.random.normal((1003,)).astype(dtype), seed) for seed in (3, 4))
    states = {name: with_specials(mx.random.normal((1003,)).astype(dtype), 5) for name in kernel.rule.states}
    values = kernel.rule.step_values(hyper, mx.array(4, mx.uint64))
    want_w, want_s = kernel.rule.update(hyper, w, g, states, mx.array(0.3), values)
    default = _cpu_ext._ext.kernel()
    try:
        for isa in _cpu_ext._ext.kernels():
            _cpu_ext._ext.set_kernel(isa)
            got_w, got_s = kernel_step(kernel, hyper, w, g, states, mx.array(0.3), values)
            assert np.array_equal(nan_bits(got_w), nan_bits(want_w)), isa
            for name in want_s:
                assert np.array_equal(nan_bits(got_s[name]), nan_bits(want_s[name])), (isa, name)
    finally:
        _cpu_ext._ext.set_kernel(default)


@needs_extension
def test_hyper_parameters_changed_between_steps_take_effect():
    """A program may set ``opt.betas``, ``opt.momentum`` or ``opt.bias_correction`` between steps, as on the stock
    class: the next step runs with the new values, and with another kernel where a branch changes (Adam's bias
    correction also makes the step compute per-step inputs it did not before)."""
    params = small_params(3)
    changing = (
        ("adamw", {"betas": [0.5, 0.6], "eps": 1e-3}),
        ("sgd", {"momentum": 0.0}),
        ("adam", {"bias_correction": True}),
    )
    for name, changes in changing:
        opt = create("cpu_kernel", 1e-2, optimizer=name, **({"momentum": 0.9} if name == "sgd" else {}))
        stock = opt.rule.stock(1e-2, **({"momentum": 0.9} if name == "sgd" else {}))
        got, want = training(opt, params, 2), training(stock, params, 2)
        for o in (opt, stock):
            for key, value in changes.items():
                setattr(o, key, value)
        got, want = training(opt, got, 2, seed=4), training(stock, want, 2, seed=4)
        assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got), name
    adamw = create("cpu_kernel", 1e-2, optimizer="adamw", betas=[0.9, 0.999])  # lists of their own
    stock = ADAMW.rule.stock(1e-2, betas=[0.9, 0.999])
    got, want = training(adamw, params, 2), training(stock, params, 2)
    adamw.betas[0] = stock.betas[0] = 0.3  # a list changed in place is seen too
    got, want = training(adamw, got, 2, seed=5), training(stock, want, 2, seed=5)
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)


@needs_extension
def test_a_rule_with_no_generated_kernel_runs_its_own_mlx_ops():
    from rmsprop_impls.rules import rule

    class Halved(type(rule("rmsprop"))):
        """RMSprop with half the step: a trace no kernel was generated for."""

        def element(self, e, h, x):
            w, states = super().element(e, h, x)
            return (w + x.w) * 0.5, states

    halved = Halved()
    assert _cpu_ext.kernel_for(halved, halved.defaults) is None
    params = small_params(2)
    opt = create("cpu_kernel", 1e-2, optimizer=halved)
    got = training(opt, params, 2)
    want, v = dict(params), {k: mx.zeros_like(x) for k, x in params.items()}
    mx.random.seed(0)
    for _ in range(2):
        g = {k: mx.random.normal(x.shape) for k, x in params.items()}
        for k in want:
            want[k], new = halved.update(halved.defaults, want[k], g[k], {"v": v[k]}, mx.array(1e-2), {})
            v[k] = new["v"]
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)
