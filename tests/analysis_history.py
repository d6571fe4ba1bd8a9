"""A second real asv history for the analysis tests: more trees, an unavailable variant, a bandwidth limit.

The shared ``asv_history`` fixture times two variants on one tree; the plots
need more to show: trees of the same total size with different leaf counts
(per-leaf overhead), a bigger one (scaling), a variant asv skips because it
cannot run here, two optimizer rules (RMSprop and AdamW), and the bandwidth limit, measured by a small triad
benchmark added to the throw-away copy only (for the last commit).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from asv_project import AsvHistory, build_history
from built_once import built_once

from rmsprop_impls import availability

#: MLX has one GPU back-end per build, Metal or CUDA, so one of these two kernels cannot run wherever the tests do.
GPU_KERNELS = ["metal_kernel", "cuda_kernel"]


def unavailable_variant() -> str:
    """The variant asv will skip here: ``metal_kernel`` on Linux, ``cuda_kernel`` on a Mac."""
    reasons = availability()
    unavailable = [v for v in GPU_KERNELS if reasons.get(v) is not None]
    assert unavailable, f"both {' and '.join(GPU_KERNELS)} run here, so no registered variant is unavailable"
    return unavailable[0]


#: The variant the analysis tests expect to see skipped.
UNAVAILABLE = unavailable_variant()
#: 4x1K and 16x256 hold 4096 parameters each; 4x16K is 16 times bigger.
VARIANTS = f"eager,flat,{UNAVAILABLE}"
TREES = "4x1K,16x256,4x16K"
OPTIMIZERS = "rmsprop,adamw"


def analysis_history(tmp_path_factory: pytest.TempPathFactory) -> AsvHistory:
    """Built once per test session (``built_once``), shared by every module and worker that asks."""
    return built_once(tmp_path_factory, "analysis-history", _build)


def _build(workdir: Path) -> AsvHistory:
    history = build_history(workdir, variants=VARIANTS, trees=TREES, commits_each_side=1, optimizers=OPTIMIZERS)
    history.asv(
        *("run", "--quick", "-E", f"existing:{history.python}", "--set-commit-hash", history.commits[-1]),
        *("--machine", "test-machine", "--bench", "bench_bandwidth"),
    )
    return history
