"""``cpu_kernel``'s whole step in C++ (``_cpu_ext.TreeStep``): the same numbers and state as the
Python walk, refusal (with nothing changed) where a tree is not plain, and no crash when threads
share or change the trees."""

from __future__ import annotations

import copy
import threading
import weakref

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from rmsprop_impls import TreeMismatchError, create
from rmsprop_impls.registry import unavailable_reason
from rmsprop_impls.rules import rule as rule_named

REASON = unavailable_reason("cpu_kernel")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext


def nested(dtype=mx.float32, seed=0):
    """Dicts, lists and tuples; small leaves and one past the eager limit (a graph node)."""
    mx.random.seed(seed)
    big = _cpu_ext.EAGER_MAX_ELEMENTS + 5

    def r(*shape):
        return mx.random.normal(shape).astype(dtype)

    return {"a": r(3, 5), "layers": [{"w": r(7), "b": r(1)}, (r(2, 2), r(big))], "deep": {"er": {"x": r(300)}}}


def without_fast_path(opt):
    """The same optimizer with the C++ walk switched off: every step takes the Python walk."""
    opt._tree_step = lambda: None
    return opt


def flat(tree):
    from mlx.utils import tree_flatten

    return [(k, np.array(v.astype(mx.float32))) for k, v in tree_flatten(tree)]


def assert_same_trees(a, b):
    fa, fb = flat(a), flat(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("learning_rate", [1e-2, optim.cosine_decay(1e-2, 10)], ids=["float", "schedule"])
def test_same_bits_and_state_as_the_python_walk_and_stock(dtype, learning_rate):
    params = nested(dtype)
    fast, slow = create("cpu_kernel", learning_rate), without_fast_path(create("cpu_kernel", learning_rate))
    stock = optim.RMSprop(learning_rate)
    pf = ps = pk = params
    for step in range(6):
        grads = nested(dtype, seed=step + 1)
        pf, ps, pk = fast.apply_gradients(grads, pf), slow.apply_gradients(grads, ps), stock.apply_gradients(grads, pk)
        mx.eval(pf, ps, pk, fast.state, slow.state, stock.state)
    assert type(pf["layers"][1]) is tuple and type(pf["layers"]) is list
    assert_same_trees(pf, ps)
    assert_same_trees(pf, pk)
    assert_same_trees(fast.state, slow.state)
    assert fast.state["step"].dtype == mx.uint64 and fast.state["step"].item() == 6
    assert_same_trees(fast.state, stock.state)


def test_a_module_as_parameters_and_gradients_for_part_of_it():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    stock_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    stock_model.update(model.parameters())
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    x = mx.random.normal((16, 4))
    for _ in range(4):
        for m, o in ((model, opt), (stock_model, stock)):
            grads = nn.value_and_grad(m, lambda m, x: (m(x) ** 2).sum())(m, x)[1]
            grads = {"layers": [grads["layers"][0], {}, {"weight": grads["layers"][2]["weight"]}]}  # part of it
            o.update(m, grads)
            mx.eval(m.parameters(), o.state)
    assert_same_trees(model.parameters(), stock_model.parameters())


def test_the_tree_step_refuses_trees_that_are_not_plain_and_changes_nothing():
    opt = create("cpu_kernel", 1e-2)
    params = {"w": mx.ones((4,)), "l": [mx.ones((2,))]}
    grads = {"w": mx.ones((4,)), "l": [mx.ones((2,))]}
    params = opt.apply_gradients(grads, params)  # the first step makes the state
    mx.eval(params, opt.state)
    step, v = opt.state["step"], opt.state["w"]["v"]
    kernel = _cpu_ext.kernel_for(opt.rule, opt.hyper)
    step_tree = _cpu_ext.TreeStep(kernel.index, kernel.slots, ["v"], 1, "stock")
    args = (opt.learning_rate, [], [])
    refused = {
        "a leaf that is not an array": ({"w": 1.0, "l": [mx.ones((2,))]}, params),
        "a missing parameter": (grads, {"l": params["l"]}),
        "another shape": ({"w": mx.ones((5,)), "l": [mx.ones((2,))]}, params),
        "another dtype": ({"w": mx.ones((4,), mx.float16), "l": [mx.ones((2,))]}, params),
        "a list against a dict": ({"w": mx.ones((4,)), "l": {"0": mx.ones((2,))}}, params),
        "a list of another length": ({"w": mx.ones((4,)), "l": [mx.ones((2,)), mx.ones((2,))]}, params),
        "a key that is not a str": ({1: mx.ones((4,))}, {1: mx.ones((4,))}),
        "a list at the top": ([mx.ones((4,))], [mx.ones((4,))]),
    }
    for why, (g, p) in refused.items():
        assert step_tree(g, p, opt.state, *args) is None, why
        assert opt.state["step"] is step and opt.state["w"]["v"] is v, why
    a_v_of_another_shape = {**opt.state, "w": {"v": mx.ones((5,))}}
    assert step_tree(grads, params, a_v_of_another_shape, *args) is None
    assert a_v_of_another_shape["step"] is step and opt.state["w"]["v"] is v
    assert step_tree(grads, params, opt.state, *args) is not None
    assert opt.state["step"].item() == 2 and opt.state["w"]["v"] is not v


def test_errors_still_name_the_leaf_after_the_first_step():
    opt = create("cpu_kernel", 1e-2)
    params = {"block": [{"w": mx.ones((4,))}]}
    params = opt.apply_gradients({"block": [{"w": mx.ones((4,))}]}, params)
    with pytest.raises(TreeMismatchError, match="block.0.w"):
        opt.apply_gradients({"block": [{"w": mx.ones((5,))}]}, params)
    with pytest.raises(TreeMismatchError, match="block.0.x"):
        opt.apply_gradients({"block": [{"x": mx.ones((4,))}]}, params)


def test_threads_and_precision_changed_between_steps_take_effect():
    """The C++ step keeps its fixed arguments between steps; setting ``opt.precision`` or ``opt.threads`` makes
    a new one: the next steps give what an optimizer made with those settings gives."""
    params = nested(mx.float16)
    opt = create("cpu_kernel", 1e-2)
    for step in range(2):
        params = opt.apply_gradients(nested(mx.float16, seed=step + 1), params)
    mx.eval(params, opt.state)
    as_made, kept_on = copy.deepcopy(opt), copy.deepcopy(opt)  # a copy looks its C++ step up afresh
    as_made.precision, as_made.threads = "float32", 1
    opt.precision, opt.threads = "float32", 1
    ours, theirs, stock_rounding = params, params, params
    for step in range(2, 5):
        grads = nested(mx.float16, seed=step + 1)
        ours, theirs = opt.apply_gradients(grads, ours), as_made.apply_gradients(grads, theirs)
        stock_rounding = kept_on.apply_gradients(grads, stock_rounding)
        mx.eval(ours, theirs, stock_rounding, opt.state, as_made.state)
    assert_same_trees(ours, theirs)
    assert_same_trees(opt.state, as_made.state)
    differs = [not np.array_equal(x, y) for (_, x), (_, y) in zip(flat(ours), flat(stock_rounding))]
    assert any(differs), "float32 precision rounded as stock does: the change was not seen"


def test_threads_stepping_their_own_optimizers_match_one_thread():
    grads = nested(seed=3)

    def run(out, i):
        opt, p = create("cpu_kernel", 1e-2), nested()
        for _ in range(20):
            p = opt.apply_gradients(grads, p)
            mx.eval(p, opt.state)
        out[i] = p

    serial, threaded = [None], [None] * 4
    run(serial, 0)
    workers = [threading.Thread(target=run, args=(threaded, i)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for p in threaded:
        assert_same_trees(p, serial[0])


def test_threads_sharing_one_optimizer_and_changing_its_trees_do_not_crash():
    """Misuse, but reachable from Python: steps on one optimizer from two threads while a third
    swaps state entries and the gradient tree. Each step either runs or raises; the process lives."""
    opt = create("cpu_kernel", 1e-2)
    params = {"l": [mx.ones((256,)) for _ in range(64)]}
    grads = {"l": [mx.ones((256,)) for _ in range(64)]}
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    stop, errors = threading.Event(), []

    def stepper():
        p = params
        while not stop.is_set():
            try:
                p = opt.apply_gradients(grads, p)
                mx.eval(p, opt.state)
            except (ValueError, RuntimeError, TypeError) as e:  # a changed tree may be refused
                errors.append(e)

    def meddler():
        k = 0
        while not stop.is_set():
            v = mx.zeros((256,))
            mx.eval(v)  # MLX evaluates an array on its own thread's stream only
            opt.state["l"][k % 64] = {"v": v}
            grads["l"].append(grads["l"][0])
            grads["l"].pop()
            k += 1

    threads = [threading.Thread(target=f) for f in (stepper, stepper, meddler)]
    for t in threads:
        t.start()
    stop.wait(2.0)
    stop.set()
    for t in threads:
        t.join()
    p = opt.apply_gradients(grads, params)
    mx.eval(p, opt.state)
    assert all(np.isfinite(np.array(x)).all() for x in p["l"])


def rebinding_steps(opt, p, grads, n):
    """``n`` steps of a loop that rebinds its parameters, as training does; the last parameters."""
    for _ in range(n):
        p = opt.apply_gradients(grads, p)
        mx.eval(p, opt.state)
    return p


def small_tree(seed=0):
    mx.random.seed(seed)
    return {"a": mx.random.normal((1000,)), "b": [mx.random.normal((300,)), mx.random.normal((7, 5))]}


def test_v_is_updated_in_place_when_only_the_state_holds_it():
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    p = pk = small_tree()
    grads = small_tree(seed=1)
    before = _cpu_ext.states_updated_in_place()
    for _ in range(5):
        p, pk = opt.apply_gradients(grads, p), stock.apply_gradients(grads, pk)
        mx.eval(p, pk, opt.state, stock.state)
    assert _cpu_ext.states_updated_in_place() - before >= 3 * 3  # every leaf from the third step on
    assert_same_trees(p, pk)
    assert_same_trees(opt.state, stock.state)


def test_a_v_that_anything_else_holds_is_never_overwritten():
    """A held v, an evaluated slice of one (which shares its buffer), and a lazy graph reading one
    that is in flight keep the values they had; the other v's of a pack are then left alone too."""
    opt = create("cpu_kernel", 1e-2)
    p = small_tree()
    grads = small_tree(seed=1)
    p = rebinding_steps(opt, p, grads, 3)
    held = opt.state["a"]["v"]
    view = opt.state["b"][0]["v"][2:5]
    mx.eval(view)
    doubled = opt.state["b"][1]["v"] * 2
    mx.async_eval(doubled)
    snapshots = [np.array(held), np.array(view), 2 * np.array(opt.state["b"][1]["v"])]
    before = _cpu_ext.states_updated_in_place()
    p = rebinding_steps(opt, p, grads, 3)
    np.testing.assert_array_equal(np.array(held), snapshots[0])
    np.testing.assert_array_equal(np.array(view), snapshots[1])
    np.testing.assert_array_equal(np.array(doubled), snapshots[2])
    assert opt.state["a"]["v"] is not held
    assert _cpu_ext.states_updated_in_place() - before < 3 * 3


def test_new_w_goes_into_the_w_of_the_step_before_last_once_the_caller_dropped_it():
    """A loop that rebinds its parameters gets each packed leaf's new w written into that leaf's w of
    two steps before, with stock's numbers; the big leaf is still donated, as the spares hold only
    packed leaves."""
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    p = pk = nested()
    grads = nested(seed=1)
    spares, donated = _cpu_ext.w_into_spares(), _cpu_ext.donated_buffers()
    for _ in range(6):
        p, pk = opt.apply_gradients(grads, p), stock.apply_gradients(grads, pk)
        mx.eval(p, pk, opt.state, stock.state)
    assert _cpu_ext.w_into_spares() - spares == 3 * 5  # five packed leaves, from the fourth step on
    assert _cpu_ext.donated_buffers() - donated >= 2 * 4
    assert_same_trees(p, pk)
    assert_same_trees(opt.state, stock.state)


#: What a program keeps of an old parameter.
SIGHTINGS = ["held", "weak reference", "slice", "graph in flight"]


def keep_sight_of(old, how):
    """What a program keeps of ``old``: the array, a weak reference, an evaluated slice or a lazy graph in
    flight reading it; returns the check, for later, that it still sees old's values (a weak reference
    must have died: written into, the array would have lived on in the new parameters)."""
    want = np.array(old)
    if how == "weak reference":
        reference = weakref.ref(old)
        return lambda: reference() is None
    if how == "held":
        seen = old
    elif how == "slice":
        seen, want = old[2:5], want[2:5]
        mx.eval(seen)
    else:
        seen, want = old * 2, want * 2
        mx.async_eval(seen)
    return lambda: np.array_equal(np.array(seen), want)


@pytest.mark.parametrize("how", SIGHTINGS)
def test_a_w_that_anything_else_can_see_is_never_written_into(how):
    """An old parameter that is held, weakly referenced, viewed by an evaluated slice, or read by a lazy
    graph in flight keeps its values while the loop goes on dropping the others."""
    opt = create("cpu_kernel", 1e-2)
    p = small_tree()
    grads = small_tree(seed=1)
    p = rebinding_steps(opt, p, grads, 3)
    still_sees = keep_sight_of(p["b"][0], how)
    p = rebinding_steps(opt, p, grads, 4)
    assert still_sees()


class Layer(nn.Module):
    """Small leaves in dicts and a list, and one big leaf (a graph node): a model as mlx-examples' are."""

    def __init__(self, dtype=mx.float32, seed=0):
        super().__init__()
        tree = nested(dtype, seed)
        self.a, self.layers, self.deep = tree["a"], [tree["layers"][0], list(tree["layers"][1])], tree["deep"]


def model_steps(opt, model, grads, n):
    """``n`` steps of ``optimizer.update(model, grads)``, evaluated as mlx-examples' loops evaluate them."""
    for _ in range(n):
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)


def packed_ids(model):
    """The object ids of the model's small leaves: kept by id, so that the test holds none of them."""
    from mlx.utils import tree_flatten

    return {k: id(x) for k, x in tree_flatten(model.parameters()) if x.size < _cpu_ext.EAGER_MAX_ELEMENTS}


@pytest.mark.parametrize("name", ["rmsprop", "adamw", "sgd"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_update_writes_each_w_nothing_else_holds_over_the_old_one_with_stocks_bits(name, dtype):
    """Under ``update(model, grads)`` each packed leaf's new w goes over the old one (the model keeps the
    same object) and takes no spare; stock's bits, and the big leaf still donated."""
    hyper = {"momentum": 0.9} if name == "sgd" else {}
    opt, stock = create("cpu_kernel", 1e-2, optimizer=name, **hyper), rule_named(name).stock(1e-2, **hyper)
    model, twin = Layer(dtype), Layer(dtype)
    grads = nested(dtype, seed=1)
    grads["layers"][1] = list(grads["layers"][1])
    model_steps(opt, model, grads, 1)  # the first step makes the state, in the Python walk
    model_steps(stock, twin, grads, 1)
    ids = packed_ids(model)
    in_place, spares, donated = _cpu_ext.w_updated_in_place(), _cpu_ext.w_into_spares(), _cpu_ext.donated_buffers()
    for _ in range(4):
        opt.update(model, grads), stock.update(twin, grads)
        mx.eval(model.parameters(), twin.parameters(), opt.state, stock.state)
    assert _cpu_ext.w_updated_in_place() - in_place == 4 * len(ids)
    assert _cpu_ext.w_into_spares() == spares
    assert _cpu_ext.donated_buffers() - donated >= 4
    assert packed_ids(model) == ids
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(opt.state, stock.state)


def stepped_models(steps: int = 2):
    """``cpu_kernel`` and stock RMSprop each stepping a ``Layer`` ``steps`` times through ``update``."""
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    model, twin = Layer(), Layer()
    grads = nested(seed=1)
    grads["layers"][1] = list(grads["layers"][1])
    model_steps(opt, model, grads, steps)
    model_steps(stock, twin, grads, steps)
    return opt, stock, model, twin, grads


@pytest.mark.parametrize("how", SIGHTINGS)
def test_a_w_that_anything_else_can_see_keeps_its_values_under_update(how):
    """A model's leaf that the program holds, weakly references, views or reads in a lazy graph is never
    written over; the model's other leaves are. Stock's bits throughout."""
    opt, stock, model, twin, grads = stepped_models()
    still_sees = keep_sight_of(model.layers[0]["w"], how)
    in_place = _cpu_ext.w_updated_in_place()
    model_steps(opt, model, grads, 3)
    model_steps(stock, twin, grads, 3)
    assert still_sees()
    if how == "held":
        assert _cpu_ext.w_updated_in_place() - in_place == 3 * (len(packed_ids(model)) - 1)
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(opt.state, stock.state)


@pytest.mark.parametrize("how", ["tied", "parameters held", "apply_gradients"])
def test_no_w_is_written_over_that_the_model_holds_twice_or_the_caller_keeps(how):
    """A weight tied into two places of the model, a parameter tree the program keeps, and any leaf under
    ``apply_gradients`` (whose caller may keep the old tree) are never written over. Stock's bits."""
    opt, stock, model, twin, grads = stepped_models()
    kept = want = None
    if how == "tied":
        for m in (model, twin):
            m.deep["tied"] = m.layers[0]["w"]
        grads["deep"]["tied"] = grads["layers"][0]["w"]
        opt.init(model.parameters()), stock.init(twin.parameters())  # the new place gets its state
    elif how == "parameters held":
        kept = model.parameters()
        want = flat(kept)
    in_place = _cpu_ext.w_updated_in_place()
    for _ in range(3):
        if how == "apply_gradients":  # handed the model itself, as update hands it, with nothing else holding a w
            model.update(opt.apply_gradients(grads, model))
            twin.update(stock.apply_gradients(grads, twin))
            mx.eval(model.parameters(), twin.parameters(), opt.state, stock.state)
        else:
            model_steps(opt, model, grads, 1)
            model_steps(stock, twin, grads, 1)
    written_over = 3 * (len(packed_ids(model)) - 2) if how == "tied" else 0  # the tie's two places left out
    assert _cpu_ext.w_updated_in_place() - in_place == written_over
    if kept is not None:
        for (k, x), (_, y) in zip(flat(kept), want):
            np.testing.assert_array_equal(x, y, err_msg=k)
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(opt.state, stock.state)


class Frozen(dict):
    """A container whose item assignment keeps what it holds: ``Module.update`` cannot put a new w there."""

    def __setitem__(self, key, value):
        if key not in self:
            super().__setitem__(key, value)


@pytest.mark.parametrize("container", ["tuple", "own __setitem__"])
def test_update_writes_no_w_over_where_module_update_would_not_put_the_new_one(container):
    """``Module.update`` raises at a tuple (and assigns none of the leaves after it), and a container with
    its own ``__setitem__`` decides what it stores: a step whose model holds either writes no w over the
    old one, and the model ends as stock's."""
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)

    class Holding(nn.Module):
        def __init__(self):
            super().__init__()
            tree = small_tree()
            self.t = (tree["b"][0],) if container == "tuple" else Frozen(w=tree["b"][0])
            self.z = tree["a"]

    model, twin = Holding(), Holding()
    grads = {"t": (mx.ones((300,)),) if container == "tuple" else {"w": mx.ones((300,))}, "z": mx.ones((1000,))}
    in_place = _cpu_ext.w_updated_in_place()
    for _ in range(3):
        for opt_, m in ((opt, model), (stock, twin)):
            if container == "tuple":
                with pytest.raises(ValueError):
                    opt_.update(m, grads)
            else:
                opt_.update(m, grads)
            mx.eval(m.parameters(), opt_.state)
    assert _cpu_ext.w_updated_in_place() == in_place
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(opt.state, stock.state)


def test_a_model_with_its_own_update_or_a_plain_dict_gets_stocks_call():
    """A model class with its own ``update``, or a dict passed as the model, steps as stock's
    ``update`` does: no w written over."""

    class Averaging(Layer):
        def update(self, parameters, strict=True):
            return super().update(parameters, strict)

    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    grads = nested(seed=1)
    grads["layers"][1] = list(grads["layers"][1])
    model, twin = Averaging(), Averaging()
    in_place = _cpu_ext.w_updated_in_place()
    model_steps(opt, model, grads, 4)
    model_steps(stock, twin, grads, 4)
    p, pk = dict(Layer().parameters()), dict(Layer().parameters())
    opt2, stock2 = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    for _ in range(4):
        opt2.update(p, grads), stock2.update(pk, grads)
        mx.eval(p, pk, opt2.state, stock2.state)
    assert _cpu_ext.w_updated_in_place() == in_place
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(p, pk)


@pytest.mark.parametrize("call", ["update", "apply_gradients"])
def test_empty_gradient_containers_over_anything_take_the_cpp_walk_as_stock_takes_them(call):
    """mlx-lm's Llama keeps ``layer_types``, a list of strings, whose gradient is ``[{}, {}]``: stock never
    looks at the parameter under an empty gradient container, and neither does either walk. The C++ walk
    takes every step after the first (and under ``update`` writes the model's w's over), with stock's bits."""

    class WithTypes(Layer):
        def __init__(self):
            super().__init__()
            self.layer_types = ["full", "sliding"]

    opt, stock = create("cpu_kernel", 1e-2, optimizer="adamw"), optim.AdamW(1e-2)
    model, twin = WithTypes(), WithTypes()
    grads = nested(seed=1)
    grads["layers"][1] = list(grads["layers"][1])
    grads["layer_types"] = [{}, {}]
    taken = []
    looked_up = opt._looked_up

    def spied():
        settings, kernel, tree_step, unread = looked_up()

        def step(*args):
            result = tree_step(*args)
            taken.append(result is not None)  # not the result: holding its w's would keep them from being written over
            return result

        return settings, kernel, step, unread

    opt._looked_up = spied
    in_place = _cpu_ext.w_updated_in_place()
    for _ in range(3):
        if call == "update":
            opt.update(model, grads), stock.update(twin, grads)
        else:
            model.update(opt.apply_gradients(grads, model.parameters()))
            twin.update(stock.apply_gradients(grads, twin.parameters()))
        mx.eval(model.parameters(), twin.parameters(), opt.state, stock.state)
    assert taken == [True, True]
    assert _cpu_ext.w_updated_in_place() - in_place == (2 * len(packed_ids(model)) if call == "update" else 0)
    assert model.layer_types == ["full", "sliding"]
    assert_same_trees(model.parameters(), twin.parameters())
    assert_same_trees(opt.state, stock.state)


def test_timed_update_steps_each_optimizers_own_model_and_leaves_the_tree_it_was_given():
    """``time_interleaved(call="update")`` times ``opt.update(model, grads)`` as a loop makes it: each
    optimizer steps a model of its own, ``cpu_kernel`` writes its w's over, and the tree passed in keeps its
    values."""
    from rmsprop_impls.measure.timing import time_interleaved

    params, grads = small_tree(), small_tree(seed=1)
    want = flat(params)
    in_place = _cpu_ext.w_updated_in_place()
    optimizers = {"kernel": create("cpu_kernel", 1e-2), "stock": optim.RMSprop(1e-2)}
    timings = time_interleaved(optimizers, params, grads, 0.0, min_rounds=3, call="update")
    assert [len(t.samples) for t in timings.values()] == [3, 3]
    assert _cpu_ext.w_updated_in_place() - in_place >= 3 * 3
    for (k, x), (_, y) in zip(flat(params), want):
        np.testing.assert_array_equal(x, y, err_msg=k)
    assert_same_trees(optimizers["kernel"].state, optimizers["stock"].state)
    with pytest.raises(ValueError, match="call must be one of"):
        time_interleaved(optimizers, params, grads, 0.0, call="step")


@pytest.mark.parametrize("streamed", [False, True], ids=["plain stores", "streamed"])
def test_packed_leaves_give_stocks_bits_stored_plainly_or_streamed(streamed):
    """Under STREAM_MIN_BYTES of packed leaves per step the new w is stored plainly, from there on
    streamed past the cache; both give stock's bits, into new packs (the first steps) and spares."""
    size = _cpu_ext.EAGER_MAX_ELEMENTS // 4
    n = _cpu_ext.STREAM_MIN_BYTES // (4 * size) + 1 if streamed else 2
    assert (4 * size * n >= _cpu_ext.STREAM_MIN_BYTES) == streamed
    mx.random.seed(0)
    p = pk = {f"p{i}": mx.random.normal((size + i,)) for i in range(n)}  # odd sizes: vector tails
    grads = {k: mx.random.normal(x.shape) for k, x in p.items()}
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    spares = _cpu_ext.w_into_spares()
    for _ in range(5):
        p, pk = opt.apply_gradients(grads, p), stock.apply_gradients(grads, pk)
        mx.eval(p, pk, opt.state, stock.state)
    assert _cpu_ext.w_into_spares() - spares == 2 * n
    assert_same_trees(p, pk)
    assert_same_trees(opt.state, stock.state)


def test_a_deep_copy_steps_on_by_itself_as_stock_does():
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    p = pk = small_tree()
    grads = small_tree(seed=1)
    for _ in range(3):
        p, pk = opt.apply_gradients(grads, p), stock.apply_gradients(grads, pk)
        mx.eval(p, pk, opt.state, stock.state)
    twin, stock_twin = copy.deepcopy(opt), copy.deepcopy(stock)
    q, qk = p, pk
    for _ in range(3):
        p, q = opt.apply_gradients(grads, p), twin.apply_gradients(grads, q)
        qk = stock_twin.apply_gradients(grads, qk)
        mx.eval(p, q, qk, opt.state, twin.state, stock_twin.state)
    assert_same_trees(q, qk)
    assert_same_trees(twin.state, stock_twin.state)
    assert_same_trees(p, q)
    assert opt.state["a"]["v"] is not twin.state["a"]["v"]
