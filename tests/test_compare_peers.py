"""The peers compute RMSprop, and ``rmsprop-bench compare --peers`` puts them in the table with a ratio line."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cli import cli

from rmsprop_impls import reference_step
from rmsprop_impls.cli.compare import _ratio_line
from rmsprop_impls.measure import peers
from rmsprop_impls.measure.compare import VariantResult
from rmsprop_impls.measure.timing import StepTiming
from rmsprop_impls.measure.trees import random_like, synthetic_tree
from rmsprop_impls.reference import tolerance

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
    for peer in peers.PEERS[1:]:  # as if the [peers] extra were not installed
        monkeypatch.setitem(peers.PEER_PACKAGES, peer, ("a_package_that_is_not_installed",))
    assert peers.installed_peers() == ["numpy"]
    assert peers.peer_availability() == {
        "numpy": None,
        **{p: f"{p} needs the [peers] extra (pip install 'rmsprop-bench[peers]')" for p in peers.PEERS[1:]},
    }
    with pytest.raises(NotImplementedError, match="needs the"):
        peers.build_peer("torch-foreach", *_tree())


def test_compare_peers_times_them_on_the_mlx_tree():
    params = synthetic_tree(3, 64)
    grads = random_like(params)
    numpy_result, bfloat16_result = (
        peers.compare_peers(params, grads, ["numpy"], repeats=2, progress=False)[0],
        peers.compare_peers(synthetic_tree(3, 64, mx.bfloat16), grads, ["numpy"], repeats=2, progress=False)[0],
    )
    assert numpy_result.variant == "numpy" and numpy_result.device == "cpu" and numpy_result.reason is None
    assert len(numpy_result.timing.samples) == 2 and numpy_result.gbps > 0
    assert bfloat16_result.timing is None and bfloat16_result.reason == peers.NO_BFLOAT16


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
        "  not installed: torch-foreach, torch-per-tensor, optax: needs the [peers] extra "
        "(pip install 'rmsprop-bench[peers]')"
    )
