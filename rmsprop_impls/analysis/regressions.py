"""Regressions over commits, found the way ``asv publish`` finds them.

asv's step detection (``asv.step_detect``) fits piecewise-constant levels to
each benchmark's per-commit series and reports upward steps that are still
there at the newest commit. Running it on the DataFrame, rather than reading
the ``regressions.json`` that ``asv publish`` writes, lets the notebooks and
the report find regressions without publishing first.
"""

from __future__ import annotations

import pandas as pd
from asv.step_detect import detect_regressions, detect_steps
from pandas.api.typing import DataFrameGroupBy

from .results import MLX_RELEASE_BENCHMARK
from .tracking import release_order

#: asv's default relative threshold for reporting a regression (``regressions_thresholds``).
DEFAULT_THRESHOLD = 0.05

#: Benchmarks where a rise is good news, so an upward step is no regression.
_HIGHER_IS_BETTER = ("gbps", "fraction_of_limit")
#: Benchmarks that record what ran, not how fast: a newer MLX release is no regression.
_NOT_A_MEASURE = (MLX_RELEASE_BENCHMARK,)

SERIES = ["machine", "environment", "benchmark", "variant", "tree", "dtype", "optimizer", "case"]


def commit_series(df: pd.DataFrame) -> DataFrameGroupBy:
    """Measured rows grouped into one series per machine, environment, benchmark and parameters."""
    measured = df[df["available"]].sort_values("commit_date")
    return measured.groupby(SERIES, dropna=False, sort=True)


def find_regressions(df: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """One row per regression: the first slow ``commit``, the ``previous`` good one, and the medians."""
    found = []
    for key, series in commit_series(df):
        if series["benchmark"].iloc[0].endswith(_HIGHER_IS_BETTER) or series["benchmark"].iloc[0] in _NOT_A_MEASURE:
            continue  # asv's detector assumes lower is better
        commits, medians = series["commit"].tolist(), series["median"].tolist()
        _, _, jumps = detect_regressions(detect_steps(medians), threshold)
        for good, slow, before, after in jumps or []:
            found.append(
                {
                    **dict(zip(SERIES, key)),
                    "commit": commits[slow],
                    "previous": commits[good],
                    "commit_date": series["commit_date"].iloc[slow],
                    "before": before,
                    "after": after,
                    "ratio": after / before,
                }
            )
    return pd.DataFrame(found, columns=[*SERIES, "commit", "previous", "commit_date", "before", "after", "ratio"])


def find_release_regressions(df: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Regressions from one MLX release to the next, found as between commits: one row per slower release.

    Each series is one machine, commit and benchmark parameters, ordered by
    release instead of by commit date; ``mlx`` is the first slow release and
    ``previous`` the last good one.
    """
    measured = df[df["available"]].dropna(subset=["mlx"])
    keys = ["machine", "commit", "benchmark", "variant", "tree", "dtype", "optimizer", "case"]
    found = []
    for key, series in measured.groupby(keys, dropna=False, sort=True):
        benchmark = series["benchmark"].iloc[0]
        if benchmark.endswith(_HIGHER_IS_BETTER) or benchmark in _NOT_A_MEASURE or series["mlx"].nunique() < 2:
            continue
        per_release = series.groupby("mlx")["median"].median().reindex(release_order(series["mlx"]))
        releases, medians = per_release.index.tolist(), per_release.tolist()
        _, _, jumps = detect_regressions(detect_steps(medians), threshold)
        for good, slow, before, after in jumps or []:
            found.append(
                {**dict(zip(keys, key)), "mlx": releases[slow], "previous": releases[good], "before": before,
                 "after": after, "ratio": after / before}
            )  # fmt: skip
    return pd.DataFrame(found, columns=[*keys, "mlx", "previous", "before", "after", "ratio"])
