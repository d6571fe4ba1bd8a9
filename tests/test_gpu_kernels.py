"""The Metal and CUDA kernel variants, as far as a machine without their GPU can check them.

Source generation, launch geometry, packing, availability and dispatch are
checked here. Running the kernels needs the device: those tests skip with the
reason. Where a launch is needed, ``FakeLauncher`` stands in for the object
``mx.fast.metal_kernel``/``cuda_kernel`` returns: it records the launch and
computes its outputs with MLX ops, so the code *around* the kernel is checked;
it says nothing about the kernel source itself.
"""

from __future__ import annotations

import io
import math
import re

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from trajectory import check_against_reference_and_stock, gradient_sequence

from rmsprop_impls import FlatLayout, PackedGradients, VariantUnavailableError, create, variant_class
from rmsprop_impls.kernels import gpu_kernels
from rmsprop_impls.kernels.gpu_kernels import (
    CUDA,
    MAX_LEAVES_PER_LAUNCH,
    METAL,
    OUTPUT_NAMES,
    THREADS_PER_GROUP,
    dispatch,
    hyperparameters,
    input_names,
    kernel_source,
    launch_geometry,
    plan_launches,
    stock_constants,
)
from rmsprop_impls.registry import unavailable_reason

BACKENDS = {"metal_kernel": METAL, "cuda_kernel": CUDA}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


class FakeLauncher:
    """Test double of a kernel object: records each launch, computes the update with MLX ops."""

    def __init__(self):
        self.launches: list[dict] = []

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, stream):
        self.launches.append(
            dict(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup, stream=stream,
                 output_shapes=output_shapes, output_dtypes=output_dtypes)
        )  # fmt: skip
        self.launches[-1]["input_ops"] = [materialising_ops(x) for x in inputs]  # before evaluating drops the graph
        w, v, hyper, _offsets, *gs = (x.astype(mx.float32) for x in inputs)
        g = mx.concatenate(gs) if len(gs) > 1 else gs[0]
        lr, alpha, one_minus_alpha, eps = (hyper[k] for k in range(4))
        v_new = alpha * v + one_minus_alpha * (g * g)
        w_new = w - (lr * g) / (mx.sqrt(v_new) + eps)
        outputs = [x.astype(dt).reshape(s) for x, dt, s in zip((w_new, v_new), output_dtypes, output_shapes)]
        mx.eval(outputs)  # a kernel's outputs are where the step's graph starts, as on the device
        self.launches[-1]["outputs"] = outputs
        return outputs


@pytest.fixture
def fake_launcher(monkeypatch):
    """Make both GPU variants constructible here, launching on a ``FakeLauncher``."""
    launcher = FakeLauncher()
    monkeypatch.setattr(gpu_kernels, "shared_kernel", lambda *args: launcher)
    for name in BACKENDS:
        monkeypatch.setattr(f"rmsprop_impls.variants.{name}.VARIANT.unavailable_reason", classmethod(lambda cls: None))
    return launcher


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_source_rounds_each_operation_to_T_in_stock_mode_and_once_in_float32(backend):
    stock, single = kernel_source(backend, "stock", 3), kernel_source(backend, "float32", 3)
    cast = backend.from_float.format("")[:-1]  # "T(" or "static_cast<T>("
    assert stock.count(cast) == 10 and single.count(cast) == 2  # 8 operations and 2 stores; only the stores
    for src in (stock, single):
        assert "v[i]" in src and "w[i]" in src and "g0[i - offsets[0]]" in src and "g2[i - offsets[2]]" in src
        assert "if (i >= offsets[3]) return;" in src and "hyper[0]" in src and "hyper[3]" in src
        assert "1e-" not in src and "0.99" not in src  # hyper-parameters are inputs, never baked in
        assert "_shape" not in src and "_strides" not in src  # no extra buffer arguments
    numerator = backend.to_float.format(cast + backend.mul.format("lr", "g_i") + ")")
    assert backend.stock_divide.format(numerator, "denom") in stock
    assert backend.divide.format(backend.mul.format("lr", "g_i"), "denom") in single


def test_each_backend_speaks_its_language():
    metal, cuda, cuda32 = kernel_source(METAL), kernel_source(CUDA), kernel_source(CUDA, "float32")
    assert "thread_position_in_grid.x" in metal and "metal::precise::sqrt" in metal and "precise::divide" in metal
    assert "this_grid().thread_rank()" in cuda and "stock_sqrt<T>(" in cuda and "static_cast<T>(" in cuda
    assert "stock_divide<T>(" in cuda and "__fmul_rn(" in cuda and "__fadd_rn(" in cuda  # never fused into an fma
    assert "__fsqrt_rn(" in cuda32 and "__fdiv_rn(" in cuda32 and "stock_" not in cuda32  # correctly rounded
    assert "metal::" not in cuda and "cooperative_groups" not in metal


def test_cuda_stock_takes_sqrt_and_divide_as_mlxs_cuda_build_does_per_dtype():
    """MLX's CUDA Sqrt and Divide on __half and __nv_bfloat16 are hsqrt and __hdiv (approximations); on float
    IEEE's. The header says so per type, and only the CUDA kernel object gets it."""
    header = gpu_kernels.CUDA_STOCK_HEADER
    for half in ("__half", "__nv_bfloat16"):
        assert f"stock_sqrt<{half}>" in header and f"stock_divide<{half}>" in header
    assert header.count("hsqrt(") == 2 and header.count("__hdiv(") == 2
    assert "return __fsqrt_rn(x);" in header and "return __fdiv_rn(a, b);" in header
    assert METAL.header == "" and CUDA.header == header


@pytest.mark.parametrize("bad", [dict(precision="half"), dict(n_gradients=0), dict(n_gradients=26)])
def test_source_refuses_what_it_cannot_build(bad):
    with pytest.raises(ValueError):
        kernel_source(METAL, **bad)


def test_metal_buffer_arguments_fit_its_limit_of_31():
    assert len(input_names(MAX_LEAVES_PER_LAUNCH)) + len(OUTPUT_NAMES) <= 31


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000003])
def test_launch_geometry_covers_every_element(n):
    geo = launch_geometry(n)
    (gx, gy, gz), (tx, ty, tz) = geo.grid, geo.threadgroup
    assert (gy, gz, ty, tz) == (1, 1, 1, 1)
    assert gx == n and 1 <= tx <= min(n, THREADS_PER_GROUP)
    blocks = math.ceil(gx / tx)  # how CUDA turns MLX's grid into blocks; Metal runs exactly gx threads
    assert blocks * tx >= n and (blocks - 1) * tx < n


@pytest.mark.parametrize("n", [0, -1, 2**31])
def test_launch_geometry_rejects_sizes_mlx_cannot_launch(n):
    with pytest.raises(ValueError, match="a launch covers 1 to"):
        launch_geometry(n)


def test_packing_round_trip_over_dtypes_and_odd_shapes():
    mx.random.seed(0)
    leaves = [
        mx.random.normal((3, 5)).astype(mx.float16),
        mx.array(2.0),
        mx.random.normal((4, 3)).T,
        mx.random.normal((1,)).astype(mx.bfloat16),
        mx.random.normal((7,)).astype(mx.float16),
        mx.zeros((0, 2)),
    ]
    layout = FlatLayout(leaves)
    buffers = layout.pack(leaves)
    assert {k: v.shape for k, v in buffers.items()} == {mx.float16: (22,), mx.float32: (13,), mx.bfloat16: (1,)}
    back = layout.unpack(buffers)
    for a, b in zip(leaves, back):
        assert a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()


@pytest.mark.parametrize("variant", BACKENDS)
def test_unavailable_here_with_the_reason(variant):
    reason = unavailable_reason(variant)
    if reason is None:
        pytest.skip(f"{variant} runs on this machine")
    assert "needs" in reason and ".is_available() is False" in reason
    with pytest.raises(VariantUnavailableError) as err:
        create(variant, 1e-3)
    assert err.value.reason == reason
    with pytest.raises(VariantUnavailableError):  # constructing it directly fails the same way
        variant_class(variant)(1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
def test_dispatch_launches_once_with_the_expected_arguments(dtype):
    launcher = FakeLauncher()
    w, v = (mx.random.normal((1000003,)).astype(dtype) for _ in range(2))
    gs = [mx.random.normal((3,)).astype(dtype), mx.random.normal((1000000,)).astype(dtype)]
    offsets = mx.array([0, 3, 1000003], dtype=mx.uint32)
    hyper = hyperparameters(mx.array(0.01), stock_constants(0.9, 1e-3, dtype, "float32"), dtype, "float32")
    w_new, v_new = dispatch(launcher, w, mx.abs(v), gs, offsets, hyper)
    (call,) = launcher.launches
    assert (
        call["inputs"][0] is w and call["inputs"][3] is offsets and all(a is b for a, b in zip(call["inputs"][4:], gs))
    )
    assert call["template"] == [("T", dtype)]
    assert call["grid"] == (1000003, 1, 1) and call["threadgroup"] == (THREADS_PER_GROUP, 1, 1)
    assert call["output_shapes"] == [(1000003,), (1000003,)] and call["output_dtypes"] == [dtype, dtype]
    assert call["stream"] == mx.gpu
    assert np.allclose(np.array(hyper), [0.01, 0.9, 0.1, 1e-3]) and hyper.dtype == mx.float32
    assert w_new.dtype == dtype and v_new.shape == (1000003,)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_stock_mode_rounds_the_hyperparameters_as_stock_does(dtype):
    hyper = hyperparameters(mx.array(0.01), stock_constants(0.99, 1e-8, dtype, "stock"), dtype, "stock")
    one = mx.ones((), dtype=dtype)
    want = [mx.array(0.01).astype(dtype), 0.99 * one, (1 - 0.99) * one, 1e-8 * one]
    assert np.array(hyper).tolist() == [x.astype(mx.float32).item() for x in want]
    assert (
        np.array(stock_constants(0.99, 1e-8, dtype, "float32")).tolist() == np.float32([0.99, 1 - 0.99, 1e-8]).tolist()
    )


def test_dispatch_skips_empty_buffers_and_refuses_other_dtypes():
    launcher = FakeLauncher()
    empty = mx.zeros((0,))
    assert dispatch(launcher, empty, empty, [empty], mx.zeros((2,), mx.uint32), mx.zeros((4,)))[0] is empty
    ints = mx.zeros((4,), dtype=mx.int32)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        dispatch(launcher, ints, ints, [ints], mx.zeros((2,), mx.uint32), mx.zeros((4,)))
    assert launcher.launches == []


def test_launches_take_at_most_25_leaves_of_one_dtype_and_skip_empty_ones():
    leaves = [mx.zeros((k + 1,)) for k in range(60)] + [mx.zeros((0,)), mx.zeros((2,), mx.float16)]
    launches = plan_launches(FlatLayout(leaves))
    assert [len(launch.group.indices) for launch in launches] == [25, 25, 10, 1]
    assert launches[1].start == sum(range(1, 26)) and launches[1].group.offsets[:3] == (0, 26, 53)
    assert 60 not in {i for launch in launches for i in launch.group.indices}


@pytest.mark.parametrize("variant", BACKENDS)
def test_launches_per_chunk_of_leaves_and_buffers_packed_each_step(variant, fake_launcher):
    params = {
        f"layer{i}": {"w": mx.random.normal((33, 3)), "b": mx.random.normal((3,)).astype(mx.float16)} for i in range(50)
    }
    grads = gradient_sequence(params, 3)
    opt = create(variant, 1e-2, alpha=0.9, eps=1e-6)
    for g in grads:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    assert len(fake_launcher.launches) == 4 * len(grads)  # 50 leaves of each dtype, 25 per launch
    first, second = fake_launcher.launches[:4], fake_launcher.launches[4:8]
    assert sorted(c["grid"][0] for c in first) == [75, 75, 25 * 99, 25 * 99]
    for before, after in zip(first, second):  # w and v packed again: a program may have changed a view in place
        assert after["inputs"][0] is not before["outputs"][0] and after["inputs"][1] is not before["outputs"][1]
        assert len(after["inputs"]) == 4 + 25  # the gradients come as they are, one buffer per leaf
    lr, alpha, one_minus_alpha, eps = np.array(first[0]["inputs"][2]).tolist()
    assert [lr, alpha, one_minus_alpha, eps] == pytest.approx([1e-2, 0.9, 0.1, 1e-6], rel=1e-6)  # float32


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", BACKENDS)
def test_packing_and_dispatch_reach_the_reference(variant, dtype, fake_launcher):
    mx.random.seed(5)
    params = {"a": mx.random.normal((7, 5)).astype(dtype), "b": [mx.random.normal((5, 3)).T.astype(dtype)]}
    check_against_reference_and_stock(variant, params, gradient_sequence(params, 30), 1e-2)


def test_the_kernel_object_is_built_once(monkeypatch):
    built = []
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: built.append(kw) or FakeLauncher())
    gpu_kernels.shared_kernel.cache_clear()
    try:
        assert gpu_kernels.shared_kernel(METAL) is gpu_kernels.shared_kernel(METAL)
    finally:
        gpu_kernels.shared_kernel.cache_clear()
    (kw,) = built
    assert kw["input_names"] == ["w", "v", "hyper", "offsets", "g0"] and kw["output_names"] == list(OUTPUT_NAMES)
    assert kw["source"] == kernel_source(METAL, "stock", 1)


@pytest.mark.parametrize("variant", BACKENDS)
def test_on_the_device(variant):
    reason = unavailable_reason(variant)
    if reason is not None:
        pytest.skip(f"{variant} needs its GPU: {reason}")
    for dtype in DTYPES:
        mx.random.seed(1)
        params = {"x": mx.random.normal((1000003,)).astype(dtype), "y": [mx.random.normal((3, 257)).astype(dtype)]}
        grads = gradient_sequence(params, 20)
        opt, got = check_against_reference_and_stock(variant, params, grads, 1e-2)
        assert all(x.dtype == dtype for _, x in tree_flatten(got))
        stock = optim.RMSprop(1e-2)  # the default precision is stock's, bit for bit, on the same GPU
        want = params
        for g in grads:
            want = stock.apply_gradients(g, want)
        mx.eval(want)
        for (k, a), (_, b) in zip(tree_flatten(got), tree_flatten(want)):
            assert mx.array_equal(a, b).item(), f"{variant} {dtype} {k} differs from stock"


def test_prepacked_gradients_reach_the_kernel_as_they_are(fake_launcher):
    params = {"a": mx.random.normal((5, 3)), "b": mx.random.normal((4,))}
    packed = PackedGradients.pack(gradient_sequence(params, 1)[0])
    create("cuda_kernel", 1e-2).apply_gradients(packed, params)
    (launch,) = fake_launcher.launches
    assert launch["inputs"][4] is packed.buffers[mx.float32] and len(launch["inputs"]) == 5


#: Primitives that give a view of their input's buffer (row-contiguous here) rather than writing a new one.
VIEWS = {"Reshape", "Slice", "Split", "Flatten", "Squeeze", "ExpandDims"}


def materialising_ops(*arrays) -> list[str]:
    """The primitives in the graph behind ``arrays`` that write a buffer of their own: copies, concatenations, casts."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return [op for op in re.findall(r'label ="(\w+)"', dot.getvalue()) if op not in VIEWS]


def test_materialising_ops_sees_copies_and_concatenations():
    a, b = mx.ones((4,)), mx.ones((3,))
    mx.eval(a, b)
    assert materialising_ops(mx.split(mx.concatenate([a, b]), [4])[0].reshape(2, 2)) == ["Concatenate"]
    assert materialising_ops(a.astype(mx.float16)) == ["AsType"] and materialising_ops(a[1:].reshape(3)) == []


@pytest.mark.parametrize("variant", BACKENDS)
def test_a_step_moves_20_bytes_per_parameter(variant, fake_launcher):
    """Per step: the kernels read w, g, v and write w, v (20 B per float32 parameter), and w and v are packed
    first (16 B more: a program may have changed a returned view in place); nothing else is materialised.

    The launcher evaluates its outputs, so the graph a step leaves behind is the step's own work around the kernels:
    what produced each kernel input, and what turns the kernels' outputs into the new parameters and state.
    """
    params = {f"layer{i}": {"w": mx.random.normal((33, 3)), "b": mx.random.normal((3,))} for i in range(30)}
    n_params = sum(x.size for _, x in tree_flatten(params))
    grads = gradient_sequence(params, 2)
    opt = create(variant, 1e-2)
    params = opt.apply_gradients(grads[0], params)
    mx.eval(params, opt.state)
    fake_launcher.launches.clear()
    params = opt.apply_gradients(grads[1], params)
    kernel_bytes = extra_bytes = 0
    for launch in fake_launcher.launches:
        w, v, hyper, offsets, *gs = launch["inputs"]
        assert hyper.size == 4 and offsets.size == len(gs) + 1  # per launch, not per parameter
        kernel_bytes += sum(x.nbytes for x in (w, v, *gs, *launch["outputs"]))
        for x, ops in zip((w, v, *gs), launch["input_ops"][:2] + launch["input_ops"][4:]):
            extra_bytes += 2 * x.nbytes if ops else 0  # a materialised input was written, then read by the kernel
    new_state = [x for k, x in tree_flatten(opt.state) if k.endswith(".v")]
    assert materialising_ops(*[x for _, x in tree_flatten(params)], *new_state) == []  # views of the outputs
    assert len(fake_launcher.launches) == 3  # 60 leaves, 25 per launch
    assert (kernel_bytes + extra_bytes) / n_params == 20 + 16


def test_a_launch_stays_within_the_grid_mlx_can_launch(monkeypatch):
    monkeypatch.setattr(gpu_kernels, "MAX_GRID", 10)
    launches = plan_launches(FlatLayout([mx.zeros((4,)), mx.zeros((5,)), mx.zeros((2,)), mx.zeros((10,))]))
    assert [launch.group.offsets for launch in launches] == [(0, 4, 9), (0, 2), (0, 10)]
    assert [launch.start for launch in launches] == [0, 9, 11]


def test_each_backends_launch_limit_is_what_mlxs_int_grid_arithmetic_and_metals_buffers_allow():
    cuda = gpu_kernels.max_launch_elements(CUDA, 4)
    blocks = lambda n: -(-n // THREADS_PER_GROUP) * THREADS_PER_GROUP  # noqa: E731  (MLX: (gx + tx - 1) / tx)
    assert cuda + THREADS_PER_GROUP - 1 <= 2**31 - 1 < cuda + THREADS_PER_GROUP and blocks(cuda) <= 2**31 - 1
    assert gpu_kernels.max_launch_elements(METAL, 4) == 2**31 - 1  # Metal dispatches exactly the grid
    assert gpu_kernels.max_launch_elements(METAL, 4, max_buffer_bytes=4 << 30) == 2**30  # a 4 GiB maxBufferLength
    assert gpu_kernels.max_launch_elements(METAL, 2, max_buffer_bytes=4 << 30) == 2**31 - 1
    with pytest.raises(ValueError, match="1 to 2147483392 elements"):
        launch_geometry(cuda + 1, max_elements=cuda)


def test_the_launch_plan_splits_at_the_limit_per_dtype_and_refuses_one_leaf_over_it():
    leaves = [mx.zeros((6,)), mx.zeros((6,)), mx.zeros((6,), mx.float16), mx.zeros((6,), mx.float16)]
    plan = plan_launches(FlatLayout(leaves), max_elements=lambda itemsize: 40 // itemsize)  # a 40-byte buffer
    assert [launch.group.indices for launch in plan] == [(0,), (1,), (2, 3)]
    with pytest.raises(ValueError, match="leaf 0 has 6 elements; one mlx.core.float32 launch on this device"):
        plan_launches(FlatLayout(leaves), max_elements=lambda itemsize: 20 // itemsize)


def test_metal_launches_stay_within_the_devices_max_buffer_length(monkeypatch, fake_launcher):
    monkeypatch.setattr("rmsprop_impls.variants.metal_kernel.device_info", lambda: {"max_buffer_length": 40})
    params = {f"p{k}": mx.ones((4,)) for k in range(5)}  # 80 bytes of w: two launches of 40 bytes, then one
    create("metal_kernel", 1e-2).apply_gradients(gradient_sequence(params, 1)[0], params)
    assert [launch["grid"][0] for launch in fake_launcher.launches] == [8, 8, 4]


def test_a_metal_kernel_name_says_which_inputs_mlx_passes_in_constant_memory(fake_launcher, monkeypatch):
    """MLX 0.30-0.31 name a Metal kernel without its inputs' kinds; a second source under one name frees the first
    one's library while a command buffer may hold it. Here each name has one signature, on every release."""
    asked = []
    monkeypatch.setattr(gpu_kernels, "shared_kernel", lambda *args: asked.append(args) or fake_launcher)
    for size in (300, 3):  # the first gradient: device memory, then constant memory
        params = {"a": mx.ones((size,)), "b": mx.ones((9,))}
        create("metal_kernel", 1e-2).apply_gradients(gradient_sequence(params, 1)[0], params)
    kinds = [args[3] for args in asked]
    assert kinds == ["ddccdd", "ddcccd"]  # w, v, hyper, offsets, then the gradients
    assert gpu_kernels.kernel_name("stock", 2, kinds[1]) == "rmsprop_step_stock_2_ddcccd"
    assert gpu_kernels.input_kinds(CUDA, [mx.ones((3,))]) == ""  # CUDA's signature does not depend on sizes


@pytest.mark.parametrize("variant", BACKENDS)
def test_precision_is_an_option_of_create(variant, fake_launcher):
    assert create(variant, 1e-2).precision == "stock"
    assert create(variant, 1e-2, precision="float32").precision == "float32"
    with pytest.raises(ValueError, match="precision is one of"):
        create(variant, 1e-2, precision="half")
