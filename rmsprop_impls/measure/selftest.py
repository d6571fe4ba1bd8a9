"""Does every variant compute the right numbers on this machine, and at what fraction of its device's limit?

The first thing to run on new hardware (a Mac, a CUDA machine) or a new MLX
release. Every variant that runs here takes the same steps of one rule
(:mod:`rmsprop_impls.rules`; RMSprop by default) as the rule's stock class
(``mlx.optimizers.RMSprop``, ``AdamW``, ...) and the float64 reference
(:mod:`rmsprop_impls.reference`), in float32, float16 and bfloat16, over trees
made to catch what goes wrong: odd sizes, nesting in dicts and lists, a 0-d
leaf, a transposed leaf, a leaf big enough for ``cpu_kernel``'s graph-node path,
a schedule with non-default hyper-parameters (the last branch of the rule's
:meth:`~rmsprop_impls.rules.Rule.configurations`: SGD's Nesterov momentum with weight
decay, Adam's bias correction; RMSprop's ``alpha`` 0.9 and ``eps`` 1e-6), gradients
large enough for float16's rounding of ``alpha`` to show, and a hundred steps so that
drift adds up.

A variant is judged only on what it does itself, against what stock does on the
same data on the same machine (see :func:`check_variant`): how far it is from
stock (any bit, where it promises stock's bits; ulps otherwise) and how much
further than stock it drifts from float64, in w and in every state array. Stock's own drift from float64 is
the hardware's and MLX's rounding: it is reported, never judged. A short speed
check then times each variant on one big tree against the limit of the device
it runs on.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from ..mlx_device import device_info
from ..reference import rule_reference_step, tolerance
from ..registry import create, partition_available, variant_class, variant_device
from ..rules import DEFAULT_RULE, Rule, rule
from .bandwidth import (
    cache_resident,
    core_types,
    fraction_of_limit,
    gpu_available,
    limit_for,
    limit_text,
    measure_limits,
    roof_gbps,
)
from .roof import time_beside_roof, working_set
from .trees import dtype_name, random_like, step_bytes, tree_by_name

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
#: Steps per case: enough for a per-step bias to show over the random walk of rounding.
STEPS = 100
#: The speed check's tree: 32 MiB per float32 buffer, larger than any cache.
SPEED_TREE = "8x1M"
#: How much further than stock a variant's w or v may drift from float64, as a share of the agreement tests'
#: rounding bound (:func:`rmsprop_impls.reference.tolerance`). The drift is the largest error over every element,
#: which two correct roundings reach alike: computing in float32 and rounding once (``precision="float32"``) came
#: within 0.02 of the bound of stock's drift in every case tried; rounding w one ulp up each step lands 6 to 8
#: bounds further, a 1% longer step 300 to 1000 in float32.
DRIFT_MARGIN = 0.25
#: NumPy type whose spacing gives the dtype's ulp, times this (bfloat16 is float32 with 16 fewer mantissa bits).
_SPACING = {mx.float32: (np.float32, 1), mx.float16: (np.float16, 1), mx.bfloat16: (np.float32, 1 << 16)}


@dataclass(frozen=True)
class Case:
    """One trajectory: a tree maker, how the learning rate moves and which hyper-parameters each rule runs."""

    name: str
    describe: str
    make_tree: Callable[[np.random.Generator], dict[str, Any]]  # float64 leaves, cast per dtype
    learning_rate: float | Callable[[mx.array], mx.array]
    gradients: tuple[float, float] = (0.05, 2.0)  # |g| uniform in this range, random signs
    #: Take the last of the rule's configurations (its branches: momentum, bias correction) over its defaults.
    varied: bool = False
    #: Values per rule name over those, by stock's names.
    hyper: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def hyper_for(self, optimizer: str | Rule) -> dict[str, Any]:
        """The hyper-parameters ``optimizer`` runs this case with, stock's defaults for the others."""
        r = rule(optimizer)
        base = r.configurations()[-1] if self.varied else r.defaults
        return r.hyperparameters(**{**base, **self.hyper.get(r.name, {})})


def _nested(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "embed": rng.normal(size=(7, 5)),
        "layers": [
            {"w": rng.normal(size=(3, 5)).T, "b": rng.normal(size=(3,))},
            {"w": rng.normal(size=(3, 3)), "scale": np.array(0.5)},
        ],
        "head": {"deep": {"w": rng.normal(size=(2, 3, 4))}},
        "big": rng.normal(size=(513, 521)),  # 267,273 elements: past cpu_kernel's 256K graph-node threshold
    }


def _scheduled(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "w": rng.normal(size=(1001,)),
        "blocks": [{"a": rng.normal(size=(31, 33))}, {"a": rng.normal(size=(65537,))}],
    }


def _large(rng: np.random.Generator) -> dict[str, Any]:
    return {"w": rng.normal(size=(64, 63)), "b": rng.normal(size=(257,))}


CASES = (
    Case(
        "nested",
        "dicts in lists in dicts, odd shapes, a 0-d and a transposed leaf, a 267,273-element leaf",
        _nested,
        1e-2,
    ),
    Case(
        "schedule",
        "cosine learning-rate decay 1e-2 to 1e-4, the rule's last configuration (RMSprop: alpha 0.9, eps 1e-6); "
        "leaves of 1,001, 31x33 and 65,537",
        _scheduled,
        optim.cosine_decay(1e-2, STEPS, 1e-4),
        varied=True,
        hyper={"rmsprop": {"alpha": 0.9, "eps": 1e-6}},
    ),
    Case(
        "large",
        "gradients of 8 to 16 in magnitude on leaves of 64x63 and 257: float16 and bfloat16 round alpha and "
        "1 - alpha, so that stock's own v settles up to 2.5% and 15% below float64's",
        _large,
        1e-2,
        gradients=(8.0, 16.0),
    ),
)


@dataclass
class Check:
    """One variant, case and dtype: the largest errors, the bounds they are judged by, and what went wrong."""

    case: str
    dtype: str
    steps: int
    rel_w_vs_reference: float
    rel_state_vs_reference: float  # the largest over the rule's state arrays (RMSprop's v; Adam's m and v)
    rel_w_vs_stock: float
    ulps_vs_stock: float  # largest, over w and the states, at max(|value|, 1); inf where one is NaN, one not
    differing_vs_stock: float  # fraction of the elements of w and the states whose bits differ from stock's
    w_drift_bound: float  # stock's own rel_w_vs_reference on the same data, plus the margin
    state_drift_bound: float
    ulps_bound: float | None  # stock's ulps from float64 plus the margin; None where stock's bits are promised
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class VariantReport:
    variant: str
    device: str | None
    unavailable: str | None = None
    stock_exact: str = "not promised"  # "promised (precision='stock')" where the contract applies
    checks: list[Check] = field(default_factory=list)
    speed: dict[str, Any] | None = None
    error: str | None = None  # an exception that stopped a check

    @property
    def passed(self) -> bool | None:
        if self.unavailable:
            return None
        return self.error is None and all(c.passed for c in self.checks)

    def worst(self, attribute: str, dtype: str | None = None) -> float | None:
        values = [getattr(c, attribute) for c in self.checks if dtype is None or c.dtype == dtype]
        return max(values, default=None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        for c, d in zip(self.checks, out["checks"]):
            d["passed"] = c.passed
        dtypes = dict.fromkeys(c.dtype for c in self.checks)
        out["max_ulps_vs_stock"] = {d: self.worst("ulps_vs_stock", d) for d in dtypes}
        out["bit_identical_with_stock"] = {d: self.worst("differing_vs_stock", d) == 0 for d in dtypes}
        out["max_rel_error_vs_reference"] = {d: self.worst("rel_w_vs_reference", d) for d in dtypes}
        return out


@dataclass
class SelftestResult:
    platform: dict[str, Any]
    limits: dict[str, float | None]
    variants: list[VariantReport]
    stock: list[dict[str, Any]]  # the stock class against the float64 reference, per case and dtype: reported only
    steps: int
    wall_s: float = 0.0
    cases: tuple[Case, ...] = CASES
    optimizer: str = DEFAULT_RULE

    @property
    def passed(self) -> bool:
        return all(v.passed is not False for v in self.variants)

    def to_dict(self) -> dict[str, Any]:
        return _finite_json(
            {
                "passed": self.passed,
                "optimizer": self.optimizer,
                "stock_class": f"mlx.optimizers.{rule(self.optimizer).title}",
                "wall_s": self.wall_s,
                "steps": self.steps,
                "platform": self.platform,
                "limits_gbps": {d: roof_gbps(r) for d, r in self.limits.items()},
                "limits": {d: limit_text(g, d) for d, g in self.limits.items()},
                "cases": [
                    {"name": c.name, "tree": c.describe, "hyper": c.hyper_for(self.optimizer)} for c in self.cases
                ],
                "dtypes": [dtype_name(d) for d in DTYPES],
                "stock_vs_reference": self.stock,
                "variants": [v.to_dict() for v in self.variants],
            }
        )


def _finite_json(value: Any) -> Any:
    """JSON has no NaN or infinity: they become the strings ``"nan"``, ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def platform_info(limits: dict[str, float | None]) -> dict[str, Any]:
    """What a bug report needs to reproduce: the OS, CPU, GPU, MLX and its packages, the devices."""
    packages = {}
    for dist in ("rmsprop-bench", "mlx", "mlx-metal", "mlx-cpu", "mlx-cuda", "mlx-cuda-12", "mlx-cuda-13"):
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = None
    if gpu_available():
        info = device_info()
        gpu = str(info.get("device_name") or info.get("architecture") or "present (MLX gives no name)")
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "core_types": core_types(),
        "gpu": gpu,
        "mlx": mx.__version__,
        "packages": packages,
        "default_device": str(mx.default_device()),
        "devices": ["cpu", "gpu"] if gpu else ["cpu"],
        "limits": {d: limit_text(g, d) for d, g in limits.items()},
    }


def _cpu_name() -> str:
    try:
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip() or platform.processor()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_mx(tree: Any, dtype: mx.Dtype) -> Any:
    return tree_map(lambda x: mx.array(np.asarray(x, dtype=np.float32)).astype(dtype), tree)


def _gradients(
    params: Any, steps: int, rng: np.random.Generator, magnitude: tuple[float, float] = (0.05, 2.0)
) -> list[Any]:
    """Bounded away from zero: in float16 stock divides by zero once ``(1-alpha)*g^2`` underflows (the README)."""
    low, high = magnitude

    def one(x: mx.array) -> mx.array:
        magnitude = rng.uniform(low, high, size=x.shape)
        sign = np.where(rng.random(size=x.shape) < 0.5, -1.0, 1.0)
        return mx.array((magnitude * sign).astype(np.float32)).astype(x.dtype)

    grads = [tree_map(one, params) for _ in range(steps)]
    mx.eval(grads)
    return grads


def _leaves(tree: Any) -> list[mx.array]:
    return [x for _, x in tree_flatten(tree)]


def _state_leaves(state: dict, names: tuple[str, ...]) -> list[mx.array]:
    """Every leaf's state arrays, state name by state name (all the leaves' ``m``, then their ``v``)."""
    flat = [(k.rsplit(".", 1), x) for k, x in tree_flatten(state)]
    return [x for name in names for parts, x in flat if len(parts) == 2 and parts[1] == name]


def _f64(leaves: list[mx.array]) -> list[np.ndarray]:
    return [np.array(x.astype(mx.float32), dtype=np.float64) for x in leaves]


def _run(optimizer: Any, params: Any, grads: list[Any], r: Rule) -> tuple[list[mx.array], list[mx.array]]:
    for g in grads:
        params = optimizer.apply_gradients(g, params)
        mx.eval(params, optimizer.state)
    return _leaves(params), _state_leaves(optimizer.state, r.states)


def _reference(params: Any, grads: list[Any], case: Case, r: Rule) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """The float64 trajectory's final w and states (as :func:`_run` lists them), and its largest step
    ``|w_{t+1} - w_t|``, which the rounding bound grows with where it exceeds 1 (:func:`~rmsprop_impls.reference.
    tolerance`): measured, so that it holds for every rule, not only RMSprop's ``lr/sqrt(1-alpha)``."""
    hyper = case.hyper_for(r)
    w = _f64(_leaves(params))
    states = [{name: np.zeros_like(x) for name in r.states} for x in w]
    largest = 0.0
    for step, g in enumerate(grads):
        lr = case.learning_rate
        lr = float(lr(mx.array(step))) if callable(lr) else lr
        new = [rule_reference_step(r, hyper, *wgs, lr, step + 1) for wgs in zip(w, _f64(_leaves(g)), states)]
        largest = max([largest, *(float(np.max(np.abs(n[0] - x), initial=0)) for n, x in zip(new, w))])
        w, states = [n[0] for n in new], [n[1] for n in new]
    return w, [s[name] for name in r.states for s in states], largest


def max_rel_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The largest ``|a - e| / (1 + |e|)``; NaN where either holds a NaN, so that it fails every bound."""
    worst = 0.0
    for a, e in zip(actual, expected):
        err = np.abs(a - e) / (1 + np.abs(e))
        if err.size:
            worst = max(worst, float(np.max(err)))  # np.max propagates NaN; max(0.0, nan) keeps the 0.0
            if np.isnan(err).any():
                return math.nan
    return worst


def ulps_apart(a: mx.array, b: mx.array) -> tuple[float, int]:
    """How far ``a`` is from ``b`` in ulps of the dtype, and in how many elements their bits differ.

    The ulps are counted at each element's magnitude, floored at 1: ``|a - b| / ulp(max(|a|, |b|, 1))``, the
    same scale as the relative errors (of ``1 + |w|``). Counting every representable value in between instead
    would make one rounding near 0, where ``w - step`` cancels, look like thousands of ulps. Two NaNs are
    equal, as are +0 and -0; a NaN against a number is infinitely far.
    """
    x, y = (np.array(t.astype(mx.float32), dtype=np.float64) for t in (a, b))
    return _ulps_apart(x, y, a.dtype)


def _ulps_apart(x: np.ndarray, y: np.ndarray, dtype: mx.Dtype) -> tuple[float, int]:
    """:func:`ulps_apart` of float64 arrays, in ulps of ``dtype``; ``x`` may be the reference, between its values."""
    x, y = x.ravel(), y.ravel()
    if x.size == 0:
        return 0.0, 0
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    if (nan_x != nan_y).any():
        return math.inf, int((nan_x != nan_y).sum() + ((x != y) & ~nan_x & ~nan_y).sum())
    same = (x == y) | (nan_x & nan_y)  # exact: every value of the dtype is exact in float32 and float64
    scale = np.where(same, 1.0, np.maximum(np.maximum(np.abs(x), np.abs(y)), 1.0))  # no NaN: both NaN are same
    ulp = np.spacing(scale.astype(_SPACING[dtype][0])).astype(np.float64) * _SPACING[dtype][1]
    ulps = np.where(same, 0.0, np.abs(x - y) / ulp)
    return float(np.max(ulps)), int((~same).sum())


def _stock_exact(name: str) -> bool:
    """Whether this build of ``name`` promises bit-identity with stock: it takes ``precision`` (default "stock")."""
    parameters = inspect.signature(variant_class(name).__init__).parameters
    return "precision" in parameters and parameters["precision"].default in ("stock", inspect.Parameter.empty)


@dataclass(frozen=True)
class StockRun:
    """Stock's and the float64 reference's final w and states (``v``: every state array, state by state) on one
    case and dtype, and how far apart they are.

    This is what a variant is judged against: stock's own distance from float64 is this machine's and this MLX's
    rounding, so a variant may be as far from float64 as stock is, plus a margin, whatever that distance is.
    """

    w: list[mx.array]
    v: list[mx.array]
    reference_w: list[np.ndarray]
    reference_v: list[np.ndarray]
    rel_w_vs_reference: float
    rel_v_vs_reference: float
    ulps_vs_reference: float  # largest over w and the states, counted as ulps_apart counts them
    largest_step: float  # the float64 trajectory's largest |w_{t+1} - w_t|
    optimizer: str = DEFAULT_RULE

    def w_tolerance(self, dtype: mx.Dtype, steps: int) -> float:
        return tolerance(dtype, steps, self.largest_step)


def stock_run(
    case: Case, dtype: mx.Dtype, params: Any, grads: list[Any], optimizer: str | Rule = DEFAULT_RULE
) -> StockRun:
    """The rule's stock class (``mlx.optimizers.RMSprop``, ...) and the float64 reference over ``grads``."""
    r = rule(optimizer)
    w, v = _run(r.stock(case.learning_rate, **case.hyper_for(r)), params, grads, r)
    ref_w, ref_v, largest = _reference(params, grads, case, r)
    ulps = [_ulps_apart(a, b, dtype)[0] for a, b in zip(ref_w + ref_v, _f64(w + v))]
    rel_w, rel_v = max_rel_error(_f64(w), ref_w), max_rel_error(_f64(v), ref_v)
    return StockRun(w, v, ref_w, ref_v, rel_w, rel_v, max(ulps, default=0.0), largest, r.name)


def _ulp_of_one(dtype: mx.Dtype) -> float:
    numpy_type, times = _SPACING[dtype]
    return float(np.spacing(numpy_type(1.0))) * times


def check_variant(name: str, case: Case, dtype: mx.Dtype, params: Any, grads: list[Any], stock: StockRun) -> Check:
    """Run ``name`` (on ``stock``'s rule) over ``grads`` and judge its final w and states against ``stock``'s.

    It fails for what it does itself, never for stock's own drift:

    * where it promises stock's bits (``precision="stock"``), on any bit of w or v that differs from stock's;
    * otherwise, where it is further from stock, in ulps, than float64 is, by more than the agreement tests'
      bound (:func:`~rmsprop_impls.reference.tolerance`) in ulps of the dtype at 1;
    * where its w or a state is further from float64 than stock's is by more than :data:`DRIFT_MARGIN` of that
      bound.

    A NaN fails every bound, except that a drift cannot be judged against a stock that gives NaN.
    """
    steps = len(grads)
    w_tol = stock.w_tolerance(dtype, steps)
    v_tol = tolerance(dtype, steps)
    r = rule(stock.optimizer)
    w, v = _run(create(name, case.learning_rate, optimizer=r, **case.hyper_for(r)), params, grads, r)
    promised = _stock_exact(name)
    ulps_margin = w_tol / _ulp_of_one(dtype)
    apart = [ulps_apart(a, b) for a, b in zip(w + v, stock.w + stock.v)]
    check = Check(
        case=case.name,
        dtype=dtype_name(dtype),
        steps=steps,
        rel_w_vs_reference=max_rel_error(_f64(w), stock.reference_w),
        rel_state_vs_reference=max_rel_error(_f64(v), stock.reference_v),
        rel_w_vs_stock=max_rel_error(_f64(w), _f64(stock.w)),
        ulps_vs_stock=max([u for u, _ in apart], default=0.0),
        differing_vs_stock=sum(n for _, n in apart) / max(sum(x.size for x in w + v), 1),
        w_drift_bound=stock.rel_w_vs_reference + DRIFT_MARGIN * w_tol,
        state_drift_bound=stock.rel_v_vs_reference + DRIFT_MARGIN * v_tol,
        ulps_bound=None if promised else stock.ulps_vs_reference + ulps_margin,
    )
    where = f"{case.name} {check.dtype}"
    if promised and check.differing_vs_stock:
        check.failures.append(
            f"{where}: {100 * check.differing_vs_stock:.2g}% of the elements differ from stock (by up to "
            f"{check.ulps_vs_stock:.3g} ulps) though precision='stock' promises bit-identity"
        )
    if check.ulps_bound is not None and not _within(check.ulps_vs_stock, check.ulps_bound):
        check.failures.append(
            f"{where}: {check.ulps_vs_stock:.3g} ulps from stock, further than float64 is from stock "
            f"({stock.ulps_vs_reference:.3g} ulps) plus the margin ({ulps_margin:.3g})"
            if math.isfinite(check.ulps_bound)
            else f"{where}: inf ulps from stock: a number where stock gives NaN, or NaN where it gives a number"
        )
    for part, err, own, bound in (
        ("w", check.rel_w_vs_reference, stock.rel_w_vs_reference, check.w_drift_bound),
        ("the state", check.rel_state_vs_reference, stock.rel_v_vs_reference, check.state_drift_bound),
    ):
        if math.isfinite(own) and not err <= bound:
            check.failures.append(
                f"{where}: {part} drifts from float64 ({err:.3g}) further than stock does here ({own:.3g}) plus the "
                f"margin ({bound - own:.2g})"
            )
    return check


def _within(ulps: float, bound: float) -> bool:
    """``ulps <= bound``; against a stock that is infinitely far from float64 (a NaN), NaN in the same places."""
    return ulps <= bound if math.isfinite(bound) else math.isfinite(ulps)


def speed_check(
    name: str, limits: dict[str, float | None], tree: str, repeats: int = 5, optimizer: str | Rule = DEFAULT_RULE
) -> dict[str, Any]:
    """Median step time of ``optimizer`` (stock's defaults) on ``tree`` (float32), its GB/s and the fraction of
    the limit of ``name``'s device: on the CPU, of the roof's kernels timed in the same rounds
    (:func:`~.roof.time_beside_roof`), elsewhere of ``limits``."""
    params = tree_by_name(tree)
    grads = random_like(params)
    opt, device, nbytes = create(name, 1e-3, optimizer=optimizer), variant_device(name), step_bytes(params, optimizer)
    touched = working_set(nbytes, optimizer)
    mx.eval(params, grads)

    def step() -> None:
        nonlocal params
        params = opt.apply_gradients(grads, params)  # rebound first, so that its buffers may be donated
        mx.eval(params, opt.state)

    roof = limit_for(limits, device) if device == "cpu" else None
    timing, roof_gbps = time_beside_roof(step, roof, touched, repeats, repeats)
    gbps = nbytes / timing.median / 1e9
    return {
        "tree": tree,
        "median_ms": timing.median * 1e3,
        "gbps": gbps,
        "fraction_of_limit": gbps / roof_gbps if roof_gbps else fraction_of_limit(gbps, limits, device, touched),
        "cache_resident": cache_resident(limits, device, touched),
    }


def run_selftest(
    variants: list[str] | None = None,
    steps: int = STEPS,
    speed_tree: str | None = SPEED_TREE,
    limits: dict[str, float | None] | None = None,
    progress: bool = True,
    seed: int = 0,
    cases: tuple[Case, ...] = CASES,
    optimizer: str | Rule = DEFAULT_RULE,
) -> SelftestResult:
    """Check every variant that runs here (or ``variants``) running ``optimizer`` on ``cases``;
    ``speed_tree=None`` skips the speed check."""
    r = rule(optimizer)
    start = time.perf_counter()
    runnable, unavailable = partition_available(variants)
    limits = measure_limits() if limits is None else limits
    reports = {name: VariantReport(name, variant_device(name)) for name in runnable}
    for name in runnable:
        reports[name].stock_exact = "promised (precision='stock')" if _stock_exact(name) else "not promised"
    for name, reason in unavailable.items():
        reports[name] = VariantReport(name, _declared_or_none(name), unavailable=reason)
    stock_rows = []
    total = len(cases) * len(DTYPES) * (len(runnable) + 1) + (len(runnable) if speed_tree else 0)
    with tqdm(total=total, desc="selftest", unit="check", disable=not progress, leave=False) as bar:
        for case in cases:
            tree64 = case.make_tree(np.random.default_rng(seed))
            for dtype in DTYPES:
                params = _as_mx(tree64, dtype)
                grads = _gradients(params, steps, np.random.default_rng(seed + 1), case.gradients)
                stock = stock_run(case, dtype, params, grads, r)
                stock_rows.append(_stock_row(case, dtype, steps, stock))
                bar.update()
                for name in runnable:
                    bar.set_postfix_str(f"{name} {case.name} {dtype_name(dtype)}")
                    if reports[name].error is None:
                        try:
                            reports[name].checks.append(check_variant(name, case, dtype, params, grads, stock))
                        except Exception as e:  # noqa: BLE001 - a crash is a finding to report, not to hide
                            reports[name].error = f"{case.name} {dtype_name(dtype)}: {type(e).__name__}: {e}"
                    bar.update()
        if speed_tree:
            for name in runnable:
                bar.set_postfix_str(f"speed {name}")
                try:
                    reports[name].speed = speed_check(name, limits, speed_tree, optimizer=r)
                except Exception as e:  # noqa: BLE001
                    reports[name].error = reports[name].error or f"speed check: {type(e).__name__}: {e}"
                bar.update()
                mx.clear_cache()
    ordered = [reports[name] for name in (variants or list(reports)) if name in reports]
    result = SelftestResult(platform_info(limits), limits, ordered, stock_rows, steps, cases=cases, optimizer=r.name)
    result.wall_s = time.perf_counter() - start
    return result


def _declared_or_none(name: str) -> str | None:
    try:
        return variant_device(name)
    except (ValueError, RuntimeError):
        return None


def _stock_row(case: Case, dtype: mx.Dtype, steps: int, stock: StockRun) -> dict[str, Any]:
    """Stock against float64, for the report: the agreement tests' bounds are given for scale, not judged."""
    w_tol = stock.w_tolerance(dtype, steps)
    v_tol = tolerance(dtype, steps)
    return {
        "case": case.name,
        "dtype": dtype_name(dtype),
        "rel_w_vs_reference": stock.rel_w_vs_reference,
        "rel_state_vs_reference": stock.rel_v_vs_reference,
        "largest_step": stock.largest_step,
        "ulps_vs_reference": stock.ulps_vs_reference,
        "w_tolerance": w_tol,
        "state_tolerance": v_tol,
        "within_tolerance": stock.rel_w_vs_reference <= w_tol and stock.rel_v_vs_reference <= v_tol,
    }
