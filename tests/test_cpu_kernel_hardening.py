"""The C++ kernel against what a user can do from Python: inputs that must not corrupt memory,
the memory a kept result pins, transforms through a step, fork, and the precision option."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from stock_update import rmsprop_update

from rmsprop_impls import create
from rmsprop_impls.registry import unavailable_reason

REASON = unavailable_reason("cpu_kernel")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext

LR = mx.array(0.01)


def kernel(w, g, v, **options):
    (nw,), (nv,) = _cpu_ext.rmsprop_update([w], [g], [v], LR, 0.9, 1e-6, 2, **options)
    return nw, nv


def test_shapeless_compile_replayed_on_mismatched_sizes_raises_instead_of_corrupting_memory():
    """The reproducer from issue 14, in a child process: before the fix it died in free() or SIGSEGV."""
    script = textwrap.dedent(
        """
        import mlx.core as mx
        from rmsprop_impls.kernels import _cpu_ext
        lr = mx.array(0.01)
        f = mx.compile(lambda w, g, v: _cpu_ext.rmsprop_update([w], [g], [v], lr, .9, 1e-6, 1), shapeless=True)
        mx.eval(f(mx.ones((8,)), mx.ones((8,)), mx.ones((8,))))
        for w, g, v in [(100000, 100000, 2), (100000, 2, 100000), (2, 100000, 100000)]:
            try:
                mx.eval(f(mx.ones((w,)), mx.ones((g,)), mx.ones((v,))))
            except ValueError as e:
                assert "different shapes" in str(e), e
            else:
                raise SystemExit("no error")
        print("raised")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "raised"


@pytest.mark.parametrize("shapeless", [False, True])
def test_compiled_step_on_mismatched_dtypes_raises(shapeless):
    f = mx.compile(lambda w, g, v: kernel(w, g, v), shapeless=shapeless)
    mx.eval(f(mx.ones((8,)), mx.ones((8,)), mx.ones((8,))))
    with pytest.raises(ValueError, match="one dtype"):
        mx.eval(f(mx.ones((8,)), mx.ones((8,), dtype=mx.float16), mx.ones((8,))))


def test_one_kept_small_leaf_pins_only_itself():
    """40 leaves of 60,000 elements (240 KB each) updated at once; keep one: it holds its own bytes, no more."""
    params = {f"p{i}": mx.random.normal((60_000,)) for i in range(40)}
    grads = {k: mx.random.normal((60_000,)) for k in params}
    mx.eval(params, grads)
    opt = create("cpu_kernel", 1e-2)
    opt.init(params)
    mx.eval(opt.state)
    gc.collect()
    before = mx.get_active_memory()
    new = opt.apply_gradients(grads, params)
    mx.eval(new, opt.state)
    kept = new["p7"]
    del new
    opt.state = {}
    gc.collect()
    pinned = mx.get_active_memory() - before
    assert kept.size == 60_000
    # Its own allocation (and a cache line of slack in front), nothing shared with the other leaves.
    assert pinned <= kept.nbytes + 2**12, f"{pinned / 2**20:.2f} MiB pinned by one 240 KB leaf"


def address(x: mx.array) -> int:
    return np.asarray(memoryview(x)).__array_interface__["data"][0]


def test_small_leaves_outputs_start_on_a_cache_line():
    params = {f"p{i}": mx.random.normal((300 + i,)) for i in range(20)}
    opt = create("cpu_kernel", 1e-2)
    new = opt.apply_gradients({k: mx.ones_like(x) for k, x in params.items()}, params)
    mx.eval(new, opt.state)
    assert all(address(x) % 64 == 0 for x in new.values())
    assert all(address(opt.state[k]["v"]) % 64 == 0 for k in new)


def loss_through_a_step(step):
    """A meta-learning shape: the loss after one step, as a function of the starting weights."""

    def loss(w):
        g = mx.sin(w) * 2
        nw, nv = step(w, g, mx.abs(w) * 0.1)
        return (nw * nw).sum() + nv.sum()

    return loss


@pytest.mark.parametrize("n", [300, 70_000], ids=["small", "graph-sized"])
@pytest.mark.parametrize("precision", ["stock", "float32"])
def test_grad_through_a_step_matches_stock(n, precision):
    mx.random.seed(3)
    w = mx.random.normal((n,))
    got = mx.grad(loss_through_a_step(lambda w, g, v: kernel(w, g, v, precision=precision)))(w)
    want = mx.grad(loss_through_a_step(lambda w, g, v: rmsprop_update(w, g, v, LR, 0.9, 1e-6)))(w)
    assert np.allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    got_lr = mx.grad(lambda lr: kernel_lr(w, lr).sum())(LR)
    want_lr = mx.grad(lambda lr: rmsprop_update(w, mx.sin(w), mx.abs(w), lr, 0.9, 1e-6)[0].sum())(LR)
    assert np.allclose(got_lr.item(), want_lr.item(), rtol=1e-5)


def kernel_lr(w, lr):
    (nw,), _ = _cpu_ext.rmsprop_update([w], [mx.sin(w)], [mx.abs(w)], lr, 0.9, 1e-6, 2)
    return nw


def test_grad_through_the_optimizer_matches_stock():
    mx.random.seed(8)
    w = mx.random.normal((5, 7))

    def loss(opt):
        def f(w):
            opt.init({"w": w})
            new = opt.apply_gradients({"w": mx.cos(w)}, {"w": w})
            return (new["w"] ** 2).sum()

        return f

    got = mx.grad(loss(create("cpu_kernel", 1e-2)))(w)
    want = mx.grad(loss(optim.RMSprop(1e-2)))(w)
    assert np.allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


def test_jvp_through_a_step_matches_stock():
    mx.random.seed(4)
    w, t = mx.random.normal((70_000,)), mx.random.normal((70_000,))

    def f(step):
        return lambda w: list(step(w, mx.sin(w), mx.abs(w)))

    (_, got), (_, want) = (
        mx.jvp(f(kernel), [w], [t]),
        mx.jvp(f(lambda w, g, v: rmsprop_update(w, g, v, LR, 0.9, 1e-6)), [w], [t]),
    )
    for a, b in zip(got, want):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axes", [(0, 0, 0), (1, 0, None), (None, 1, 0)])
def test_vmap_over_a_step_matches_stock(axes):
    mx.random.seed(5)
    shapes = {0: (4, 30), 1: (30, 4), None: (30,)}
    w, g, v = (mx.random.normal(shapes[a]) for a in axes)
    v = mx.abs(v)
    got = mx.vmap(kernel, in_axes=axes)(w, g, v)
    want = mx.vmap(lambda w, g, v: rmsprop_update(w, g, v, LR, 0.9, 1e-6), in_axes=axes)(w, g, v)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_runs_steps_on_a_fresh_pool():
    """The parent's pool has a worker at the fork; the child has none and gets a fresh pool. MLX's
    own stream threads do not survive a fork (a child's mx.eval hangs, with or without this
    extension), so the child steps small, evaluated leaves, which this extension updates at once."""
    script = textwrap.dedent(
        """
        import os, mlx.core as mx, numpy as np
        from rmsprop_impls.kernels import _cpu_ext
        ws = [mx.random.normal((60_000,)) for _ in range(4)]  # 240K elements: two threads' worth
        vs = [mx.abs(w) for w in ws]
        mx.eval(ws, vs)
        step = lambda: _cpu_ext.rmsprop_update(ws, ws, vs, mx.array(0.01), 0.9, 1e-6, 2)[0]
        want = [np.array(x) for x in step()]
        pid = os.fork()
        if pid == 0:
            got = [np.array(x) for x in step()]
            os._exit(0 if all(np.array_equal(a, b) for a, b in zip(got, want)) else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0", done.stderr[-2000:]


def test_precision_must_be_stock_or_float32():
    with pytest.raises(ValueError, match='precision must be "stock" or "float32"'):
        kernel(mx.ones(3), mx.ones(3), mx.ones(3), precision="float64")
    with pytest.raises(ValueError, match="precision"):
        create("cpu_kernel", 1e-2, precision="fast")
    assert create("cpu_kernel", 1e-2).precision == "stock"
    assert create("cpu_kernel", 1e-2, precision="float32").precision == "float32"
