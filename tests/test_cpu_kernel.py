"""The C++ ``cpu_kernel`` beyond the agreement tests: odd sizes, threads, layouts, dtypes, donation, options."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from stock_update import rmsprop_update
from trajectory import check_against_reference_and_stock, gradient_sequence

import rmsprop_impls
from rmsprop_impls import VariantUnavailableError, create, reference_step
from rmsprop_impls.registry import unavailable_reason

REASON = unavailable_reason("cpu_kernel")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext

BIG = 1000003  # odd: an AVX2 tail, and shares between threads that end mid-leaf


def odd_tree():
    """More leaves than one node takes (8), of sizes 1, 3 and BIG, in nested dicts and lists."""
    mx.random.seed(11)
    sizes = [1, 3, 1, 3, 7, 1, 3, 1, BIG, 3, 1, 3, 5, 1]
    return {"layers": [{"w": mx.random.normal((n,))} for n in sizes], "big": mx.random.normal((3, BIG))}


def test_odd_leaf_sizes_match_reference_and_stock():
    params = odd_tree()
    check_against_reference_and_stock("cpu_kernel", params, gradient_sequence(params, 5), 1e-2)


def test_one_and_two_threads_agree_bit_for_bit():
    params = odd_tree()
    grads = gradient_sequence(params, 3)
    results = []
    for threads in (1, 2):
        opt = create("cpu_kernel", 1e-2, threads=threads)
        p = params
        for g in grads:
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
        results.append((p, opt.state))
    (p1, s1), (p2, s2) = results
    assert mx.array_equal(p1["big"], p2["big"]).item() and mx.array_equal(s1["big"]["v"], s2["big"]["v"]).item()
    assert all(mx.array_equal(a["w"], b["w"]).item() for a, b in zip(p1["layers"], p2["layers"]))


def step_both(w, g, v, threads=2):
    """One step of the kernel and of stock's MLX ops on the same (possibly strided, lazy) inputs."""
    lr = mx.array(0.01)
    (kw,), (kv,) = _cpu_ext.rmsprop_update([w], [g], [v], lr, 0.9, 1e-6, threads)
    sw, sv = rmsprop_update(w, g, v, lr, 0.9, 1e-6)
    mx.eval(kw, kv, sw, sv)
    return kw, kv, sw, sv


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b, c: (a.T, b.T, c.T),  # transposed, evaluated
        lambda a, b, c: ((a + 0).T, (b * 1).T, (c + 0).T),  # transposed and lazy: flags unknown until eval
        lambda a, b, c: (a[::2, 1:], b[1::2, :-1], c[1::2, 1:]),
        lambda a, b, c: (a, mx.broadcast_to(b[:1], a.shape), mx.broadcast_to(c[0, 0], a.shape)),
    ],
    ids=["transposed", "lazy-transposed", "strided", "broadcast"],
)
def test_non_contiguous_inputs(make):
    mx.random.seed(2)
    a, b, c = mx.random.normal((128, 38)), mx.random.normal((128, 38)), mx.abs(mx.random.normal((128, 38)))
    w, g, v = make(a, b, c)
    kw, kv, sw, sv = step_both(w, g, v)
    assert kw.shape == kv.shape == w.shape
    assert np.allclose(np.array(kw), np.array(sw), rtol=1e-6, atol=1e-7)
    assert np.allclose(np.array(kv), np.array(sv), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, ulp", [(mx.float16, 2.0**-10), (mx.bfloat16, 2.0**-7)], ids=["float16", "bfloat16"])
def test_half_precision_rounds_once_from_float32(dtype, ulp):
    """precision="float32": arithmetic in float32, one rounding to the storage dtype, so within one ulp
    of the float64 step."""
    mx.random.seed(4)
    n = 100003  # two threads' worth, with an AVX2 tail
    w, g = (mx.random.normal((n,)).astype(dtype) for _ in range(2))
    v = mx.random.uniform(0.1, 2.0, (n,)).astype(dtype)
    (kw,), (kv,) = _cpu_ext.rmsprop_update([w], [g], [v], mx.array(0.01), 0.9, 1e-6, 2, precision="float32")
    f64 = [np.array(x.astype(mx.float32), dtype=np.float64) for x in (w, g, v)]
    rw, rv = reference_step(*f64, 0.01, 0.9, 1e-6)
    for got, want in ((kw, rw), (kv, rv)):
        assert got.dtype == dtype
        got = np.array(got.astype(mx.float32), dtype=np.float64)
        assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3)) <= ulp


def training_loop(opt, params, grads):
    """``params = opt.apply_gradients(g, params)``, evaluated: the old parameters are dropped first."""
    for g in grads:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params


def graph_sized_tree(n_leaves: int = 10) -> dict:
    """Leaves just big enough for the graph path, which donates; smaller ones are updated at once."""
    return {f"p{i}": mx.random.normal((_cpu_ext.EAGER_MAX_ELEMENTS + i,)) for i in range(n_leaves)}


def test_donation_in_a_loop_that_drops_old_parameters():
    params = graph_sized_tree()
    grads = gradient_sequence(params, 4)
    opt = create("cpu_kernel", 1e-2)
    params = training_loop(opt, params, grads[:1])  # the first step's inputs are still held by the caller's tree
    before = _cpu_ext.donated_buffers()
    for g in grads[1:]:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    assert _cpu_ext.donated_buffers() - before == 2 * 10 * 3  # every w and v, every step


def test_no_donation_while_inputs_are_held_and_they_stay_unchanged():
    params = graph_sized_tree()
    grads = gradient_sequence(params, 3)
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    training_loop(opt, params, grads[:1])
    training_loop(stock, params, grads[:1])
    kept = {k: np.array(x) for k, x in params.items()}
    held_v = [s["v"] for s in opt.state.values() if isinstance(s, dict)]
    kept_v = [np.array(x) for x in held_v]
    before = _cpu_ext.donated_buffers()
    new = opt.apply_gradients(grads[1], params)
    want = stock.apply_gradients(grads[1], params)
    mx.eval(new, opt.state, want)
    assert _cpu_ext.donated_buffers() == before
    assert all(np.array_equal(np.array(params[k]), kept[k]) for k in params)
    assert all(np.array_equal(np.array(x), y) for x, y in zip(held_v, kept_v))
    assert all(np.allclose(np.array(new[k]), np.array(want[k]), rtol=1e-6) for k in params)


@pytest.mark.parametrize("size", [257, "graph"], ids=["small", "graph-sized"])
def test_two_lazy_steps_before_one_eval(size):
    """Graph path: the second node's inputs are the first node's lazy outputs, donated inside one eval.
    Small leaves: the second step evaluates the first step's outputs before updating them."""
    size = _cpu_ext.EAGER_MAX_ELEMENTS if size == "graph" else size
    params = {f"p{i}": mx.random.normal((size,)) for i in range(12)}
    grads = gradient_sequence(params, 2)
    opt = create("cpu_kernel", 1e-2)
    ref = {k: np.array(x, dtype=np.float64) for k, x in params.items()}
    ref_v = {k: np.zeros(size) for k in params}
    for g in grads:
        params = opt.apply_gradients(g, params)
        for k in ref:
            ref[k], ref_v[k] = reference_step(ref[k], np.array(g[k], dtype=np.float64), ref_v[k], 1e-2, 0.99, 1e-8)
    mx.eval(params, opt.state)
    assert all(np.allclose(np.array(params[k]), ref[k], rtol=1e-5, atol=1e-6) for k in params)


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_threads_must_be_a_positive_int(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        create("cpu_kernel", 1e-3, threads=threads)


def test_threads_default_to_every_core():
    from rmsprop_impls.cpu_threads import default_threads  # the cores this process may use (a Mac's P-cores)

    assert create("cpu_kernel", 1e-3).threads == default_threads()
    assert create("cpu_kernel", 1e-3, threads=3).threads == 3


def test_unavailable_with_the_reason_when_the_extension_does_not_load(monkeypatch):
    # What a skipped build looks like to import.
    monkeypatch.setitem(sys.modules, "rmsprop_impls.kernels._cpu_ext", None)
    monkeypatch.delattr(rmsprop_impls.kernels, "_cpu_ext")
    reason = unavailable_reason("cpu_kernel")
    assert reason.startswith("the C++ extension rmsprop_impls.kernels._cpu_ext does not load (")
    assert "RMSPROP_BENCH_NO_EXTENSION" in reason
    with pytest.raises(VariantUnavailableError) as err:
        create("cpu_kernel", 1e-3)
    assert err.value.reason == reason


def huge_pages_unavailable() -> str | None:
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if release < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1, this is {os.uname().release}"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return "transparent huge pages are off ([never])"
    except OSError:
        return "no transparent huge pages here"
    return None


@pytest.mark.skipif(huge_pages_unavailable() is not None, reason=str(huge_pages_unavailable()))
def test_long_lived_big_buffers_move_to_huge_pages_and_keep_their_values():
    """w, v (updated in place) and a reused g are moved on their second step; the values do not change."""
    mx.random.seed(5)
    params = {"w": mx.random.normal((2_000_000,))}  # 8 MB: three whole 2 MiB pages inside
    g = {"w": mx.random.normal((2_000_000,))}
    opt, stock = create("cpu_kernel", 1e-2), optim.RMSprop(1e-2)
    want = training_loop(stock, params, [g] * 3)
    tried, moved = _cpu_ext.huge_page_tries(), _cpu_ext.huge_page_moves()
    got = training_loop(opt, params, [g] * 3)
    # The kernel may refuse a move when it has no free huge page at that moment (a busy machine).
    assert _cpu_ext.huge_page_tries() - tried == 3 and _cpu_ext.huge_page_moves() - moved <= 3
    assert np.allclose(np.array(got["w"]), np.array(want["w"]), rtol=1e-6, atol=1e-7)


def test_small_leaves_results_stay_unchanged_by_later_steps():
    """What a caller holds of a step (its new w, the state's v) keeps its values through later steps."""
    params = {f"p{i}": mx.random.normal((300 + i,)) for i in range(20)}
    grads = gradient_sequence(params, 3)
    opt = create("cpu_kernel", 1e-2)
    first = training_loop(opt, params, grads[:1])
    kept = {k: np.array(x) for k, x in first.items()}
    kept_v = {k: np.array(opt.state[k]["v"]) for k in first}
    held_v = {k: opt.state[k]["v"] for k in first}
    training_loop(opt, first, grads[1:])
    assert all(np.array_equal(np.array(first[k]), kept[k]) for k in first)
    assert all(np.array_equal(np.array(held_v[k]), kept_v[k]) for k in first)


def test_small_leaves_under_compile_stay_in_the_graph():
    """A tracer has no data to update at once, so under mx.compile small leaves take the graph path."""
    mx.random.seed(6)
    w, g, v = mx.random.normal((300,)), mx.random.normal((300,)), mx.abs(mx.random.normal((300,)))
    lr = mx.array(0.01)

    @mx.compile
    def step(w, g, v):
        (nw,), (nv,) = _cpu_ext.rmsprop_update([w], [g], [v], lr, 0.9, 1e-6, 2)
        return nw, nv

    kw, kv = step(w, g, v)
    sw, sv = rmsprop_update(w, g, v, lr, 0.9, 1e-6)
    assert np.allclose(np.array(kw), np.array(sw), rtol=1e-6, atol=1e-7)
    assert np.allclose(np.array(kv), np.array(sv), rtol=1e-6, atol=1e-7)


def address(x: mx.array) -> int:
    return np.asarray(memoryview(x)).__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_big_leaves_move_once_to_a_buffer_on_a_huge_page_then_stay_in_place(dtype):
    """MLX's buffers start just past a page boundary; the kernel writes its first output of a big
    leaf 2 MiB-aligned instead of in place, and updates that buffer in place from then on."""
    params = {"w": mx.random.normal((2_000_000,)).astype(dtype)}  # 8 or 4 MB
    grads = gradient_sequence(params, 4)
    want = training_loop(optim.RMSprop(1e-2), params, grads)
    opt = create("cpu_kernel", 1e-2)
    params = training_loop(opt, params, grads[:1])
    first = address(params["w"]), address(opt.state["w"]["v"])
    assert all(a % (2 << 20) == 0 for a in first)
    before = _cpu_ext.donated_buffers()
    for g in grads[1:]:  # not training_loop(): its caller would still hold the first step's parameters
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    assert _cpu_ext.donated_buffers() - before == 2 * 3
    assert (address(params["w"]), address(opt.state["w"]["v"])) == first
    got, want = (np.array(x["w"].astype(mx.float32)) for x in (params, want))
    assert np.allclose(got, want, rtol=1e-6, atol=1e-2 if dtype == mx.float16 else 1e-6)
