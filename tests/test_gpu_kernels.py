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
import itertools
import math
import re

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from trajectory import check_against_reference_and_stock, gradient_sequence

from rmsprop_impls import FlatLayout, PackedGradients, VariantUnavailableError, create, variant_class
from rmsprop_impls.kernels import gpu_kernels, gpu_source
from rmsprop_impls.kernels.gpu_kernels import (
    CUDA,
    METAL,
    THREADS_PER_GROUP,
    dispatch,
    launch_geometry,
    plan_launches,
    step_scalars,
)
from rmsprop_impls.kernels.gpu_source import kernel_layout, kernel_source
from rmsprop_impls.registry import unavailable_reason
from rmsprop_impls.rules import all_rules, rule
from rmsprop_impls.rules.codegen import live_nodes
from rmsprop_impls.rules.element import T

BACKENDS = {"metal_kernel": METAL, "cuda_kernel": CUDA}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
RMSPROP = rule("rmsprop").trace(rule("rmsprop").defaults)
#: Each rule's traced update in each of its configurations.
TRACES = {f"{r.name}-{k}": r.trace(hyper) for r in all_rules() for k, hyper in enumerate(r.configurations())}
#: MLX ops for each node of a trace, all in float32: what precision="float32" computes.
FLOAT32_OPS = dict(add=mx.add, sub=mx.subtract, mul=mx.multiply, div=mx.divide, maximum=mx.maximum, sqrt=mx.sqrt,
                   square=mx.square, abs=mx.abs, sign=mx.sign, cast=lambda x: x)  # fmt: skip


def evaluate(trace, arrays: dict[str, mx.array], scalars: mx.array) -> list[mx.array]:
    """The trace's results (w, then each changed state) on float32 ``arrays`` and a kernel's ``scalars`` input."""
    layout = kernel_layout(trace)
    values: dict[int, mx.array] = {}
    for i in live_nodes(trace):
        node = trace.nodes[i]
        if node.op == "input" and node.kind == T:
            values[i] = arrays[node.name]
        elif node.op == "input":
            values[i] = scalars[layout.scalar_inputs.index(node.name)]
        elif node.op == "slot":
            values[i] = scalars[len(layout.scalar_inputs) + node.slot]
        else:
            values[i] = FLOAT32_OPS[node.op](*(values[a] for a in node.args))
    return [values[trace.w_out], *(values[trace.state_out[name]] for name in layout.state_outputs)]


class FakeLauncher:
    """Test double of the kernel objects: records each launch, computes the trace's update in float32 with MLX ops
    (what precision="float32" computes), so the code around the kernel is checked, not the kernel source."""

    def __init__(self, trace=RMSPROP):
        self.launches: list[dict] = []
        self.trace = trace

    def bound(self, trace) -> FakeLauncher:
        """The kernel object for ``trace``, recording into the same launches."""
        other = FakeLauncher(trace)
        other.launches = self.launches
        return other

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, stream):
        self.launches.append(
            dict(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup, stream=stream,
                 output_shapes=output_shapes, output_dtypes=output_dtypes)
        )  # fmt: skip
        self.launches[-1]["input_ops"] = [materialising_ops(x) for x in inputs]  # before evaluating drops the graph
        layout = kernel_layout(self.trace)
        n_gradients = len(inputs) - 3 - len(layout.state_inputs)
        named = dict(zip(layout.input_names(n_gradients), (x.astype(mx.float32) for x in inputs)))
        gs = [named[f"g{j}"] for j in range(n_gradients)]
        named["g"] = mx.concatenate(gs) if len(gs) > 1 else gs[0]
        results = evaluate(self.trace, named, named["scalars"])
        outputs = [mx.broadcast_to(x, s).astype(dt) for x, dt, s in zip(results, output_dtypes, output_shapes)]
        mx.eval(outputs)  # a kernel's outputs are where the step's graph starts, as on the device
        self.launches[-1]["outputs"] = outputs
        return outputs


@pytest.fixture
def fake_launcher(monkeypatch):
    """Make both GPU variants constructible here, launching on a ``FakeLauncher``."""
    launcher = FakeLauncher()
    monkeypatch.setattr(gpu_kernels, "shared_kernel", lambda backend, trace, *args: launcher.bound(trace))
    for name in BACKENDS:
        monkeypatch.setattr(f"rmsprop_impls.variants.{name}.VARIANT.unavailable_reason", classmethod(lambda cls: None))
    return launcher


@pytest.mark.parametrize("name", TRACES)
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_source_rounds_each_T_operation_to_T_in_stock_mode_and_once_in_float32(backend, name):
    trace = TRACES[name]
    stock, single = kernel_source(backend, trace, "stock", 3), kernel_source(backend, trace, "float32", 3)
    cast = backend.from_float.format("")[:-1]  # "T(" or "static_cast<T>("
    t_nodes = [i for i in live_nodes(trace) if trace.nodes[i].op != "input" and trace.nodes[i].kind == T]
    stores = 1 + len(trace.state_out)
    assert stock.count(cast) == len(t_nodes) + stores and single.count(cast) == stores  # in float32 only the stores
    for src in (stock, single):
        assert "w[i]" in src and "g0[i - offsets[0]]" in src and "g2[i - offsets[2]]" in src
        assert "if (i >= offsets[3]) return;" in src and f"scalars[{len(trace.slots)}]" in src
        assert "e-" not in src and "0.9" not in src  # hyper-parameters are inputs, never baked in
        assert "_shape" not in src and "_strides" not in src  # no extra buffer arguments
        assert all(f"{name}_new[i] = " in src for name in trace.state_out)


def test_rmsprop_divides_as_stock_in_stock_mode_and_correctly_rounded_in_float32():
    for backend in BACKENDS.values():
        stock, single = kernel_source(backend, RMSPROP, "stock"), kernel_source(backend, RMSPROP, "float32")
        calls = lambda *spellings: [x.split("{")[0] for x in spellings]  # noqa: E731  ("stock_divide<T>(", ...)
        assert all(call in stock for call in calls(backend.stock_divide, backend.stock_sqrt))
        assert all(call in single for call in calls(backend.divide, backend.sqrt))
        assert backend is METAL or "stock_" not in single


def test_each_backend_speaks_its_language():
    metal, cuda = kernel_source(METAL, RMSPROP), kernel_source(CUDA, RMSPROP)
    cuda32 = kernel_source(CUDA, RMSPROP, "float32")
    assert "thread_position_in_grid.x" in metal and "metal::precise::sqrt" in metal and "precise::divide" in metal
    assert "this_grid().thread_rank()" in cuda and "stock_sqrt<T>(" in cuda and "static_cast<T>(" in cuda
    assert "stock_divide<T>(" in cuda and "__fmul_rn(" in cuda and "__fadd_rn(" in cuda  # never fused into an fma
    assert "__fsqrt_rn(" in cuda32 and "__fdiv_rn(" in cuda32 and "stock_" not in cuda32  # correctly rounded
    assert "metal::" not in cuda and "cooperative_groups" not in metal


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_abs_sign_and_maximum_are_spelled_as_mlxs_kernels_compute_them(backend):
    adamax = kernel_source(backend, rule("adamax").trace(rule("adamax").defaults))
    lion = kernel_source(backend, rule("lion").trace(rule("lion").defaults))
    isnan = "metal::isnan(" if backend is METAL else "isnan("
    assert isnan in adamax and ("metal::abs(" if backend is METAL else "fabsf(") in adamax
    assert "> 0.0f) - (" in lion and "< 0.0f))" in lion


def test_cuda_stock_takes_sqrt_and_divide_as_mlxs_cuda_build_does_per_dtype():
    """MLX's CUDA Sqrt and Divide on __half and __nv_bfloat16 are hsqrt and __hdiv (approximations); on float
    IEEE's. The header says so per type, and only the CUDA kernel object gets it."""
    header = gpu_source.CUDA_STOCK_HEADER
    for half in ("__half", "__nv_bfloat16"):
        assert f"stock_sqrt<{half}>" in header and f"stock_divide<{half}>" in header
    assert header.count("hsqrt(") == 2 and header.count("__hdiv(") == 2
    assert "return __fsqrt_rn(x);" in header and "return __fdiv_rn(a, b);" in header
    assert METAL.header == "" and CUDA.header == header


@pytest.mark.parametrize("bad", [dict(precision="half"), dict(n_gradients=0), dict(n_gradients=26)])
def test_source_refuses_what_it_cannot_build(bad):
    with pytest.raises(ValueError):
        kernel_source(METAL, RMSPROP, **bad)


#: Leaves per launch: 31 buffers less w, scalars, offsets, the w output, and each state read and each changed.
LEAVES_PER_LAUNCH = {"rmsprop": [25], "sgd": [27, 27] + [25] * 6, "adagrad": [25], "adadelta": [23],
                     "adam": [23, 23], "adamw": [23, 23], "adamax": [23], "lion": [25, 25]}  # fmt: skip


@pytest.mark.parametrize("r", all_rules(), ids=lambda r: r.name)
def test_metal_buffer_arguments_fit_its_limit_of_31_per_rule(r):
    traces = [r.trace(hyper) for hyper in r.configurations()]
    assert [kernel_layout(trace).max_leaves for trace in traces] == LEAVES_PER_LAUNCH[r.name]
    for trace in traces:
        most = kernel_layout(trace).max_leaves
        assert len(kernel_layout(trace).input_names(most)) + len(kernel_layout(trace).output_names()) == 31
        assert f"g{most - 1}[i - offsets[{most - 1}]]" in kernel_source(METAL, trace, n_gradients=most)
        with pytest.raises(ValueError, match=f"1 to {most} gradient leaves"):
            kernel_source(METAL, trace, n_gradients=most + 1)


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
    hyper = step_scalars(RMSPROP, kernel_layout(RMSPROP), mx.array(0.01), {})
    w_new, v_new = dispatch(launcher, w, [mx.abs(v), hyper, offsets, *gs], 2)
    (call,) = launcher.launches
    assert (
        call["inputs"][0] is w and call["inputs"][3] is offsets and all(a is b for a, b in zip(call["inputs"][4:], gs))
    )
    assert call["template"] == [("T", dtype)]
    assert call["grid"] == (1000003, 1, 1) and call["threadgroup"] == (THREADS_PER_GROUP, 1, 1)
    assert call["output_shapes"] == [(1000003,), (1000003,)] and call["output_dtypes"] == [dtype, dtype]
    assert call["stream"] == mx.gpu
    assert w_new.dtype == dtype and v_new.shape == (1000003,)


def test_the_scalars_input_holds_lr_the_steps_values_and_the_slots_in_float32():
    rmsprop = step_scalars(RMSPROP, kernel_layout(RMSPROP), mx.array(0.01), {})
    assert np.array(rmsprop).tolist() == np.float32([0.01, 0.99, 1 - 0.99, 1e-8]).tolist()
    adam = rule("adam").trace({**rule("adam").defaults, "bias_correction": True})
    values = {"bias1": mx.array(0.1), "rsqrt_bias2": mx.array(31.6)}
    scalars = step_scalars(adam, kernel_layout(adam), mx.array(0.5), values)
    assert kernel_layout(adam).scalar_inputs == ("lr", "bias1", "rsqrt_bias2") and scalars.dtype == mx.float32
    assert np.array(scalars).tolist() == np.float32([0.5, 0.1, 31.6, *adam.slots]).tolist()


def test_dispatch_skips_empty_buffers_and_refuses_other_dtypes():
    launcher = FakeLauncher()
    empty = mx.zeros((0,))
    assert dispatch(launcher, empty, [empty, mx.zeros((4,)), mx.zeros((2,), mx.uint32), empty], 2)[0] is empty
    ints = mx.zeros((4,), dtype=mx.int32)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        dispatch(launcher, ints, [ints, mx.zeros((4,)), mx.zeros((2,), mx.uint32), ints], 2)
    assert launcher.launches == []


def test_launches_take_at_most_25_leaves_of_one_dtype_and_skip_empty_ones():
    leaves = [mx.zeros((k + 1,)) for k in range(60)] + [mx.zeros((0,)), mx.zeros((2,), mx.float16)]
    launches = plan_launches(FlatLayout(leaves), 25)
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
    assert [lr, alpha, one_minus_alpha, eps] == np.float32([1e-2, 0.9, 1 - 0.9, 1e-6]).tolist()  # float32, raw


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", BACKENDS)
def test_packing_and_dispatch_reach_the_reference(variant, dtype, fake_launcher):
    mx.random.seed(5)
    params = {"a": mx.random.normal((7, 5)).astype(dtype), "b": [mx.random.normal((5, 3)).T.astype(dtype)]}
    check_against_reference_and_stock(variant, params, gradient_sequence(params, 30), 1e-2)


@pytest.mark.parametrize("name", TRACES)
def test_packing_and_dispatch_give_stocks_float32_numbers_for_every_rule(name, fake_launcher):
    """In float32 the launcher's float32 ops are stock's: the states packed, unpacked and handed back in the
    right places, for each rule and configuration (on the code around the kernel, not the kernel source)."""
    r = rule(name.split("-")[0])
    hyper = r.configurations()[int(name.split("-")[1])]
    mx.random.seed(6)
    params = {"a": mx.random.normal((7, 5)), "b": [mx.random.normal((5, 3)).T, mx.random.normal((2,))]}
    grads = gradient_sequence(params, 3)
    got, want = create("metal_kernel", 1e-2, optimizer=r.name, **hyper), r.stock(1e-2, **hyper)
    for g in grads:
        p_got, p_want = got.apply_gradients(g, params), want.apply_gradients(g, params)
        params = p_got
        for (k, a), (_, b) in zip(tree_flatten((p_got, got.state)), tree_flatten((p_want, want.state))):
            assert mx.array_equal(a, b).item(), f"{name}: {k}"
    assert len(fake_launcher.launches) == len(grads)


def test_one_kernel_object_per_source_and_none_for_a_new_hyperparameter_value(monkeypatch):
    built = []
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: built.append(kw) or FakeLauncher())
    monkeypatch.setattr(gpu_kernels, "_KERNELS", {})
    sgd = rule("sgd")
    first = gpu_kernels.shared_kernel(METAL, sgd.trace({**sgd.defaults, "momentum": 0.9}))
    assert gpu_kernels.shared_kernel(METAL, sgd.trace({**sgd.defaults, "momentum": 0.5})) is first  # a slot
    assert gpu_kernels.shared_kernel(METAL, sgd.trace(sgd.defaults)) is not first  # no momentum: another branch
    plain, moving = built[1], built[0]
    assert moving["input_names"] == ["w", "v", "scalars", "offsets", "g0"]
    assert moving["output_names"] == ["w_new", "v_new"] and plain["input_names"] == ["w", "scalars", "offsets", "g0"]
    assert moving["source"] == kernel_source(METAL, sgd.trace({**sgd.defaults, "momentum": 0.9}), "stock", 1)
    assert len(built) == 2 and moving["name"] != plain["name"]


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
    for r in all_rules():  # every rule and configuration, in every dtype
        for hyper, dtype in itertools.product(r.configurations(), DTYPES):
            check_every_rule_matches_stock_bit_for_bit(variant, r, hyper, dtype)


def check_every_rule_matches_stock_bit_for_bit(variant, r, hyper, dtype):
    """Three steps of ``variant`` and of the stock class on the same device: the same bits, the state included."""
    mx.random.seed(2)
    params = {"x": mx.random.normal((4099,)).astype(dtype), "y": [mx.random.normal((3, 257)).astype(dtype)]}
    opt, stock = create(variant, 1e-2, optimizer=r.name, **hyper), r.stock(1e-2, **hyper)
    got = want = params
    for g in gradient_sequence(params, 3):
        got, want = opt.apply_gradients(g, got), stock.apply_gradients(g, want)
    for (k, a), (_, b) in zip(tree_flatten((got, opt.state)), tree_flatten((want, stock.state))):
        assert mx.array_equal(a, b, equal_nan=True).item(), f"{variant} {r.name} {hyper} {dtype} {k}"


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
    launches = plan_launches(FlatLayout([mx.zeros((4,)), mx.zeros((5,)), mx.zeros((2,)), mx.zeros((10,))]), 25)
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
    plan = plan_launches(FlatLayout(leaves), 25, max_elements=lambda itemsize: 40 // itemsize)  # a 40-byte buffer
    assert [launch.group.indices for launch in plan] == [(0,), (1,), (2, 3)]
    with pytest.raises(ValueError, match="leaf 0 has 6 elements; one mlx.core.float32 launch on this device"):
        plan_launches(FlatLayout(leaves), 25, max_elements=lambda itemsize: 20 // itemsize)


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
    kinds = [args[4] for args in asked]
    assert kinds == ["ddccdd", "ddcccd"]  # w, v, scalars, offsets, then the gradients
    assert gpu_source.kernel_name("source", kinds[1]).endswith("_ddcccd")
    assert gpu_kernels.input_kinds(CUDA, [mx.ones((3,))]) == ""  # CUDA's signature does not depend on sizes


@pytest.mark.parametrize("variant", BACKENDS)
def test_precision_is_an_option_of_create(variant, fake_launcher):
    assert create(variant, 1e-2).precision == "stock"
    assert create(variant, 1e-2, precision="float32").precision == "float32"
    with pytest.raises(ValueError, match="precision is one of"):
        create(variant, 1e-2, precision="half")


def test_a_hyperparameter_that_changes_the_branch_mid_run_changes_the_kernel_and_the_plan(fake_launcher):
    """Plain SGD takes 27 leaves per launch and never reads v; with momentum set between steps it reads v and takes
    25: stock's numbers either way (float32, where the launcher's ops are stock's)."""
    params = {f"p{k}": mx.random.normal((k + 1,)) for k in range(30)}
    grads = gradient_sequence(params, 2)
    got, want = create("cuda_kernel", 1e-2, optimizer="sgd"), optim.SGD(1e-2)
    p_got = p_want = params
    for g in grads:
        p_got, p_want = got.apply_gradients(g, p_got), want.apply_gradients(g, p_want)
        for (k, a), (_, b) in zip(tree_flatten((p_got, got.state)), tree_flatten((p_want, want.state))):
            assert mx.array_equal(a, b).item(), k
        got.momentum = want.momentum = 0.9
    assert [len(launch["inputs"]) - 3 for launch in fake_launcher.launches] == [27, 3, 25 + 1, 5 + 1]  # + v
