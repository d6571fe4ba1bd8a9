"""The training-step suite (``benchmarks/bench_train.py``) read back: per model, step kind, rule and variant,
the whole step, the update alone, its share of the step, the gain over stock and the peak memory."""

from __future__ import annotations

import pandas as pd

from .results import case_params, latest
from .tables import markdown_table

TRAIN_STEP = "bench_train.TrainStep.time_step"
UPDATE_ALONE = "bench_train.UpdateAlone.track_seconds"
PEAK_MEMORY = "bench_train.TrainStep.track_peak_memory"
GRADIENT_STEP = "bench_train.GradientStep.time_step"
KEYS = ["model", "step", "rule", "variant"]


def _measured(df: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """The benchmark's medians with their cases' parameters; no rows (with the columns) where it did not run,
    as in a run restricted to some benchmarks."""
    rows = df[(df["benchmark"] == benchmark) & df["available"]]
    if rows.empty:
        return pd.DataFrame(columns=["median", *KEYS])
    params = pd.DataFrame([case_params(c) for c in rows["case"]], index=rows.index)
    return pd.concat([rows[["variant", "median"]], params], axis=1)


def training_steps(df: pd.DataFrame) -> pd.DataFrame:
    """The newest run's training steps: one row per model, step kind, rule and variant that ran.

    ``in_step`` is the step less the forward and backward pass alone in the same step kind, ``share`` that
    over the step, ``speedup`` stock's step (same model, kind and rule) over this one; times in seconds.
    """
    newest = latest(df[df["benchmark"].str.startswith("bench_train.")])
    columns = [*KEYS, "step_s", "alone_s", "peak_bytes", "in_step_s", "share", "speedup"]
    steps = _measured(newest, TRAIN_STEP)
    if steps.empty:
        return pd.DataFrame(columns=columns)
    table = steps.rename(columns={"median": "step_s"}).set_index(KEYS)
    table["peak_bytes"] = _measured(newest, PEAK_MEMORY).set_index(KEYS)["median"]
    table = table.reset_index()
    alone = _measured(newest, UPDATE_ALONE).set_index(["model", "rule", "variant"])["median"].rename("alone_s")
    table = table.join(alone, on=["model", "rule", "variant"])
    grad = _measured(newest, GRADIENT_STEP)
    if not grad.empty:
        grad = grad.set_index(["model", "step"])["median"].rename("grad_s")
        table = table.join(grad, on=["model", "step"])
        table["in_step_s"] = table["step_s"] - table["grad_s"]
    else:
        table["in_step_s"] = float("nan")
    table["share"] = table["in_step_s"] / table["step_s"]
    stock = table[table["variant"] == "stock"].set_index(["model", "step", "rule"])["step_s"].rename("stock_s")
    table = table.join(stock, on=["model", "step", "rule"])
    table["speedup"] = table["stock_s"] / table["step_s"]
    return table[columns].sort_values(KEYS, ignore_index=True)


def _text(value: float, fmt: str, scale: float = 1.0) -> str | None:
    return None if pd.isna(value) else format(value * scale, fmt)


def training_section(df: pd.DataFrame) -> str | None:
    """The report's section for the training-step suite, beside the optimizer-step one; ``None`` where it did
    not run."""
    table = training_steps(df)
    if table.empty:
        return None
    rows = [
        [r.model, r.step, r.rule, r.variant, _text(r.step_s, ".2f", 1e3), _text(r.alone_s, ".2f", 1e3),
         _text(r.in_step_s, ".2f", 1e3), _text(r.share, ".0f", 100), _text(r.speedup, ".2f"),
         _text(r.peak_bytes, ".1f", 2**-20)]
        for r in table.itertuples()
    ]  # fmt: skip
    headers = ["model", "step", "rule", "variant", "step ms", "update alone ms", "in step ms", "% of step",
               "x stock", "peak MiB"]  # fmt: skip
    return (
        "## Per training step\n\nWhole training steps (forward, backward, update; `bench_train`), compiled as "
        "mlx-lm's trainer compiles them or not. *In step* is the step less the forward and backward pass alone; "
        "*x stock* is stock's step over this one, for the same model, step and rule.\n\n"
        + markdown_table(headers, rows)
    )
