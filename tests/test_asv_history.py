"""The throw-away asv history that the asv, results and dashboard tests share is real."""

from __future__ import annotations

import json


def test_history_has_real_results_for_every_commit(asv_history):
    runs = [json.loads(p.read_text()) for p in (asv_history.results_dir / "test-machine").glob("*-existing-*.json")]
    assert sorted(r["commit_hash"] for r in runs) == sorted(asv_history.commits)
    for run in runs:
        timings = run["results"]["bench_step.Step.time_step"][0]
        slowed = asv_history.commits.index(run["commit_hash"]) >= asv_history.commits.index(asv_history.slowed)
        eager, flat = timings  # params are (variant, tree, dtype, optimizer) = (eager|flat, 4x1K, float32, rmsprop)
        assert (eager > 0.02) == slowed and flat < 0.02
