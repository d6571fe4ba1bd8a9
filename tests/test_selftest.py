"""``rmsprop-bench selftest`` runs every variant for real, writes what a bug report needs, fails on a disagreement."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from rmsprop_impls import available_variants, variant_names
from rmsprop_impls.cli import main
from rmsprop_impls.measure import selftest
from rmsprop_impls.variants.eager import EagerRMSprop

#: A small run: the same trees and dtypes, fewer steps, a tiny speed tree, a stubbed limit (the triad has its tests).
SMALL = ["--steps", "8", "--speed-tree", "2x1K"]
LIMITS = {"cpu": 10.0, "gpu": None}


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
            (case.name, dtype) for case in selftest.CASES for dtype in ("float32", "float16", "bfloat16")
        }
        assert set(v["max_ulps_vs_stock"]) == set(v["bit_identical_with_stock"]) == {"float32", "float16", "bfloat16"}
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
    assert result["limits"]["gpu"] == "n/a (no GPU)" and all(s["passed"] for s in result["stock_vs_reference"])
    assert markdown.startswith("## rmsprop-bench selftest: PASSED")
    for needed in ("| platform |", "| CPU |", "| GPU | none |", f"| MLX | {mx.__version__}", "gpu limit n/a (no GPU)"):
        assert needed in markdown
    assert "### Disagreements" not in markdown
    assert capsys.readouterr().out.startswith(markdown)


def test_a_variant_that_disagrees_fails_the_selftest_with_exit_status_1(tmp_path, stub_limits, monkeypatch):
    def off_by_a_little(self, w, g, v, lr):
        new_w, new_v = EagerRMSprop.update_leaves(self, w, g, v, lr)
        return [x * 1.01 for x in new_w], new_v

    from rmsprop_impls.variants.flat import FlatRMSprop

    monkeypatch.setattr(FlatRMSprop, "update_buffers", _unpack(off_by_a_little))
    status, result, markdown = _selftest(tmp_path, "--variants", "eager", "flat")
    assert status == 1 and result["passed"] is False
    eager, flat = result["variants"]
    assert eager["passed"] is True and flat["passed"] is False
    assert all("drifts from float64" in f or "disagrees with stock" in f for c in flat["checks"] for f in c["failures"])
    assert markdown.startswith("## rmsprop-bench selftest: FAILED")
    assert (
        "| flat | cpu | **FAIL** |" in markdown
        and "### Disagreements" in markdown
        and "- flat: nested float32: w" in markdown
    )


def _unpack(update_leaves):
    """``update_buffers`` takes one buffer per dtype; run the leaf function on it as a one-leaf list."""

    def update_buffers(self, w, g, v, lr):
        (new_w,), (new_v,) = update_leaves(self, [w], [g], [v], lr)
        return new_w, new_v

    return update_buffers


def test_a_crash_is_a_failure_with_its_message(tmp_path, stub_limits, monkeypatch):
    def crash(self, w, g, v, lr):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(EagerRMSprop, "update_leaves", crash)
    status, result, markdown = _selftest(tmp_path, "--variants", "eager")
    assert status == 1 and "RuntimeError: kernel exploded" in result["variants"][0]["error"]
    assert "- eager: nested float32: RuntimeError: kernel exploded" in markdown


def test_a_stock_exact_promise_fails_on_one_differing_bit(monkeypatch):
    class Promising(EagerRMSprop):
        def __init__(self, learning_rate, alpha=0.99, eps=1e-8, precision="stock"):
            super().__init__(learning_rate, alpha, eps)

        def update_leaves(self, w, g, v, lr):
            new_w, new_v = super().update_leaves(w, g, v, lr)
            return [x + mx.array(np.finfo(np.float32).eps, dtype=x.dtype) * x for x in new_w], new_v

    from rmsprop_impls import registry

    monkeypatch.setattr(registry, "variant_class", lambda name: Promising)
    monkeypatch.setattr(selftest, "variant_class", lambda name: Promising)
    case = selftest.CASES[0]
    params = selftest._as_mx(case.make_tree(np.random.default_rng(0)), mx.float32)
    grads = selftest._gradients(params, 3, np.random.default_rng(1))
    stock = selftest._run(selftest.optim.RMSprop(case.learning_rate), params, grads)
    reference = selftest._reference(params, grads, case)
    check = selftest.check_variant("cpu_kernel", case, mx.float32, params, grads, stock, reference)
    assert 0 < check.ulps_vs_stock < 100 and check.differing_vs_stock > 0  # a few ulps, compounded over 3 steps
    (failure,) = check.failures
    assert "promises bit-identity" in failure
    # The same numbers from a variant that promises nothing pass: a few ulps are well within the tolerance.
    assert not selftest.check_variant("eager", case, mx.float32, params, grads, stock, reference).failures


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
