"""Every kernel the extension has here (AVX2 or NEON, and the scalar loop) gives the same bits,
and the same bits as stock RMSprop where stock's rounding is the contract."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
from stock_update import rmsprop_update

from rmsprop_impls.registry import unavailable_reason

REASON = unavailable_reason("cpu_kernel")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpu_kernel unavailable here: {REASON}")

if REASON is None:
    from rmsprop_impls.kernels import _cpu_ext

    KERNELS = _cpu_ext._ext.kernels()
else:
    KERNELS = []

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
UINT = {mx.float32: np.uint32, mx.float16: np.uint16, mx.bfloat16: np.uint16}


@pytest.fixture
def on_kernel():
    """Runs the test's steps on a chosen kernel, and puts the default back after."""
    default = _cpu_ext._ext.kernel()
    yield _cpu_ext._ext.set_kernel
    _cpu_ext._ext.set_kernel(default)


def bits(x: mx.array) -> np.ndarray:
    """The raw bits, with every NaN as one value: NaN's sign and payload are not part of the contract."""
    u = np.array(x.view(mx.uint32 if x.dtype == mx.float32 else mx.uint16))
    nan = np.array(mx.isnan(x))
    return np.where(nan, np.iinfo(u.dtype).max, u)


def inputs(n: int, dtype, seed: int):
    """w, g, v with ordinary values and the edge cases: zeros, tiny and huge values, g = 0 with v = 0."""
    mx.random.seed(seed)
    w = mx.random.normal((n,)) * 3
    g = mx.random.normal((n,)) * mx.power(10.0, mx.random.randint(-8, 4, (n,)).astype(mx.float32))
    v = mx.abs(mx.random.normal((n,))) * mx.power(10.0, mx.random.randint(-9, 3, (n,)).astype(mx.float32))
    zero = mx.arange(n) % 17 == 0
    g, v = mx.where(zero, 0.0, g), mx.where(zero, 0.0, v)
    return [x.astype(dtype) for x in (w, g, v)]


def kernel_step(w, g, v, lr, alpha, eps, threads=2, **options):
    (nw,), (nv,) = _cpu_ext.rmsprop_update([w], [g], [v], lr, alpha, eps, threads, **options)
    mx.eval(nw, nv)
    return nw, nv


# Small (updated at once) and graph-sized leaves; odd sizes leave a vector tail.
SIZES = [1, 7, 1003, 70001]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_every_kernel_gives_the_same_bits(on_kernel, n, dtype):
    w, g, v = inputs(n, dtype, seed=n)
    lr = mx.array(0.01)
    results = {}
    for name in KERNELS:
        on_kernel(name)
        results[name] = [bits(x) for x in kernel_step(w, g, v, lr, 0.9, 1e-6)]
    first, *rest = results.values()
    for name, got in zip(KERNELS[1:], rest):
        assert np.array_equal(got[0], first[0]) and np.array_equal(got[1], first[1]), name


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_stock_bit_for_bit_over_20_steps_on_every_kernel(on_kernel, n, dtype):
    """The default precision is stock's in every dtype: lr and the constants rounded to the dtype,
    every intermediate rounded in stock's order. eps 1e-8 is 0 in float16, so g = v = 0 gives NaN there,
    as in stock."""
    w0, _, v0 = inputs(n, dtype, seed=n + 1)
    grads = [inputs(n, dtype, seed=100 * n + k)[1] for k in range(20)]
    lr = mx.array(0.01)
    sw, sv = w0, v0
    for g in grads:
        sw, sv = rmsprop_update(sw, g, sv, lr, 0.99, 1e-8)
    mx.eval(sw, sv)
    for name in KERNELS:
        on_kernel(name)
        kw, kv = w0, v0
        for g in grads:
            kw, kv = kernel_step(kw, g, kv, lr, 0.99, 1e-8)
        assert np.array_equal(bits(kw), bits(sw)), name
        assert np.array_equal(bits(kv), bits(sv)), name


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_float32_precision_is_the_same_on_every_kernel(on_kernel, dtype):
    w, g, v = inputs(1003, dtype, seed=9)
    results = []
    for name in KERNELS:
        on_kernel(name)
        results.append([bits(x) for x in kernel_step(w, g, v, mx.array(0.01), 0.9, 1e-6, precision="float32")])
    assert all(np.array_equal(r[0], results[0][0]) and np.array_equal(r[1], results[0][1]) for r in results)


def test_float16_zero_gradient_and_state_give_nan_as_stock_does():
    w = mx.ones((70001,), dtype=mx.float16)
    g = v = mx.zeros((70001,), dtype=mx.float16)
    sw, _ = rmsprop_update(w, g, v, mx.array(0.01), 0.99, 1e-8)
    kw, _ = kernel_step(w, g, v, mx.array(0.01), 0.99, 1e-8)
    assert mx.isnan(sw).all().item() and mx.isnan(kw).all().item()
    fw, _ = kernel_step(w, g, v, mx.array(0.01), 0.99, 1e-8, precision="float32")
    assert (fw == 1).all().item()


def test_set_kernel_refuses_one_this_machine_lacks():
    with pytest.raises(ValueError, match="no kernel 'mmx' here"):
        _cpu_ext._ext.set_kernel("mmx")
    assert _cpu_ext._ext.kernel() == KERNELS[0]
    assert KERNELS[-1] == "scalar"


def _erfinv_seconds(stream) -> float:
    """The fastest of three evaluations of MLX's erfinv (libm's SSE code) on ``stream``."""
    times = []
    for _ in range(3):
        x = mx.full((1 << 18,), 0.3)
        mx.eval(x)
        start = time.perf_counter()
        mx.eval(mx.erfinv(x, stream=stream))
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_step_leaves_mlx_own_kernels_at_full_speed(on_kernel, kernel):
    """A kernel that left the YMM registers' upper halves dirty on MLX's stream thread (it runs a share of
    each step there) made every later SSE instruction on that thread pay a transition penalty: erfinv, and
    so mx.random.normal, ran 45x slower than on a fresh stream. One run, as a ratio: 10x is far above noise."""
    on_kernel(kernel)
    w, g, v = (mx.ones((1 << 17,)) for _ in range(3))  # the graph path: its share runs on the stream thread
    mx.eval(_cpu_ext.rmsprop_update([w], [g], [v], mx.array(0.01), 0.9, 1e-6, 2))
    fresh = mx.new_stream(mx.cpu)
    assert _erfinv_seconds(mx.default_stream(mx.cpu)) < 10 * _erfinv_seconds(fresh)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(700, 400), (513, 1031), (1, 300_000)], ids=["tiles", "ragged", "one-row"])
def test_a_transposed_gradient_gives_stocks_bits(on_kernel, dtype, shape):
    """A Linear's weight gradient arrives transposed from backward; the node reads it tile by tile."""
    mx.random.seed(11)
    w = mx.random.normal(shape).astype(dtype)
    g = mx.transpose(mx.random.normal(shape[::-1]).astype(dtype))
    v = mx.abs(mx.random.normal(shape)).astype(dtype)
    lr = mx.array(0.03)
    sw, sv = rmsprop_update(w, g, v, lr, 0.8, 1e-4)
    for kernel in KERNELS:
        on_kernel(kernel)
        (kw,), (kv,) = _cpu_ext.rmsprop_update([w], [g], [v], lr, 0.8, 1e-4, 2)
        assert np.array_equal(bits(kw), bits(sw)) and np.array_equal(bits(kv), bits(sv)), kernel


def test_the_kernels_offered_are_the_ones_this_cpu_has():
    """The CPUID check (simd/avx2.h) against the kernel's own flags: AVX2 wherever /proc/cpuinfo lists avx2 and
    f16c, NEON on every aarch64, with GCC's build and with clang's (the clang lane)."""
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("reads /proc/cpuinfo (Linux)")
    flags = set(next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "").split())
    want = {"x86_64": ["avx2"] if {"avx2", "f16c"} <= flags else [], "aarch64": ["neon"]}[platform.machine()]
    assert KERNELS == [*want, "scalar"]
