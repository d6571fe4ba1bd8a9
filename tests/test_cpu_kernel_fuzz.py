"""A hypothesis fuzz of the kernel's entry point against stock RMSprop: odd shapes, every dtype
and mismatched ones, strided, transposed and broadcast inputs, aliased inputs, lazy and evaluated
inputs, under mx.compile (shapeless too), mx.grad and mx.vmap, on 1 or 2 threads.

The oracle is stock: the kernel gives stock's bits, or raises where stock raises. It also raises,
by contract, where w, g and v of a leaf differ in shape or dtype or have a dtype other than
float32, float16 and bfloat16 (stock broadcasts and promotes there). The sanitizer lane
(ci/sanitizers) runs this under ASan+UBSan and TSan with RMSPROP_FUZZ_EXAMPLES raised."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stock_update import rmsprop_update

from rmsprop_impls.registry import unavailable_reason

REASON = unavailable_reason("cpu_kernel")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext

EXAMPLES = int(os.environ.get("RMSPROP_FUZZ_EXAMPLES", "40"))
SUPPORTED = [mx.float32, mx.float16, mx.bfloat16]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (4, 1, 9), (65_539,)]  # the last takes the graph path
LR = mx.array(0.01)


@st.composite
def arrays(draw, shape, dtype, seed):
    """One input of `shape`: contiguous, transposed, strided or broadcast; evaluated or lazy."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "broadcast"]))
    key = mx.random.key(seed)
    if layout == "transposed" and len(shape) >= 2:
        x = mx.random.normal(shape[::-1], key=key).T
    elif layout == "strided" and len(shape) >= 1:
        x = mx.random.normal((*shape[:-1], 2 * shape[-1]), key=key)[..., ::2]
    elif layout == "broadcast" and len(shape) >= 1:
        x = mx.broadcast_to(mx.random.normal((*shape[:-1], 1), key=key), shape)
    else:
        x = mx.random.normal(shape, key=key)
    x = x.astype(dtype)
    if draw(st.booleans()):
        mx.eval(x)
    else:
        x = x * 1  # lazy: its layout is known only when it runs
    return x


@st.composite
def cases(draw):
    n = draw(st.integers(1, 2))
    leaves = []
    for i in range(n):
        shape = draw(st.sampled_from(SHAPES))
        dtype = draw(st.sampled_from(SUPPORTED))
        shapes = [shape, shape, shape]
        dtypes = [dtype, dtype, dtype]
        if draw(st.integers(0, 9)) == 0:  # a mismatched shape (broadcastable or not)
            shapes[draw(st.integers(0, 2))] = draw(st.sampled_from([(1,), (7,), (2,), ()]))
        if draw(st.integers(0, 9)) == 0:  # a mismatched or unsupported dtype
            dtypes[draw(st.integers(0, 2))] = draw(st.sampled_from(SUPPORTED + [mx.float64, mx.int32]))
        w, g, v = (draw(arrays(s, d, seed=10 * i + k)) for k, (s, d) in enumerate(zip(shapes, dtypes)))
        v = mx.abs(v)
        leaves.append([w, g, v])
    alias = draw(st.sampled_from(["none", "w is g", "w is v", "leaf twice", "w as other's g"]))
    if alias == "w is g":
        leaves[0][1] = leaves[0][0]
    elif alias == "w is v":
        leaves[0][2] = leaves[0][0]
    elif alias == "leaf twice":
        leaves.append(list(leaves[0]))
    elif alias == "w as other's g" and n == 2:
        leaves[1][1] = leaves[0][0]
    transform = draw(st.sampled_from(["none", "compile", "shapeless", "grad", "vmap"]))
    return leaves, transform, draw(st.sampled_from([1, 2]))


def in_contract(leaves) -> bool:
    return all(
        w.dtype in SUPPORTED and w.dtype == g.dtype == v.dtype and w.shape == g.shape == v.shape for w, g, v in leaves
    )


def kernel_step(threads):
    def step(ws, gs, vs):
        nw, nv = _cpu_ext.rmsprop_update(ws, gs, vs, LR, 0.9, 1e-6, threads)
        return nw + nv

    return step


def stock_step(ws, gs, vs):
    out = [rmsprop_update(w, g, v, LR, 0.9, 1e-6) for w, g, v in zip(ws, gs, vs)]
    return [o[0] for o in out] + [o[1] for o in out]


def run(step, leaves, transform):
    ws, gs, vs = (list(x) for x in zip(*leaves))
    if transform == "compile":
        return mx.compile(step)(ws, gs, vs)
    if transform == "shapeless":
        # Traced once on other inputs, then replayed on these: the shape checks must hold at run time.
        f = mx.compile(step, shapeless=True)
        mx.eval(f([mx.ones((5,))] * len(ws), [mx.ones((5,))] * len(ws), [mx.ones((5,))] * len(ws)))
        return f(ws, gs, vs)
    if transform == "grad":
        return mx.grad(lambda ws: sum(x.astype(mx.float32).sum() for x in step(ws, gs, vs)))(ws)
    if transform == "vmap":
        return mx.vmap(step, in_axes=(0, 0, 0))(ws, gs, vs)
    return step(ws, gs, vs)


def outcome(step, leaves, transform):
    try:
        out = run(step, leaves, transform)
        mx.eval(out)
        return out
    except (ValueError, RuntimeError, TypeError) as e:
        return e


def same(a: mx.array, b: mx.array) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.size == 0:
        return True
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


@pytest.fixture(scope="module", autouse=True)
def no_buffer_cache():
    """Every buffer freed at once, so that the sanitizers see each one's true extent."""
    limit = mx.set_cache_limit(0)
    yield
    mx.set_cache_limit(limit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_entry_point_against_stock(case):
    leaves, transform, threads = case
    if transform == "vmap":  # a batch of two per leaf, which the step sees (stack promotes int32 with 0.5 to float32)
        leaves = [[mx.stack([x, x * 0.5]) for x in leaf] for leaf in leaves]
    got = outcome(kernel_step(threads), leaves, transform)
    want = outcome(stock_step, leaves, transform)
    event(f"{transform}: {'refused' if isinstance(got, Exception) else 'compared'}")
    if isinstance(got, Exception):
        assert isinstance(want, Exception) or not in_contract(leaves), repr(got)
        return
    assert in_contract(leaves) and not isinstance(want, Exception), f"kernel ran where stock raised {want!r}"
    if transform in ("compile", "shapeless"):
        # MLX compiles its fused CPU kernels with the host's C++ compiler, which on aarch64 contracts
        # alpha*v + (1-alpha)*g*g into an FMA: compiled stock is 1 ulp off eager stock there. The
        # kernel gives eager stock's bits inside mx.compile as outside.
        want = outcome(stock_step, leaves, "none")
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert same(a, b), (transform, a.dtype, a.shape)
