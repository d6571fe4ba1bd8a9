"""The peers compute each rule as stock does, and ``rmsprop-bench compare --peers`` puts them in the table with a
ratio line."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cli import cli

from rmsprop_impls import reference_step
from rmsprop_impls.cli.compare import _ratio_line
from rmsprop_impls.measure import peers
from rmsprop_impls.measure.compare import VariantResult, time_candidates
from rmsprop_impls.measure.timing import StepTiming
from rmsprop_impls.measure.trees import random_like, synthetic_tree
from rmsprop_impls.reference import tolerance
from rmsprop_impls.rules import RULE_NAMES, rule

#: Far from the defaults, so that a peer that drops one, swaps alpha for 1-alpha or puts eps inside the sqrt
#: lands outside the tolerance (the last is checked below).
LR, ALPHA, EPS = 0.05, 0.8, 0.1
STEPS = 5


def _tree(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=shape).astype(np.float32) for shape in [(1,), (7,), (10, 100)]]
    return w, [rng.normal(size=x.shape).astype(np.float32) for x in w]


def _expected(w: list[np.ndarray], g: list[np.ndarray], eps_in_sqrt: bool = False) -> list[np.ndarray]:
    state = [(x.astype(np.float64), np.zeros(x.shape)) for x in w]
    for _ in range(STEPS):
        if eps_in_sqrt:
            state = [(we, ALPHA * ve + (1 - ALPHA) * gi * gi) for (we, ve), gi in zip(state, g)]
            state = [(we - LR * gi / np.sqrt(ve + EPS), ve) for (we, ve), gi in zip(state, g)]
        else:
            state = [reference_step(we, gi, ve, LR, ALPHA, EPS) for (we, ve), gi in zip(state, g)]
    return [we for we, _ in state]


def _tol() -> float:
    return tolerance(mx.float32, STEPS, largest_step=LR / np.sqrt(1 - ALPHA))


@pytest.mark.parametrize("peer", peers.PEERS)
def test_each_peer_matches_the_float64_reference(peer):
    reason = peers.peer_unavailable_reason(peer)
    if reason is not None:
        pytest.skip(reason)
    w, g = _tree()
    before = [x.copy() for x in w]
    step = peers.build_peer(peer, w, g, lr=LR, alpha=ALPHA, eps=EPS)
    for _ in range(STEPS):
        step.step()
    got = step.parameters()
    for wi, bi in zip(w, before):
        np.testing.assert_array_equal(wi, bi)  # the caller's arrays are the starting point, not the peer's
    for gi, ei, bi in zip(got, _expected(w, g), before):
        assert gi.shape == bi.shape and gi.dtype == np.float32
        assert np.abs(gi - bi).max() > 10 * _tol()  # it moved
        np.testing.assert_allclose(gi, ei, rtol=_tol(), atol=_tol())


def _stock_trajectory(optimizer: str, hyper: dict, w: list[np.ndarray], g: list[np.ndarray], lr: float):
    """Stock MLX's parameters after STEPS steps of ``optimizer`` on the same gradient, in float32."""
    stock = rule(optimizer).stock(lr, **hyper)
    params, grads = ({f"p{i}": mx.array(x) for i, x in enumerate(xs)} for xs in (w, g))
    for _ in range(STEPS):
        params = stock.apply_gradients(grads, params)
        mx.eval(params)
    return [np.array(params[f"p{i}"]) for i in range(len(w))]


@pytest.mark.parametrize("optimizer", RULE_NAMES)
def test_the_numpy_peer_is_stock_bit_for_bit_in_every_configuration(optimizer):
    """It runs the rule's own trace in float32, op for op as stock rounds: the same bits, with no copy of any rule."""
    w, g = _tree()
    for hyper in rule(optimizer).configurations():
        step = peers.build_peer("numpy", w, g, LR, optimizer, **hyper)
        for _ in range(STEPS):
            step.step()
        assert step.differs is None
        for got, want in zip(step.parameters(), _stock_trajectory(optimizer, hyper, w, g, LR)):
            np.testing.assert_array_equal(got, want, err_msg=f"{optimizer} {hyper}")


@pytest.mark.parametrize("peer", peers.PEERS[1:])
@pytest.mark.parametrize("optimizer", RULE_NAMES)
def test_torch_and_optax_agree_with_stock_within_float32_rounding(optimizer, peer):
    """Each rule's last configuration (its branches: Nesterov momentum with weight decay, bias correction), where
    the library has the rule and its math is stock's; where its math differs, it says so."""
    hyper = rule(optimizer).configurations()[-1]
    reason = peers.peer_unavailable_reason(peer, optimizer=optimizer, hyper=hyper)
    if reason is not None:
        pytest.skip(reason)
    w, g = _tree()
    step = peers.build_peer(peer, w, g, LR, optimizer, **hyper)
    for _ in range(STEPS):
        step.step()
    if step.differs is not None:
        assert optimizer == "adamax" and "eps inside the max" in step.differs
        return
    stock = _stock_trajectory(optimizer, hyper, w, g, LR)
    tol = tolerance(mx.float32, STEPS, max(float(np.abs(s - x).max()) for s, x in zip(stock, w)))
    for got, want, start in zip(step.parameters(), stock, w):
        assert np.abs(want - start).max() > 10 * tol  # it moved
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{peer} {optimizer}")


def test_where_the_math_differs_the_peer_says_how():
    assert "bias-corrected" in peers.torch_rule("adam", rule("adam").defaults, 1e-3).differs
    assert peers.optax_rule("adamw", {**rule("adamw").defaults, "bias_correction": True}, 1e-3).differs is None
    dampened = {**rule("sgd").defaults, "momentum": 0.9, "dampening": 0.1}
    assert "(1-dampening)*g" in peers.torch_rule("sgd", dampened, 1e-3).differs
    with pytest.raises(NotImplementedError, match="optax's SGD has no dampening"):
        peers.optax_rule("sgd", dampened, 1e-3)
    with pytest.raises(NotImplementedError, match="torch.optim has no Lion"):
        peers.torch_rule("lion", rule("lion").defaults, 1e-3)


def test_the_tolerance_tells_eps_inside_the_sqrt_apart():
    w, g = _tree()
    wrong, right = _expected(w, g, eps_in_sqrt=True), _expected(w, g)
    assert max(np.abs(a - b).max() for a, b in zip(wrong, right)) > 100 * _tol()


def test_what_cannot_run_says_why(monkeypatch):
    assert peers.peer_unavailable_reason("numpy") is None  # a dependency of the package: it always runs
    assert peers.peer_unavailable_reason("numpy", "bfloat16") == peers.NO_BFLOAT16
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        peers.peer_unavailable_reason("nope")
    monkeypatch.setattr(peers, "peer_installed", lambda peer: True)
    assert peers.peer_unavailable_reason("optax", n_leaves=peers.OPTAX_MAX_LEAVES) is None
    assert "optax runs up to 4,096" in peers.peer_unavailable_reason("optax", n_leaves=peers.OPTAX_MAX_LEAVES + 1)
    monkeypatch.undo()
    if peers.peer_installed("torch-foreach"):
        assert peers.peer_unavailable_reason("torch-foreach", optimizer="lion") == "torch.optim has no Lion"
        assert "no fused CPU kernel" in peers.peer_unavailable_reason("torch-fused", optimizer="rmsprop")
    for peer in peers.PEERS[1:]:  # as if the [peers] extra were not installed
        monkeypatch.setitem(peers.PEER_PACKAGES, peer, ("a_package_that_is_not_installed",))
    assert peers.installed_peers() == ["numpy"]
    assert peers.peer_availability() == {
        "numpy": None,
        **{p: f"{p} needs the [peers] extra (pip install 'rmsprop-bench[peers]')" for p in peers.PEERS[1:]},
    }
    with pytest.raises(NotImplementedError, match="needs the"):
        peers.build_peer("torch-foreach", *_tree())


def test_peer_candidates_time_on_the_mlx_tree_and_say_why_they_cannot():
    params = synthetic_tree(3, 64)
    grads = random_like(params)
    (numpy_result,), _ = time_candidates(peers.peer_candidates(params, grads, ["numpy"]), params, 2, progress=False)
    (bfloat16,) = peers.peer_candidates(synthetic_tree(3, 64, mx.bfloat16), grads, ["numpy"])
    assert numpy_result.variant == "numpy" and numpy_result.device == "cpu" and numpy_result.reason is None
    assert len(numpy_result.timing.samples) == 2 and numpy_result.gbps > 0
    assert bfloat16.build is None and bfloat16.reason == peers.NO_BFLOAT16


def _result(name: str, median_ms: float | None) -> VariantResult:
    timing = None if median_ms is None else StepTiming(first_s=1.0, samples=[median_ms / 1e3])
    return VariantResult(name, timing, None if timing else "cannot run", device="cpu")


def test_the_ratio_line_names_the_fastest_and_cpu_kernel():
    variants = [_result("compiled", 1.0), _result("cpu_kernel", 2.0), _result("eager", 4.0)]
    ran_peers = [_result("numpy", 3.0), _result("torch-foreach", None), _result("optax", 1.5)]
    assert _ratio_line("16x1M", variants, ran_peers) == (
        "16x1M: compiled 3.00x numpy in place, 1.50x optax jit; cpu_kernel 1.50x numpy in place, 0.75x optax jit"
    )
    assert _ratio_line("1x1K", variants[1:], ran_peers[:1]) == "1x1K: cpu_kernel 1.50x numpy in place"
    assert _ratio_line("1x1K", variants, ran_peers[1:2]) == "1x1K: no peer ran"


def test_compare_with_the_numpy_peer_prints_its_row_and_the_ratio():
    out = cli("compare", "--tree", "4x1K", "--peers", "numpy", "--repeats", "2")
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("\n\n")[1].splitlines()
    rows = [row.split() for row in table[2:]]
    assert rows[-1][:4] == ["4x1K", "numpy", "(peer)", "cpu"] and rows[-1][4].replace(".", "").isdigit()
    assert all("(peer)" not in " ".join(row) for row in rows[:-1])  # the MLX variants first
    lines = out.stdout.split("vs peers (")[1].splitlines()
    assert len(lines) == 2 and lines[1].startswith("  4x1K: ") and lines[1].endswith("x numpy in place")


def test_a_bad_peer_name_is_one_line():
    out = cli("compare", "--tree", "4x1K", "--peers", "numpy", "nope")
    assert out.returncode == 2 and "argument --peers: invalid choice: 'nope'" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_peers_alone_takes_the_installed_ones_and_names_the_others(monkeypatch, capsys):
    from rmsprop_impls.cli import compare, main

    for peer in peers.PEERS[1:]:  # as if the [peers] extra were not installed
        monkeypatch.setitem(peers.PEER_PACKAGES, peer, ("a_package_that_is_not_installed",))
    monkeypatch.setattr(compare, "measure_limits", lambda: {"cpu": 10.0, "gpu": None})
    assert main(["compare", "--tree", "4x1K", "--variants", "compiled", "--peers", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("4x1K  ")] == ["compiled", "numpy"]
    assert out.rstrip().endswith(
        "  not installed: torch-foreach, torch-fused, torch-per-tensor, optax: needs the [peers] extra "
        "(pip install 'rmsprop-bench[peers]')"
    )


def test_compare_runs_the_rule_asked_for_on_the_variants_and_the_peers(monkeypatch, capsys):
    from rmsprop_impls.cli import compare, main

    monkeypatch.setattr(compare, "measure_limits", lambda: {"cpu": 10.0, "gpu": None})
    args = ["compare", "--optimizer", "AdamW", "--hyper", "weight_decay=0.1", "--tree", "4x1K", "--repeats", "1"]
    assert main([*args, "--variants", "eager", "--peers", "numpy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("AdamW (betas=[0.9, 0.999], eps=1e-08, weight_decay=0.1, bias_correction=False), lr 1e-3;")
    rows = [line.split() for line in out.splitlines() if line.startswith("4x1K  ")]
    assert [row[1] for row in rows] == ["eager", "numpy"]
    # 28 bytes per float32 parameter (w, g, m, v read; w, m, v written): 4,096 of them in the median step
    eager = rows[0]
    assert float(eager[6]) == pytest.approx(28 * 4096 / float(eager[3]) / 1e6, rel=0.05, abs=0.006)
