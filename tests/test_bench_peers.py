"""The numpy peer, the one update the peers suite writes itself, computes RMSprop."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rmsprop_impls import reference_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside tests/

from benchmarks.bench_peers import ALPHA, EPS, LR, numpy_step  # noqa: E402


def test_numpy_peer_matches_the_reference_over_steps():
    rng = np.random.default_rng(0)
    w = [rng.normal(size=n).astype(np.float32) for n in (1, 7, 1000)]
    g = [rng.normal(size=x.size).astype(np.float32) for x in w]
    v = [np.zeros_like(x) for x in w]
    expected = [(x.astype(np.float64), np.zeros(x.size)) for x in w]
    for _ in range(5):
        numpy_step(w, g, v, [np.empty_like(x) for x in w])
        expected = [reference_step(we, gi, ve, LR, ALPHA, EPS) for (we, ve), gi in zip(expected, g)]
    for wi, vi, (we, ve) in zip(w, v, expected):
        np.testing.assert_allclose(wi, we, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vi, ve, rtol=1e-5, atol=1e-8)
