"""``rmsprop-bench selftest`` runs every variant for real, writes what a bug report needs, fails on a disagreement."""

from __future__ import annotations

import json
import math
import sys
import types

import mlx.core as mx
import numpy as np
import pytest

from rmsprop_impls import available_variants, registry, variant_names
from rmsprop_impls.cli import main
from rmsprop_impls.cli.selftest import markdown_summary
from rmsprop_impls.measure import selftest
from rmsprop_impls.measure.roof import Roof
from rmsprop_impls.optimizer import StepScalars
from rmsprop_impls.reference import tolerance
from rmsprop_impls.variants.eager import EagerOptimizer

#: A small run: the same trees and dtypes, fewer steps, a tiny speed tree, a stubbed limit (the triad has its tests).
SMALL = ["--steps", "8", "--speed-tree", "2x1K"]
LIMITS = {"cpu": 10.0, "gpu": None}
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture
def stub_limits(monkeypatch):
    monkeypatch.setattr(selftest, "measure_limits", lambda: dict(LIMITS))


def _selftest(tmp_path, *extra):
    path = tmp_path / "out" / "selftest.json"
    path.parent.mkdir()
    status = main(["selftest", "--json", str(path), *SMALL, *extra])
    return status, json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_every_variant_passes_here_and_the_report_has_what_a_bug_report_needs(tmp_path, stub_limits, capsys):
    status, result, markdown = _selftest(tmp_path)
    assert status == 0 and result["passed"] is True
    assert [v["variant"] for v in result["variants"]] == variant_names()
    here = available_variants()
    for v in result["variants"]:
        if v["variant"] not in here:
            assert v["passed"] is None and v["unavailable"] and v["checks"] == []
            assert f"- {v['variant']} ({v['device']}): {v['unavailable']}" in markdown
            continue
        assert v["passed"] is True and v["device"] in ("cpu", "gpu")
        assert {(c["case"], c["dtype"]) for c in v["checks"]} == {
            (case.name, dtype) for case in selftest.CASES for dtype in DTYPES
        }
        assert set(v["max_ulps_vs_stock"]) == set(v["bit_identical_with_stock"]) == set(DTYPES)
        assert v["speed"]["tree"] == "2x1K" and v["speed"]["gbps"] > 0
        assert v["speed"]["fraction_of_limit"] == pytest.approx(v["speed"]["gbps"] / LIMITS[v["device"]])
        assert f"| {v['variant']} | {v['device']} | pass |" in markdown
    for mlx_ops in {"eager", "compiled", "flat", "cpu_stream"} & set(here):  # stock's ops in stock's order
        (v,) = [v for v in result["variants"] if v["variant"] == mlx_ops]
        assert all(v["bit_identical_with_stock"].values()), mlx_ops
    info = result["platform"]
    assert (
        info["mlx"] == mx.__version__ and info["cpu"] and info["limits"] == {"cpu": "10.0 GB/s", "gpu": "n/a (no GPU)"}
    )
    assert result["limits"]["gpu"] == "n/a (no GPU)"
    rows = result["stock_vs_reference"]
    assert [(s["case"], s["dtype"]) for s in rows] == [(c.name, d) for c in selftest.CASES for d in DTYPES]
    assert all(s["rel_w_vs_reference"] < s["w_tolerance"] and "passed" not in s for s in rows)  # reported only
    assert "reported, not judged" in markdown
    assert markdown.startswith("## rmsprop-bench selftest (RMSprop): PASSED")
    assert result["optimizer"] == "rmsprop" and result["stock_class"] == "mlx.optimizers.RMSprop"
    assert [c["hyper"]["alpha"] for c in result["cases"]] == [0.99, 0.9, 0.99]  # the schedule's own values
    for needed in ("| platform |", "| CPU |", "| GPU | none |", f"| MLX | {mx.__version__}", "gpu limit n/a (no GPU)"):
        assert needed in markdown
    assert "### Disagreements" not in markdown
    assert capsys.readouterr().out.startswith(markdown)


def test_a_variant_that_disagrees_fails_the_selftest_with_exit_status_1(tmp_path, stub_limits, monkeypatch):
    def off_by_a_little(self, w, g, s, scalars):
        new_w, new_s = EagerOptimizer.update_leaves(self, w, g, s, scalars)
        return [x * 1.01 for x in new_w], new_s

    from rmsprop_impls.variants.flat import FlatOptimizer

    monkeypatch.setattr(FlatOptimizer, "update_buffers", _unpack(off_by_a_little))
    status, result, markdown = _selftest(tmp_path, "--variants", "eager", "flat")
    assert status == 1 and result["passed"] is False
    eager, flat = result["variants"]
    assert eager["passed"] is True and flat["passed"] is False
    failures = [f for c in flat["checks"] for f in c["failures"]]
    assert failures and all("drifts from float64" in f or "ulps from stock" in f for f in failures)
    assert markdown.startswith("## rmsprop-bench selftest (RMSprop): FAILED")
    assert "| flat | cpu | **FAIL** |" in markdown and "### Disagreements" in markdown
    assert "- flat: nested float32: w drifts from float64 (" in markdown


def _unpack(update_leaves):
    """``update_buffers`` takes one buffer per dtype; run the leaf function on it as a one-leaf list."""

    def update_buffers(self, w, g, s, scalars):
        (new_w,), new_s = update_leaves(self, [w], [g], {name: [x] for name, x in s.items()}, scalars)
        return new_w, {name: x for name, (x,) in new_s.items()}

    return update_buffers


def test_a_crash_is_a_failure_with_its_message(tmp_path, stub_limits, monkeypatch):
    def crash(self, w, g, s, scalars):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(EagerOptimizer, "update_leaves", crash)
    status, result, markdown = _selftest(tmp_path, "--variants", "eager")
    assert status == 1 and "RuntimeError: kernel exploded" in result["variants"][0]["error"]
    assert "- eager: nested float32: RuntimeError: kernel exploded" in markdown


def _register(monkeypatch, cls: type) -> str:
    """Register ``cls`` for this test only, as the package registers its own: a module under it holding ``VARIANT``."""
    module = types.ModuleType(f"rmsprop_impls.variants._test_{cls.name}")
    module.VARIANT = cls
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry._MODULES, cls.name, module.__name__.removeprefix("rmsprop_impls."))
    return cls.name


def _one_ulp_up(x: mx.array) -> mx.array:
    """The next representable value away from zero: the bits plus one."""
    bits = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}[x.dtype]
    return (x.view(bits) + 1).view(x.dtype)


class OneUlpOff(EagerOptimizer):
    """Stock's ops, then each new w of ``dtype`` one ulp further from zero: a kernel that rounds up, in one dtype."""

    name = "test_one_ulp_off"
    dtype = mx.float16

    def update_leaves(self, w, g, s, scalars):
        new_w, new_s = super().update_leaves(w, g, s, scalars)
        return [_one_ulp_up(x) if x.dtype == self.dtype else x for x in new_w], new_s


class OneUlpOffPromising(OneUlpOff):
    """The same numbers from a variant that promises stock's bits, as ``cpu_kernel`` does."""

    name = "test_one_ulp_off_promising"

    def __init__(self, learning_rate, *hyper, precision="stock", **named):
        super().__init__(learning_rate, *hyper, **named)


class OneUlpOffInBfloat16(OneUlpOff):
    name = "test_one_ulp_off_in_bfloat16"
    dtype = mx.bfloat16


class LearningRateOnePercentHigh(EagerOptimizer):
    """Drifts: every step 1% too long, in every dtype."""

    name = "test_lr_one_percent_high"

    def update_leaves(self, w, g, s, scalars):
        return super().update_leaves(w, g, s, StepScalars(scalars.lr * 1.01, scalars.values))


class Float32Math(EagerOptimizer):
    """Right, but not stock's rounding: float32 throughout, rounded once, as ``precision="float32"`` does."""

    name = "test_float32_math"

    def update_leaves(self, w, g, s, scalars):
        up = lambda leaves: [x.astype(mx.float32) for x in leaves]  # noqa: E731
        new_w, new_s = super().update_leaves(up(w), up(g), {k: up(x) for k, x in s.items()}, scalars)
        down = lambda new, old: [x.astype(y.dtype) for x, y in zip(new, old)]  # noqa: E731
        return down(new_w, w), {k: down(x, s[k]) for k, x in new_s.items()}


def _large_case_selftest(variants: list[str]) -> selftest.SelftestResult:
    """The ``large`` case alone, 100 steps: stock's float16 and bfloat16 v drift past the agreement tests' bound."""
    (large,) = [c for c in selftest.CASES if c.name == "large"]
    return selftest.run_selftest(variants, speed_tree=None, limits=dict(LIMITS), progress=False, cases=(large,))


def _failing_dtypes(report: selftest.VariantReport) -> set[str]:
    return {c.dtype for c in report.checks if not c.passed}


def test_correct_variants_pass_where_stock_drifts_past_the_agreement_bound(monkeypatch):
    """The failure an AMD EPYC showed (every variant: "v drifts from float64 (0.0101 > 0.01)"), on data that
    show it on any machine: float16 rounds alpha=0.99 to 0.9897 and 1 - alpha to 0.0100021, so stock's v settles
    about 1% of v below float64's, past the old bound of 1e-3*sqrt(100) once |g| is large."""
    extra = [_register(monkeypatch, Float32Math)]
    if "cpu_kernel" in available_variants():  # the real precision="float32" kernel, which promises no bits

        class CpuKernelFloat32(registry.variant_class("cpu_kernel")):
            name = "test_cpu_kernel_float32"

            def __init__(self, learning_rate, *hyper, **named):
                super().__init__(learning_rate, *hyper, precision="float32", **named)

        extra.append(_register(monkeypatch, CpuKernelFloat32))
    result = _large_case_selftest(available_variants() + extra)
    stock = {s["dtype"]: s for s in result.stock}
    for dtype in (mx.float16, mx.bfloat16):  # what the data are for: stock's v is outside the old bound
        row = stock[selftest.dtype_name(dtype)]
        assert row["rel_state_vs_reference"] > tolerance(dtype, selftest.STEPS) and not row["within_tolerance"]
    assert result.passed, [f for v in result.variants for c in v.checks for f in c.failures]
    assert all(v.passed for v in result.variants) and {v.variant for v in result.variants} >= set(extra)
    eager = next(v for v in result.variants if v.variant == "eager")
    assert eager.worst("rel_state_vs_reference", "float16") > tolerance(mx.float16, selftest.STEPS)  # old verdict
    float32_math = next(v for v in result.variants if v.variant == "test_float32_math")
    assert float32_math.worst("differing_vs_stock") > 0 and float32_math.worst("ulps_vs_stock", "float16") > 1
    markdown = markdown_summary(result)
    assert markdown.startswith("## rmsprop-bench selftest (RMSprop): PASSED") and "### Disagreements" not in markdown
    assert "Stock itself is outside the agreement tests' bound" in markdown and "large f16 (w " in markdown


@pytest.mark.parametrize(
    ("variant", "failing", "what"),
    [
        (OneUlpOffPromising, {"float16"}, "differ from stock (by up to "),
        (OneUlpOff, {"float16"}, "w drifts from float64 ("),
        (OneUlpOffInBfloat16, {"bfloat16"}, "ulps from stock, further than float64 is from stock"),
        (LearningRateOnePercentHigh, {"float32"}, "w drifts from float64 ("),
    ],
    ids=["1ulp-f16-promised", "1ulp-f16", "1ulp-bf16", "drifts"],
)
def test_a_planted_wrong_variant_still_fails_where_stock_drifts(monkeypatch, variant, failing, what):
    name = _register(monkeypatch, variant)
    result = _large_case_selftest(["eager", name])
    eager, planted = result.variants
    assert result.passed is False and eager.passed and planted.passed is False
    assert _failing_dtypes(planted) >= failing
    if variant is not LearningRateOnePercentHigh:  # a 1% longer step hides in float16's and bfloat16's rounding
        assert _failing_dtypes(planted) == failing
    dtype = sorted(failing)[0]
    assert f"- {name}: large {dtype}: " in markdown_summary(result)
    assert any(what in f for c in planted.checks if c.dtype == dtype for f in c.failures)


def test_a_stock_exact_promise_fails_on_one_differing_bit(monkeypatch):
    class Promising(EagerOptimizer):
        name = "test_promising"

        def __init__(self, learning_rate, *hyper, precision="stock", **named):
            super().__init__(learning_rate, *hyper, **named)

        def update_leaves(self, w, g, s, scalars):
            new_w, new_s = super().update_leaves(w, g, s, scalars)
            return [x + mx.array(np.finfo(np.float32).eps, dtype=x.dtype) * x for x in new_w], new_s

    class NotPromising(Promising):
        name = "test_not_promising"

        def __init__(self, learning_rate, *hyper, **named):  # no precision: no promise
            super().__init__(learning_rate, *hyper, **named)

    promising, not_promising = _register(monkeypatch, Promising), _register(monkeypatch, NotPromising)
    case = selftest.CASES[0]
    params = selftest._as_mx(case.make_tree(np.random.default_rng(0)), mx.float32)
    grads = selftest._gradients(params, 3, np.random.default_rng(1))
    stock = selftest.stock_run(case, mx.float32, params, grads)
    check = selftest.check_variant(promising, case, mx.float32, params, grads, stock)
    assert 0 < check.ulps_vs_stock < 100 and check.differing_vs_stock > 0  # a few ulps, compounded over 3 steps
    (failure,) = check.failures
    assert failure.startswith("nested float32: ") and "promises bit-identity" in failure
    assert check.ulps_bound is None
    # The same numbers from a variant that promises nothing pass: a few ulps are well within the margin.
    check = selftest.check_variant(not_promising, case, mx.float32, params, grads, stock)
    assert not check.failures and check.ulps_vs_stock <= check.ulps_bound


def test_a_stock_that_gives_nan_fails_no_variant_that_follows_it(monkeypatch):
    """g = 0 in float16: eps=1e-8 rounds to 0 and stock computes 0/0. Its drift cannot be judged against; a
    variant that gives NaN where stock does passes, one that gives numbers there does not."""
    case = selftest.Case("zero", "zero gradients", lambda rng: {"w": rng.normal(size=(5,))}, 1e-2, gradients=(0, 0))
    params = selftest._as_mx(case.make_tree(np.random.default_rng(0)), mx.float16)
    grads = selftest._gradients(params, 2, np.random.default_rng(1), case.gradients)
    stock = selftest.stock_run(case, mx.float16, params, grads)
    assert math.isnan(stock.rel_w_vs_reference) and stock.ulps_vs_reference == math.inf
    assert not selftest.check_variant("eager", case, mx.float16, params, grads, stock).failures
    check = selftest.check_variant(_register(monkeypatch, Float32Math), case, mx.float16, params, grads, stock)
    (failure,) = check.failures
    assert failure.startswith("zero float16: inf ulps from stock")


@pytest.mark.parametrize(
    ("dtype", "step"),
    [(mx.float32, 2.0**-23), (mx.float16, 2.0**-10), (mx.bfloat16, 2.0**-7)],
    ids=["float32", "float16", "bfloat16"],
)
def test_ulps_count_at_the_value_floored_at_one(dtype, step):
    a = mx.array([1.0, 0.0, -0.0, 4.0, float("nan")], dtype=dtype)
    b = mx.array([1.0 + step, 0.0, 0.0, 4.0 + 4 * step, float("nan")], dtype=dtype)
    assert selftest.ulps_apart(a, b) == (1.0, 2)
    tiny = mx.array([1e-3], dtype=dtype)
    assert selftest.ulps_apart(tiny, -tiny)[0] == pytest.approx(2e-3 / step, rel=0.01)  # not the bit distance
    assert selftest.ulps_apart(mx.array([1.0], dtype=dtype), mx.array([float("nan")], dtype=dtype)) == (math.inf, 1)


def test_nan_fails_every_bound():
    assert math.isnan(selftest.max_rel_error([np.array([np.nan, 1.0])], [np.array([1.0, 1.0])]))
    assert selftest.max_rel_error([np.array([2.0])], [np.array([1.0])]) == 0.5


def test_json_has_no_nan_or_infinity():
    assert selftest._finite_json({"a": [math.nan, math.inf, 1.0]}) == {"a": ["nan", "inf", 1.0]}


def test_the_selftest_checks_the_rule_asked_for_and_names_it(tmp_path, stub_limits):
    """AdamW on eager and flat, 8 steps: every state array judged (m and v), the bias correction taken in the
    schedule case, the stock class named."""
    status, result, markdown = _selftest(tmp_path, "--variants", "eager", "flat", "--optimizer", "AdamW")
    assert status == 0 and result["passed"] is True, markdown
    assert result["optimizer"] == "adamw" and result["stock_class"] == "mlx.optimizers.AdamW"
    assert [c["hyper"]["bias_correction"] for c in result["cases"]] == [False, True, False]
    assert markdown.startswith("## rmsprop-bench selftest (AdamW): PASSED")
    assert "Stock AdamW against float64" in markdown
    for v in result["variants"]:
        assert all(v["bit_identical_with_stock"].values()) and v["speed"]["gbps"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "lion"])
def test_a_planted_drift_fails_on_other_rules_too(monkeypatch, optimizer):
    """A 1% longer step in every dtype, on the nested case: caught for rules whose w moves by lr*g (SGD's
    momentum) and by lr*sign (Lion), with the bound measured from the float64 trajectory."""
    name = _register(monkeypatch, LearningRateOnePercentHigh)
    result = selftest.run_selftest(
        ["eager", name], 20, None, dict(LIMITS), False, cases=(selftest.CASES[0],), optimizer=optimizer
    )
    eager, planted = result.variants
    assert eager.passed and planted.passed is False
    assert "float32" in _failing_dtypes(planted)
    assert result.stock[0]["largest_step"] > 0


def test_the_speed_check_judges_a_cpu_step_by_the_roof_timed_beside_it():
    """A roof kept from another moment (planted: 10,000 GB/s, faster than any memory) is not a CPU step's limit:
    the kernel it names is timed round-robin with the step's 5 calls, and the step is a fraction of that."""
    planted = Roof("cpu", (1 << 20, 1 << 30), (1e4, 1e4), ("numpy triad", "numpy triad"), 1 << 20)
    speed = selftest.speed_check("cpu_stream", {"cpu": planted, "gpu": None}, "4x1M")  # on the CPU everywhere
    assert 0.02 < speed["fraction_of_limit"] < 5  # of the planted roof it would be under 0.01
    assert speed["fraction_of_limit"] > 10 * speed["gbps"] / 1e4
