"""The Metal and CUDA kernels' generated source, executed on the CPU and compared bit for bit with stock.

``gpu_host`` builds the full source MLX builds around each kernel body (for
Metal, MLX itself writes it while exporting), compiles it with g++ against
small shims and MLX's own ``float16_t``/``bfloat16_t``, and runs every thread
of the grid, the spare threads of a partial last CUDA block included. The
optimizer around it is the real one: only the kernel object is swapped.
What this cannot show: the GPU compilers' code generation and the hardware.

Every rule and configuration (``rule.configurations()``) runs; by default a
fixed sample of back-end, dtype and precision per configuration (about four
minutes on the shared 2-core machine with nothing compiled yet, well under a
minute once the binaries are cached in the temp directory), the whole grid
with ``RMSPROP_FULL_GRID=1`` (every rule and configuration in each back-end,
dtype and precision: 216 cases).
"""

from __future__ import annotations

import itertools
import math
import os

import mlx.core as mx
import pytest
from gpu_host import host_runner, nvrtc_check
from gpu_host.host_runner import HostLauncher, compiler
from gpu_host.mlx_sources import cuda_source, metal_source_by_rule, metal_writes_kinds_in_name
from mlx.utils import tree_flatten
from trajectory import gradient_sequence

from rmsprop_impls import PackedGradients, create
from rmsprop_impls.kernels import gpu_kernels
from rmsprop_impls.kernels.gpu_kernels import CUDA, METAL, PRECISIONS, KernelSpec, input_kinds
from rmsprop_impls.kernels.gpu_source import kernel_layout
from rmsprop_impls.optimizer import OptimizerBase
from rmsprop_impls.rules import all_rules, rule

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs g++ to compile the kernels' source for the host")

BACKENDS = {"metal_kernel": METAL, "cuda_kernel": CUDA}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_RAW = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
FULL_GRID = os.environ.get("RMSPROP_FULL_GRID") == "1"
CONFIGURATIONS = [(r.name, k) for r in all_rules() for k in range(len(r.configurations()))]


def grid_cases() -> list:
    """Each rule and configuration in every back-end, dtype and precision (full grid), or in one of them, turning
    through the combinations so that the sample covers each back-end, dtype and precision with many rules."""
    combos = list(itertools.product(BACKENDS, DTYPES, PRECISIONS))
    if FULL_GRID:
        return [(*c, *combo) for c in CONFIGURATIONS for combo in combos]
    return [(*c, *combos[(7 * k) % len(combos)]) for k, c in enumerate(CONFIGURATIONS)]


@pytest.fixture
def host_launchers(monkeypatch):
    """Make both GPU variants constructible here, each launch running its generated source on the host."""
    made: dict[tuple, HostLauncher] = {}

    def launcher(backend, trace, precision="stock", n_gradients=1, kinds=""):
        key = (backend.name, trace.signature(), precision, n_gradients, kinds)
        if key not in made:
            made[key] = HostLauncher(backend, trace, precision, n_gradients, kinds)
        return made[key]

    monkeypatch.setattr(gpu_kernels, "shared_kernel", launcher)
    for name in BACKENDS:
        monkeypatch.setattr(f"rmsprop_impls.variants.{name}.VARIANT.unavailable_reason", classmethod(lambda cls: None))
    return made


def bits(tree) -> dict[str, list[int]]:
    """Each array's bits by its path; a NaN as ``"nan"`` (stock's and the kernels' NaNs are NaNs, their payload is
    not promised)."""
    out = {}
    for key, x in tree_flatten(tree):
        raw = x.reshape(-1).view(_RAW[x.dtype.size]).tolist()
        nan = mx.isnan(x.reshape(-1)).tolist() if mx.issubdtype(x.dtype, mx.floating) else [False] * len(raw)
        out[key] = ["nan" if n else b for b, n in zip(raw, nan)]
    return out


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
    return params, opt.state


class Float32Mode(OptimizerBase):
    """What ``precision="float32"`` computes: the rule's MLX ops on float32 copies, one rounding at each store."""

    def update_leaves(self, w, g, s, scalars):
        new_w, new_s = [], {}
        for i, (wi, gi) in enumerate(zip(w, g)):
            up = {name: x[i].astype(mx.float32) for name, x in s.items()}
            nw, changed = self.rule.update(self.hyper, wi.astype(mx.float32), gi.astype(mx.float32), up,
                                           scalars.lr, scalars.values)  # fmt: skip
            new_w.append(nw.astype(wi.dtype))
            for name, x in changed.items():
                new_s.setdefault(name, []).append(x.astype(wi.dtype))
        return new_w, new_s


def schedule(step):
    return 1e-2 * (0.9 ** step.astype(mx.float32))  # a new, unround learning rate every step


def expected_optimizer(rule_name, hyper, precision):
    r = rule(rule_name)
    if precision == "stock":
        return r.stock(schedule, **hyper)
    return Float32Mode(schedule, optimizer=rule_name, **hyper)


@pytest.mark.parametrize("rule_name, config, variant, dtype, precision", grid_cases())
def test_generated_source_matches_bit_for_bit(rule_name, config, variant, dtype, precision, host_launchers):
    """Stock's numbers in precision="stock" (the CUDA shim models hsqrt's and __hdiv's approximations by
    correctly rounded operations, as stock's CPU computes them); one rounding in precision="float32"."""
    hyper = rule(rule_name).configurations()[config]
    params = odd_tree(DTYPES[dtype])
    grads = gradient_sequence(params, 3)
    got_w, got_s = run(create(variant, schedule, optimizer=rule_name, precision=precision, **hyper), params, grads)
    want_w, want_s = run(expected_optimizer(rule_name, hyper, precision), params, grads)
    assert bits(got_w) == bits(want_w) and bits(got_s) == bits(want_s)
    assert all(x.dtype == DTYPES[dtype] for _, x in tree_flatten(got_w))
    ((_, launcher),) = host_launchers.items()
    assert len(launcher.launches) == len(grads)  # one launch per step, over all five leaves
    grid, block = launcher.launches[0]["grid"][0], launcher.launches[0]["threadgroup"][0]
    assert grid == 1 + 3 * 257 + 15 + 7 + 1 and grid % block != 0  # a partial last block


SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-30, -3.0, 2.0]


@pytest.mark.parametrize("rule_name, variant, dtype", [("adamax", "metal_kernel", mx.bfloat16),
                                                      ("adamax", "cuda_kernel", mx.float16),
                                                      ("lion", "metal_kernel", mx.float16),
                                                      ("lion", "cuda_kernel", mx.bfloat16),
                                                      ("rmsprop", "metal_kernel", mx.float32)])  # fmt: skip
def test_nan_zeros_and_infinities_go_as_in_stock(rule_name, variant, dtype, host_launchers):
    """abs, sign and maximum on NaN, ±0 and ±inf (and what every rule does with them) as stock computes them."""
    hyper = rule(rule_name).configurations()[-1]
    n = len(SPECIALS)
    params = {"p": mx.array([x for x in SPECIALS for _ in range(n)], dtype=dtype)}
    # every pair of them, then each NaN or infinity of the state meets a new gradient
    grads = [{"p": mx.array([y for _ in range(n) for y in SPECIALS[k:] + SPECIALS[:k]], dtype=dtype)} for k in (0, 1)]
    got = run(create(variant, 1e-2, optimizer=rule_name, **hyper), params, grads)
    want = run(rule(rule_name).stock(1e-2, **hyper), params, grads)
    assert bits(got[0]) == bits(want[0]) and bits(got[1]) == bits(want[1])


@pytest.mark.parametrize("rule_name, variant", [("rmsprop", "metal_kernel"), ("adamw", "cuda_kernel"),
                                               ("sgd", "metal_kernel")])  # fmt: skip
def test_many_leaves_over_several_launches_match_stock(rule_name, variant, host_launchers):
    """Each rule takes as many leaves per launch as Metal's 31 buffers leave it (RMSprop 25, AdamW 23, SGD 27)."""
    most = kernel_layout(rule(rule_name).trace(rule(rule_name).defaults)).max_leaves
    mx.random.seed(4)
    params = {f"p{k}": mx.random.normal((2 * k + 1,)).astype(mx.float16) for k in range(most + 2)}
    params["f32"] = [mx.random.normal((300,))]
    grads = gradient_sequence(params, 3)
    got = run(create(variant, 1e-2, optimizer=rule_name, precision="stock"), params, grads)
    want = run(rule(rule_name).stock(1e-2), params, grads)
    assert bits(got[0]) == bits(want[0]) and bits(got[1]) == bits(want[1])
    assert sorted(key[3] for key in host_launchers) == [1, 2, most]  # float16: most leaves, then 2; float32: 1
    packed = [PackedGradients.pack(g) for g in grads]  # each launch reads its slice of the trainer's buffer
    packed_run = run(create(variant, 1e-2, optimizer=rule_name, precision="stock"), params, packed)
    assert bits(packed_run[0]) == bits(want[0]) and bits(packed_run[1]) == bits(want[1])


def cuda_program(cases) -> tuple[list[str], list[str]]:
    """The kernel names and full sources of the CUDA kernels for ``cases`` of (rule, config, dtype, precision),
    each with the most gradients its launch takes."""
    names, sources = [], []
    for rule_name, config, dtype, precision in cases:
        trace = rule(rule_name).trace(rule(rule_name).configurations()[config])
        layout = kernel_layout(trace)
        n = layout.max_leaves
        inputs = [mx.zeros((300,), dtype)] * (1 + len(layout.state_inputs))
        inputs += [mx.zeros((4,)), mx.zeros((n + 1,), mx.uint32), *[mx.zeros((3,), dtype)] * n]
        spec = KernelSpec.of(CUDA, trace, precision, n)
        outputs = (list(spec.output_names), [dtype] * len(spec.output_names), [("T", dtype)])
        name, source = cuda_source(spec.name, list(spec.input_names), inputs, *outputs, spec.source, CUDA.header)
        names.append(name)
        sources.append(source)
    return names, sources


def test_cuda_source_compiles_with_nvrtc():
    """Every rule and configuration, dtype and precision, with the most gradients a launch takes, in one NVRTC
    program (each full source starts with MLX's header, which ``#pragma once`` keeps to one copy; the kernel names
    differ). By default float16 and float32 in both precisions; bfloat16 too with RMSPROP_FULL_GRID=1."""
    reason = nvrtc_check.unavailable()
    if reason is not None:
        pytest.skip(f"NVRTC or MLX's CUDA JIT headers are not here: {reason}")
    dtypes = list(DTYPES.values()) if FULL_GRID else [mx.float16, mx.float32]
    cases = [(*c, dtype, precision) for c in CONFIGURATIONS for dtype in dtypes for precision in PRECISIONS]
    names, sources = cuda_program(cases)
    compiled, log = nvrtc_check.compile_cuda("\n".join(sources), names)
    assert compiled, log


def metal_launch(gradient_sizes, dtype=mx.float32, rule_name="rmsprop"):
    """The spec and launch arguments of one Metal launch over gradients of ``gradient_sizes``, as the variant
    makes them."""
    trace = rule(rule_name).trace(rule(rule_name).defaults)
    layout = kernel_layout(trace)
    n = sum(gradient_sizes)
    inputs = [mx.zeros((n,), dtype) for _ in range(1 + len(layout.state_inputs))]
    inputs += [mx.zeros((len(layout.scalar_inputs) + len(trace.slots),)), mx.zeros((len(gradient_sizes) + 1,),
                                                                                    mx.uint32)]  # fmt: skip
    inputs += [mx.zeros((size,), dtype) for size in gradient_sizes]
    kinds = input_kinds(METAL, inputs)
    spec = KernelSpec.of(METAL, trace, "stock", len(gradient_sizes), kinds)
    outputs = len(spec.output_names)
    launch = dict(inputs=inputs, template=[("T", dtype)], grid=(n, 1, 1), threadgroup=(min(n, 256), 1, 1),
                  output_shapes=[(n,)] * outputs, output_dtypes=[dtype] * outputs)  # fmt: skip
    names = dict(name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names))
    return (trace, kinds), spec, names, launch


LAUNCHES = [(300, 3), (300, 300), (3, 3), (5,), (9,), (2, 7, 8, 1)]


@pytest.mark.parametrize("rule_name", ["rmsprop", "adam"])
def test_one_metal_kernel_name_one_source_on_this_mlx_release(rule_name):
    """What MLX 0.30-0.31 got wrong (a new source under a name in use frees its library mid-graph) cannot happen:
    every launch the variant makes gets a kernel name of its own for each signature, on the installed release."""
    sources: dict[str, set[str]] = {}
    for sizes in LAUNCHES:
        (trace, kinds), spec, names, launch = metal_launch(sizes, rule_name=rule_name)
        builds = metal_writes_kinds_in_name()
        kernel = host_runner._REAL_SHARED_KERNEL(METAL, trace, "stock", len(sizes), kinds) if builds else None
        name, full = host_runner.generated_source("metal", kernel, source=spec.source, **names, **launch)
        sources.setdefault(name, set()).add(full)
    assert all(len(s) == 1 for s in sources.values()), [n for n, s in sources.items() if len(s) > 1]
    assert len(sources) == len(LAUNCHES)  # each of these launches has a signature of its own


@pytest.mark.skipif(not metal_writes_kinds_in_name(), reason="MLX before 0.32 cannot export a Metal kernel here")
def test_the_metal_rule_for_older_releases_is_mlxs_own_export_less_the_kinds_in_the_name():
    for sizes in LAUNCHES:
        (trace, kinds), spec, names, launch = metal_launch(sizes, mx.float16, "adamw")
        kernel = host_runner._REAL_SHARED_KERNEL(METAL, trace, "stock", len(sizes), kinds)
        exported = host_runner.generated_source("metal", kernel, source=spec.source, **names, **launch)
        ruled = metal_source_by_rule(**names, inputs=launch["inputs"], output_dtypes=launch["output_dtypes"],
                                     template=launch["template"], source=spec.source, kinds_in_name=True)  # fmt: skip
        assert ruled == exported
