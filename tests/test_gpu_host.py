"""The Metal and CUDA kernels' generated source, executed on the CPU and compared bit for bit with stock.

``gpu_host`` builds the full source MLX builds around each kernel body (for
Metal, MLX itself writes it while exporting), compiles it with g++ against
small shims and MLX's own ``float16_t``/``bfloat16_t``, and runs every thread
of the grid, the spare threads of a partial last CUDA block included. The
optimizer around it is the real one: only the kernel object is swapped.
What this cannot show: the GPU compilers' code generation and the hardware.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from gpu_host import host_runner, nvrtc_check
from gpu_host.host_runner import HostLauncher, compiler
from gpu_host.mlx_sources import cuda_source, metal_source_by_rule, metal_writes_kinds_in_name
from mlx.utils import tree_flatten
from trajectory import gradient_sequence

from rmsprop_impls import PackedGradients, create
from rmsprop_impls.kernels import gpu_kernels
from rmsprop_impls.kernels.gpu_kernels import (
    CUDA,
    MAX_LEAVES_PER_LAUNCH,
    METAL,
    OUTPUT_NAMES,
    PRECISIONS,
    input_names,
    kernel_source,
)

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs g++ to compile the kernels' source for the host")

BACKENDS = {"metal_kernel": METAL, "cuda_kernel": CUDA}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_RAW = {2: mx.uint16, 4: mx.uint32}


@pytest.fixture
def host_launchers(monkeypatch):
    """Make both GPU variants constructible here, each launch running its generated source on the host."""
    made: dict[tuple, HostLauncher] = {}

    def launcher(backend, precision="stock", n_gradients=1, kinds=""):
        key = (backend.name, precision, n_gradients, kinds)
        if key not in made:
            made[key] = HostLauncher(backend, precision, n_gradients, kinds)
        return made[key]

    monkeypatch.setattr(gpu_kernels, "shared_kernel", launcher)
    for name in BACKENDS:
        monkeypatch.setattr(f"rmsprop_impls.variants.{name}.VARIANT.unavailable_reason", classmethod(lambda cls: None))
    return made


def bits(tree) -> list[list[int]]:
    leaves = tree.values() if isinstance(tree, dict) and all(isinstance(x, mx.array) for x in tree.values()) else None
    leaves = list(leaves) if leaves is not None else [x for _, x in tree_flatten(tree)]
    return [x.reshape(-1).view(_RAW[x.dtype.size]).tolist() for x in leaves]


def odd_tree(dtype):
    """A scalar, a transposed leaf, a leaf that ends in a partial 256-thread block, and sizes 1, 3, 7."""
    mx.random.seed(3)
    return {
        "scale": mx.array(0.5, dtype=dtype),
        "w": mx.random.normal((3, 257)).astype(dtype),
        "t": [mx.random.normal((5, 3)).T.astype(dtype), mx.random.normal((7,)).astype(dtype)],
        "b": mx.random.normal((1,)).astype(dtype),
    }


def run(opt, params, grads):
    for g in grads:
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params, {k: s for k, s in tree_flatten(opt.state) if k.endswith(".v")}


class Float32Mode(optim.RMSprop):
    """What ``precision="float32"`` computes: every intermediate in float32, one rounding at each store."""

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate.astype(mx.float32)
        alpha, one_minus_alpha, eps = (mx.array(x, dtype=mx.float32) for x in (self.alpha, 1 - self.alpha, self.eps))
        g = gradient.astype(mx.float32)
        v = alpha * state["v"].astype(mx.float32) + one_minus_alpha * (g * g)
        state["v"] = v.astype(parameter.dtype)
        return (parameter.astype(mx.float32) - (lr * g) / (mx.sqrt(v) + eps)).astype(parameter.dtype)


def schedule(step):
    return 1e-2 * (0.9 ** step.astype(mx.float32))  # a new, unround learning rate every step


@pytest.mark.parametrize("precision", ["stock", "float32"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", BACKENDS)
def test_generated_source_matches_bit_for_bit(variant, dtype, precision, host_launchers):
    params = odd_tree(dtype)
    grads = gradient_sequence(params, 4)
    opt = create(variant, schedule, alpha=0.9, eps=1e-3, precision=precision)
    want_opt = (
        optim.RMSprop(schedule, alpha=0.9, eps=1e-3) if precision == "stock" else Float32Mode(schedule, 0.9, 1e-3)
    )
    got_w, got_v = run(opt, params, grads)
    want_w, want_v = run(want_opt, params, grads)
    assert bits(got_w) == bits(want_w) and bits(got_v) == bits(want_v)
    assert all(x.dtype == dtype for _, x in tree_flatten(got_w))
    ((_, launcher),) = host_launchers.items()
    assert len(launcher.launches) == len(grads)  # one launch per step, over all five leaves
    grid, block = launcher.launches[0]["grid"][0], launcher.launches[0]["threadgroup"][0]
    assert grid == 1 + 3 * 257 + 15 + 7 + 1 and grid % block != 0  # a partial last block


@pytest.mark.parametrize("variant", BACKENDS)
def test_many_leaves_over_several_launches_match_stock(variant, host_launchers):
    mx.random.seed(4)
    params = {f"p{k}": mx.random.normal((2 * k + 1,)).astype(mx.float16) for k in range(27)}
    params["f32"] = [mx.random.normal((300,))]
    grads = gradient_sequence(params, 3)
    got_w, got_v = run(create(variant, 1e-2, precision="stock"), params, grads)
    want_w, want_v = run(optim.RMSprop(1e-2), params, grads)
    assert bits(got_w) == bits(want_w) and bits(got_v) == bits(want_v)
    counts = sorted(key[2] for key in host_launchers)
    assert counts == [1, 2, 25]  # float16: 25 leaves, then 2; float32: 1
    packed = [PackedGradients.pack(g) for g in grads]  # each launch reads its slice of the trainer's buffer
    packed_w, packed_v = run(create(variant, 1e-2, precision="stock"), params, packed)
    assert bits(packed_w) == bits(want_w) and bits(packed_v) == bits(want_v)


def test_cuda_source_compiles_with_nvrtc():
    """Every dtype and precision, with the most gradients a launch takes, in one NVRTC program (each full source
    starts with MLX's header, which ``#pragma once`` keeps to one copy; the kernel names differ)."""
    reason = nvrtc_check.unavailable()
    if reason is not None:
        pytest.skip(f"NVRTC or MLX's CUDA JIT headers are not here: {reason}")
    n = MAX_LEAVES_PER_LAUNCH
    names, sources = [], []
    for precision in PRECISIONS:
        for dtype in DTYPES.values():
            inputs = [mx.zeros((300,), dtype)] * 2 + [mx.zeros((4,)), mx.zeros((n + 1,), mx.uint32)]
            inputs += [mx.zeros((3,), dtype)] * n
            body = kernel_source(CUDA, precision, n)
            out = (list(OUTPUT_NAMES), [dtype, dtype], [("T", dtype)], body)
            name, source = cuda_source(f"rmsprop_step_{precision}_{n}", input_names(n), inputs, *out, CUDA.header)
            names.append(name)
            sources.append(source)
    compiled, log = nvrtc_check.compile_cuda("\n".join(sources), names)
    assert compiled, log


def metal_launch(gradient_sizes, dtype=mx.float32):
    """The inputs and the names of one Metal launch over gradients of ``gradient_sizes``, as the variant makes them."""
    n = sum(gradient_sizes)
    inputs = [
        mx.zeros((n,), dtype),
        mx.zeros((n,), dtype),
        mx.zeros((4,)),
        mx.zeros((len(gradient_sizes) + 1,), mx.uint32),
    ]
    inputs += [mx.zeros((size,), dtype) for size in gradient_sizes]
    kinds = gpu_kernels.input_kinds(METAL, inputs)
    names = dict(name=gpu_kernels.kernel_name("stock", len(gradient_sizes), kinds),
                 input_names=input_names(len(gradient_sizes)), output_names=list(OUTPUT_NAMES))  # fmt: skip
    launch = dict(inputs=inputs, template=[("T", dtype)], grid=(n, 1, 1), threadgroup=(min(n, 256), 1, 1),
                  output_shapes=[(n,), (n,)], output_dtypes=[dtype, dtype])  # fmt: skip
    return kinds, names, launch


LAUNCHES = [(300, 3), (300, 300), (3, 3), (5,), (9,), (2, 7, 8, 1)]


def test_one_metal_kernel_name_one_source_on_this_mlx_release():
    """What MLX 0.30-0.31 got wrong (a new source under a name in use frees its library mid-graph) cannot happen:
    every launch the variant makes gets a kernel name of its own for each signature, on the installed release."""
    sources: dict[str, set[str]] = {}
    for sizes in LAUNCHES:
        kinds, names, launch = metal_launch(sizes)
        kernel = (
            host_runner._REAL_SHARED_KERNEL(METAL, "stock", len(sizes), kinds) if metal_writes_kinds_in_name() else None
        )
        name, full = host_runner.generated_source("metal", kernel, source=kernel_source(METAL, "stock", len(sizes)),
                                                  **names, **launch)  # fmt: skip
        sources.setdefault(name, set()).add(full)
    assert all(len(s) == 1 for s in sources.values()), [n for n, s in sources.items() if len(s) > 1]
    assert len(sources) == len(LAUNCHES)  # each of these launches has a signature of its own


@pytest.mark.skipif(not metal_writes_kinds_in_name(), reason="MLX before 0.32 cannot export a Metal kernel here")
def test_the_metal_rule_for_older_releases_is_mlxs_own_export_less_the_kinds_in_the_name():
    for sizes in LAUNCHES:
        kinds, names, launch = metal_launch(sizes, mx.float16)
        kernel = host_runner._REAL_SHARED_KERNEL(METAL, "stock", len(sizes), kinds)
        source = kernel_source(METAL, "stock", len(sizes))
        exported = host_runner.generated_source("metal", kernel, source=source, **names, **launch)
        ruled = metal_source_by_rule(**names, inputs=launch["inputs"], output_dtypes=launch["output_dtypes"],
                                     template=launch["template"], source=source, kinds_in_name=True)  # fmt: skip
        assert ruled == exported
