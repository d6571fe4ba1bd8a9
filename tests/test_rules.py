"""Each rule, against its stock class: defaults, checks, bytes moved, and its traced IR evaluated node by node
(:mod:`ir_eval`) over every configuration and dtype, bit for bit with the stock class, special values included."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import mlx.core as mx
import pytest
from ir_eval import evaluate
from program_oracle import assert_same_bits
from trajectory import far_from_defaults, rule_settings, setting_id, special_values

from rmsprop_impls.rules import RULE_NAMES, all_rules, element, rule

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
SETTINGS = rule_settings()
SETTING_IDS = [setting_id(*s) for s in SETTINGS]


@pytest.mark.parametrize("name", RULE_NAMES)
def test_defaults_are_the_stock_classs(name):
    r = rule(name)
    stock = r.stock(0.1)
    assert r.defaults and all(getattr(stock, key) == value for key, value in r.defaults.items())
    assert r.hyperparameters() == r.defaults


#: Values stock refuses for some rule (or takes): each rule must refuse exactly those stock refuses, with its error.
CANDIDATES = {
    "alpha": [-0.1, 0.0, 1.5],
    "eps": [-1.0, 0.0, 1e-30],
    "rho": [-0.5, 0.0, 2.0],
    "momentum": [-0.5, 0.0, 0.9],
    "dampening": [-0.1, 0.5],
    "nesterov": [True],
    "weight_decay": [-0.1, 0.0, 0.5],
    "betas": [[0.9, -0.1], [1.5, 0.9]],
    "bias_correction": [True],
}


def bad_or_not(name):
    r = rule(name)
    for key, values in CANDIDATES.items():
        if key in r.defaults:
            for value in values:
                yield pytest.param(name, {key: value}, id=f"{name}-{key}={value}")
    if name == "sgd":  # Nesterov's own check reads two hyper-parameters
        yield pytest.param(name, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, id="sgd-nesterov-damped")
        yield pytest.param(name, {"nesterov": True, "momentum": 0.9}, id="sgd-nesterov-momentum")


@pytest.mark.parametrize("name, hyper", [p for n in RULE_NAMES for p in bad_or_not(n)])
def test_hyperparameters_raise_exactly_what_stock_raises(name, hyper):
    r = rule(name)
    try:
        r.stock(0.1, **hyper)
    except Exception as stock_error:  # noqa: BLE001 (whatever stock raises, the rule raises the same)
        with pytest.raises(type(stock_error)) as e:
            r.hyperparameters(**hyper)
        assert str(e.value) == str(stock_error)
    else:
        assert r.hyperparameters(**hyper) == {**r.defaults, **hyper}


@pytest.mark.parametrize("name", RULE_NAMES)
def test_hyperparameters_positional_in_stocks_order_and_unknown_names(name):
    r = rule(name)
    values = list(r.defaults.values())
    assert r.hyperparameters(*values) == r.defaults
    with pytest.raises(TypeError, match="takes at most"):
        r.hyperparameters(*values, 0.5)
    with pytest.raises(TypeError, match=f"{r.title} has no hyper-parameter 'bogus'"):
        r.hyperparameters(bogus=1)
    first = next(iter(r.defaults))
    with pytest.raises(TypeError, match=f"got '{first}' twice"):
        r.hyperparameters(values[0], **{first: values[0]})


@pytest.mark.parametrize(
    "name, hyper, want",
    [
        ("rmsprop", {}, 20),
        ("sgd", {}, 12),
        ("sgd", {"weight_decay": 0.1}, 12),
        ("sgd", {"momentum": 0.9}, 20),
        ("sgd", {"momentum": 0.9, "nesterov": True}, 20),
        ("adagrad", {}, 20),
        ("adadelta", {}, 28),
        ("adam", {}, 28),
        ("adam", {"bias_correction": True}, 28),
        ("adamw", {}, 28),
        ("adamax", {}, 28),
        ("lion", {}, 20),
        ("lion", {"weight_decay": 0.1}, 20),
    ],
)
def test_bytes_per_element(name, hyper, want):
    r = rule(name)
    h = r.hyperparameters(**hyper)
    assert r.bytes_per_element(h) == want
    assert r.bytes_per_element(h, itemsize=2) == want // 2


# ---------------------------------------------------------------- configurations ---


def signatures(r, settings) -> set:
    return {r.trace(h).signature() for h in settings}


def branch_grid(r):
    """Every combination of branch-relevant values stock accepts: zero and non-zero, on and off."""
    values = {
        "momentum": [0.0, 0.5],
        "dampening": [0.0, 0.2],
        "nesterov": [False, True],
        "weight_decay": [0.0, 0.3],
        "bias_correction": [False, True],
    }
    keys = [k for k in values if k in r.defaults]
    for combo in itertools.product(*(values[k] for k in keys)):
        try:
            yield r.hyperparameters(**dict(zip(keys, combo)))
        except ValueError:
            continue


@pytest.mark.parametrize("name", RULE_NAMES)
def test_configurations_cover_every_distinct_trace_once(name):
    r = rule(name)
    configured = signatures(r, r.configurations())
    assert len(configured) == len(r.configurations()), "two configurations trace the same update"
    assert signatures(r, branch_grid(r)) <= configured
    assert signatures(r, [far_from_defaults(h) for h in r.configurations()]) == configured


# --------------------------------------------------- the IR, evaluated, against stock ---


def leaf(dtype, seed, n=48):
    """Normal values with the special ones over the first elements (zeros, subnormals, infinities, NaN)."""
    x = mx.random.normal((n,), key=mx.random.key(seed)).astype(dtype)
    specials = special_values(dtype)
    return mx.concatenate([specials, x[specials.size :]])


def ir_steps(r, hyper, w, grads, lr, dtype):
    """The rule's IR evaluated step after step: the final ``(w, states)``."""
    t = r.trace(hyper)
    states = {name: mx.zeros_like(w) for name in r.states}
    for step, g in enumerate(grads, start=1):
        values = r.step_values(hyper, mx.array(step, mx.uint64))
        new_w, changed = evaluate(t, {"w": w, "g": g, "lr": lr, **states, **values}, dtype)
        w, states = new_w, {**states, **changed}
        mx.eval(w, states)
    return w, states


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, hyper", SETTINGS, ids=SETTING_IDS)
def test_the_traced_ir_computes_stocks_bits(name, hyper, dtype):
    r = rule(name)
    lr = 0.07
    w0 = leaf(dtype, 1)
    # The specials sit in g on the first step and move one place per step, so each meets a finite state too.
    grads = [mx.roll(leaf(dtype, 10 + k), k) for k in range(4)]
    got_w, got_states = ir_steps(r, hyper, w0, grads, mx.array(lr, mx.float32), dtype)
    stock = r.stock(lr, **hyper)
    params = {"w": w0}
    for g in grads:
        params = stock.apply_gradients({"w": g}, params)
        mx.eval(params, stock.state)
    assert_same_bits({"w": got_w}, params, f"{name} w")
    assert_same_bits(got_states, {k: stock.state["w"][k] for k in r.states}, f"{name} state")


def test_every_rule_is_traced_in_every_configuration():
    for r in all_rules():
        for h in r.configurations():
            t = r.trace(h)
            assert t.w_out >= 0 and set(t.state_out) <= set(r.states)
            assert {"w", "g"} <= t.used_inputs()


# ------------------------------------------------------- element, Const and Trace ---


def test_constants_fold_in_double_as_python_does():
    c = element.Const(0.1)
    assert (c + 0.2).value == 0.1 + 0.2
    assert (1 - element.Const(0.999)).value == 1 - 0.999
    assert (element.Const(3.0) / element.Const(7.0)).value == 3.0 / 7.0
    assert (2 * c).value == 0.2 and (c * c).value == 0.1 * 0.1
    assert c > 0 and c <= 0.1 and c == 0.1 and not (c < 0.1) and c != 0.2


def trace_of(f):
    t = element.Trace(("w", "g"), ("lr",))
    return t, f(element.TraceOps(t), SimpleNamespace(**t.inputs))


def test_a_constant_meeting_a_T_array_is_a_T_slot_of_its_folded_value():
    t, v = trace_of(lambda e, x: (1 - element.Const(0.9)) * x.g)
    node = v.node
    assert node.kind == element.T and not node.uniform
    slot = t.nodes[node.args[0]]
    assert slot.op == "slot" and slot.kind == element.T and slot.uniform
    assert t.slots[slot.slot] == 1 - 0.9


def test_T_meeting_float32_computes_in_float32_and_a_cast_returns_to_T():
    t, v = trace_of(lambda e, x: x.g * x.lr)
    assert v.node.kind == element.F32
    t, v = trace_of(lambda e, x: e.cast(x.lr, x.g) * 2.0)
    assert v.node.kind == element.T and t.nodes[v.node.args[0]].op == "cast"
    assert t.nodes[v.node.args[1]].kind == element.T
    _, v = trace_of(lambda e, x: x.lr * 2.0)
    assert v.node.kind == element.F32 and v.node.uniform


def test_what_a_trace_refuses():
    with pytest.raises(TypeError, match="not bool"):
        trace_of(lambda e, x: x.g * True)
    with pytest.raises(TypeError, match="sqrt takes a traced array"):
        trace_of(lambda e, x: e.sqrt(2.0))
    with pytest.raises(ValueError, match="does not declare"):
        element.trace(lambda e, h, x: (x.w, {"m": x.g}), {}, ("v",), ())


def test_a_state_neither_read_nor_written_is_not_streamed():
    sgd = rule("sgd")
    assert "v" not in sgd.trace(sgd.defaults).used_inputs()
    assert "v" in sgd.trace(sgd.hyperparameters(momentum=0.9)).used_inputs()


def test_the_signature_ignores_slot_values_but_not_branches():
    r = rule("rmsprop")
    a, b = r.trace(r.hyperparameters(alpha=0.5)), r.trace(r.hyperparameters(alpha=0.7))
    assert a.signature() == b.signature() and a.slots != b.slots
    sgd = rule("sgd")
    assert sgd.trace(sgd.defaults).signature() != sgd.trace(sgd.hyperparameters(momentum=0.5)).signature()
