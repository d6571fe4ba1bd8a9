"""A second real asv history for the analysis tests: more trees, an unavailable variant, a bandwidth limit.

The shared ``asv_history`` fixture times two variants on one tree; the plots
need more to show: trees of the same total size with different leaf counts
(per-leaf overhead), a bigger one (scaling), a variant asv skips because it
cannot run here, and the bandwidth limit, measured by a small triad
benchmark added to the throw-away copy only (for the last commit).
"""

from __future__ import annotations

from pathlib import Path

from asv_project import AsvHistory, build_history

#: 4x1K and 16x256 hold 4096 parameters each; 4x16K is 16 times bigger. metal_kernel needs a Metal GPU.
VARIANTS = "eager,flat,metal_kernel"
TREES = "4x1K,16x256,4x16K"

SMALL_TRIAD = """
from rmsprop_impls.measure.bandwidth import measure_bandwidth


class Bandwidth:
    def track_triad_gbps(self):
        return measure_bandwidth(n_elements=1 << 22, repeats=3)

    track_triad_gbps.unit = "GB/s"
"""

_built: dict[str, AsvHistory] = {}


def analysis_history(workdir: Path) -> AsvHistory:
    """Built once per test session (``workdir`` from the first caller), shared by every module that asks."""
    if "history" not in _built:
        history = build_history(workdir, variants=VARIANTS, trees=TREES, commits_each_side=1)
        bench = history.repo / "benchmarks" / "bench_bandwidth.py"
        if not bench.exists():
            bench.write_text(SMALL_TRIAD)
        history.asv(
            *("run", "--quick", "-E", f"existing:{history.python}", "--set-commit-hash", history.commits[-1]),
            *("--machine", "test-machine", "--bench", "bench_bandwidth"),
        )
        _built["history"] = history
    return _built["history"]
