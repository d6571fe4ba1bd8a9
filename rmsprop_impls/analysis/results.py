"""asv results as one tidy table: a row per measurement, ready for plots and reports.

The files are parsed by asv's own ``asv.results.Results`` (results are stored
column-wise under ``result_columns``), so the format is read exactly as asv
writes it. asv stores a benchmark that raised ``NotImplementedError`` in
``setup`` (our unavailable variants) as NaN and a failed one as null: both
become rows with ``available`` False and a ``skip_reason``, so plots can show
them instead of dropping them.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from asv.results import Results
from asv.util import UserError as AsvUserError

from ..measure.roof import Roof, working_set
from ..measure.trees import tree_info
from ..registry import VariantUnavailableError, variant_class
from ..rules import rule

#: The benchmarks whose results are the CPU's and the GPU's bandwidth limits (GB/s), and the main time benchmark.
LIMIT_BENCHMARK = "bench_bandwidth.Bandwidth.track_triad_gbps"
GPU_LIMIT_BENCHMARK = "bench_bandwidth.GpuBandwidth.track_triad_gbps"
LIMIT_BENCHMARKS = {"cpu": LIMIT_BENCHMARK, "gpu": GPU_LIMIT_BENCHMARK}
#: Each device's roof, per point of the sweep: its GB/s and its working set in bytes; and the CPU's last-level cache.
ROOF_BENCHMARKS = {"cpu": "bench_bandwidth.Roof", "gpu": "bench_bandwidth.GpuRoof"}
LLC_BENCHMARK = "bench_bandwidth.Bandwidth.track_last_level_cache_bytes"
STEP_BENCHMARK = "bench_step.Step.time_step"
#: A step's fraction of its device's roof, on the CPU against the roof's kernels timed beside it.
FRACTION_BENCHMARK = "bench_step.Step.track_fraction_of_limit"
#: The MLX release a run imported, as major*10000 + minor*100 + patch (``benchmarks/bench_environment.py``).
MLX_RELEASE_BENCHMARK = "bench_environment.Environment.track_mlx_release"

#: Bytes per element of each dtype name the suites use.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

#: asv parameter names that mean "which implementation": a variant of ours or a peer library.
_VARIANT_PARAMS = ("variant", "peer")
#: The parameters with columns of their own; any other (a training step's model, step kind, rule) goes in ``case``.
_COLUMN_PARAMS = (*_VARIANT_PARAMS, "tree", "dtype", "optimizer")
#: The rule every step ran before the ``optimizer`` parameter, and the one the peer libraries run.
_RULE_BEFORE_RULES = "rmsprop"
_DEFAULT_PARAM_NAMES = ["variant", "tree", "dtype"]
_SKIPPED = (
    "skipped by asv: setup raised NotImplementedError (the variant cannot run there, or the default subset "
    "leaves that optimizer and tree out)"
)
_FAILED = "failed: asv recorded no value (see the asv run log)"

COLUMNS = [
    "machine",
    "commit",
    "commit_date",
    "environment",
    "mlx",
    "started_at",
    "benchmark",
    "unit",
    "variant",
    "device",
    "tree",
    "n_leaves",
    "n_params",
    "dtype",
    "optimizer",
    "case",
    "median",
    "ci_low",
    "ci_high",
    "q25",
    "q75",
    "iqr",
    "n_samples",
    "gbps",
    "fraction_of_limit",
    "of_llc",
    "available",
    "skip_reason",
]


class ResultsError(Exception):
    """The results directory cannot give a table; the message is one line that names the path."""


def load_asv_results(results_dir: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Every measurement under ``results_dir`` (asv's ``results_dir``) as a tidy DataFrame.

    ``results_dir`` may also be several directories (one per machine, or CI artifacts), or one directory
    holding several results directories: see :func:`results_dirs`. Each run's ``machine`` and ``mlx``
    (the MLX release of its asv environment, from asv.conf.json's matrix) are columns.

    ``optimizer`` is the rule a step ran (asv's ``optimizer`` parameter, the training suite's ``rule``); results from
    before the rules, and the peer libraries' steps, ran RMSprop. A benchmark's parameters other than variant (or
    peer), tree, dtype and optimizer are in ``case``
    (:func:`case_params` reads them back), so each of its series stays apart.

    Columns are ``COLUMNS`` plus ``limit_gbps``, the roof of the row's ``device`` measured in the same run at the
    row's working set (the arrays its rule touches: RMSprop's w, g and v of its tree and dtype; beyond the caches
    for rows of no tree; NaN where the run has none), and ``cache_resident``, whether that working set fits in the
    run's last-level cache.

    ``device`` is where the row ran, ``"cpu"`` or ``"gpu"``: a variant's
    declared device, with MLX's default device read as the GPU where the run measured a GPU limit (MLX picks the
    GPU whenever it has one); the peer libraries run on the CPU. Times are in seconds, as asv stores them.

    Unreadable result files are skipped with a warning and listed in
    ``df.attrs["skipped_files"]`` as ``(path, reason)``; the rest still load.
    """
    roots = results_dirs(results_dir)
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for root in roots:
        benchmarks = _benchmark_descriptions(root)
        for path in sorted(root.glob("*/*.json")):
            if path.name in ("machine.json", "benchmarks.json"):
                continue
            try:
                rows += _rows_of(Results.load(str(path)), benchmarks)
            except (AsvUserError, KeyError, TypeError, ValueError, IndexError, OSError) as e:
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                warnings.warn(f"skipping unreadable asv results file {path}: {reason}", stacklevel=2)
                skipped.append((str(path), reason))
    if not rows:
        detail = f"; unreadable: {', '.join(p for p, _ in skipped)}" if skipped else ""
        raise ResultsError(f"no asv results in {', '.join(map(str, roots))}{detail}")
    df = _add_mlx_release(_add_throughput(pd.DataFrame(rows, columns=COLUMNS)))
    df = df.sort_values(["commit_date", "machine", "environment", "benchmark"], kind="stable", ignore_index=True)
    df.attrs["skipped_files"] = skipped
    return df


def results_dirs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The asv results directories in ``paths``: each path is one, or holds several (downloaded CI artifacts).

    A results directory holds one folder per machine (with asv's ``machine.json``) and
    ``benchmarks.json``; a directory without either is searched one level down.
    """
    found: list[Path] = []
    for root in [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]:
        if not root.is_dir():
            raise ResultsError(f"no asv results directory at {root}: run the benchmarks first (rmsprop-bench run)")
        inside = [d for d in sorted(root.iterdir()) if d.is_dir() and _is_results_dir(d)]
        found += [root] if _is_results_dir(root) or not inside else inside
    return list(dict.fromkeys(found))


def _is_results_dir(path: Path) -> bool:
    return (path / "benchmarks.json").is_file() or any(path.glob("*/machine.json"))


def _benchmark_descriptions(root: Path) -> dict[str, dict]:
    """asv's ``benchmarks.json`` (param names, units); empty where it is missing or unreadable."""
    try:
        return json.loads((root / "benchmarks.json").read_text())
    except (OSError, ValueError):
        return {}


def _rows_of(run: Results, benchmarks: dict[str, dict]) -> list[dict[str, Any]]:
    common = {
        "machine": run.params["machine"],
        "commit": run.commit_hash,
        "commit_date": pd.to_datetime(run.date, unit="ms", utc=True),
        "environment": run.env_name,
        "mlx": run.params.get("mlx"),
    }
    rows = []
    for benchmark in run.get_all_result_keys():
        params = run.get_result_params(benchmark) or []
        description = benchmarks.get(benchmark, {})
        names = description.get("param_names") or _DEFAULT_PARAM_NAMES[: len(params)]
        values = run.get_result_value(benchmark, params)
        stats = run.get_result_stats(benchmark, params)
        samples = run.get_result_samples(benchmark, params)
        # asv stores one value per combination, in itertools.product order (one, for no parameters).
        for combo, value, stat, sample in zip(itertools.product(*params), values, stats, samples):
            rows.append(
                {
                    **common,
                    "started_at": pd.to_datetime(run.started_at.get(benchmark), unit="ms", utc=True),
                    "benchmark": benchmark,
                    "unit": description.get("unit"),
                    **_describe_params(dict(zip(names, (_unquote(p) for p in combo)))),
                    **_statistics(value, stat or {}, sample),
                }
            )
    return rows


def _unquote(param: str) -> str:
    """asv stores parameter values as their ``repr``: ``"'eager'"`` -> ``eager``."""
    return param[1:-1] if len(param) >= 2 and param[0] == param[-1] and param[0] in "'\"" else param


def _describe_params(params: dict[str, str]) -> dict[str, Any]:
    variant = next((params[k] for k in _VARIANT_PARAMS if k in params), None)
    device = _declared_device(variant) if "variant" in params else ("cpu" if "peer" in params else None)
    tree = params.get("tree")
    n_leaves, n_params = _tree_size(tree) if tree else (math.nan, math.nan)
    return {
        "variant": variant,
        "device": device,
        "tree": tree,
        "n_leaves": n_leaves,
        "n_params": n_params,
        "dtype": params.get("dtype"),
        "optimizer": params.get("optimizer") or params.get("rule") or (_RULE_BEFORE_RULES if variant else None),
        "of_llc": params.get("of_llc"),  # a point of the roof's sweep
        "case": ";".join(f"{k}={v}" for k, v in params.items() if k not in _COLUMN_PARAMS) or None,
    }


def case_params(case: str | None) -> dict[str, str]:
    """The parameters a row's ``case`` holds: ``"model=llama-tiny;step=compiled"`` -> ``{"model": ..., ...}``."""
    return dict(part.split("=", 1) for part in case.split(";")) if isinstance(case, str) and case else {}


@functools.cache
def _declared_device(variant: str) -> str:
    """``"cpu"``, ``"gpu"`` or ``"default"``; a variant this package does not know ran on the default device."""
    try:
        return variant_class(variant.split("+")[0]).device  # flat+packed runs flat
    except (ValueError, VariantUnavailableError):
        return "default"


@functools.cache
def _tree_size(name: str) -> tuple[float, float]:
    """Leaf and parameter counts; model trees are built once (lazily, so no big allocation)."""
    try:
        info = tree_info(name)
    except ValueError:
        return math.nan, math.nan
    return info.n_leaves, info.n_params


def _statistics(value: float | None, stats: dict[str, float], samples: list[float] | None) -> dict[str, Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        reason = _FAILED if value is None else _SKIPPED
        return {"median": math.nan, "available": False, "skip_reason": reason}
    q25, q75 = stats.get("q_25", math.nan), stats.get("q_75", math.nan)
    return {
        "median": value,
        "ci_low": stats.get("ci_99_a", math.nan),
        "ci_high": stats.get("ci_99_b", math.nan),
        "q25": q25,
        "q75": q75,
        "iqr": q75 - q25,
        "n_samples": len(samples) if samples else stats.get("repeat", math.nan),
        "available": True,
        "skip_reason": None,
    }


@functools.cache
def bytes_per_parameter_byte(optimizer: str) -> tuple[float, float]:
    """Bytes a step of ``optimizer`` moves and touches per parameter byte (RMSprop 5 and 3); NaN for a rule this
    package does not know."""
    try:
        the_rule = rule(optimizer)
    except ValueError:  # a rule this package does not know, or none (a row of no step)
        return math.nan, math.nan
    moved = float(the_rule.bytes_per_element(the_rule.defaults, itemsize=1))
    return moved, working_set(moved, the_rule)


def step_bytes(df: pd.DataFrame, touched: bool = False) -> pd.Series:
    """Each row's bytes moved per step (every read and write of its rule's arrays), or, ``touched``, its working
    set (each array once); NaN for rows of no tree."""
    per_byte = df["optimizer"].map(lambda o: bytes_per_parameter_byte(o)[touched]).astype(float)
    return per_byte * df["dtype"].map(ITEMSIZE).astype(float) * df["n_params"]


def _add_throughput(df: pd.DataFrame) -> pd.DataFrame:
    """GB/s of time benchmarks (the bytes each row's rule moves) and the fraction of each run's limit."""
    df["n_leaves"] = df["n_leaves"].astype(float)
    df["n_params"] = df["n_params"].astype(float)
    is_time = df["benchmark"].str.split(".").str[-1].str.startswith("time_")
    df["gbps"] = (step_bytes(df) / df["median"] / 1e9).where(is_time)
    tracked = df["benchmark"].str.endswith(".track_gbps")
    df.loc[tracked, "gbps"] = df.loc[tracked, "median"]
    df = _attribute_devices(df)
    df["fraction_of_limit"] = df["gbps"] / df["limit_gbps"]
    tracked = df["benchmark"].str.endswith(".track_fraction_of_limit")
    df.loc[tracked, "fraction_of_limit"] = df.loc[tracked, "median"]
    return _fractions_timed_together(df)


def _fractions_timed_together(df: pd.DataFrame) -> pd.DataFrame:
    """Each step's fraction from its ``track_fraction_of_limit`` where its run has one, as that benchmark times the
    CPU roof's kernels in the same rounds as the step (``benchmarks.common.fraction_in_same_rounds``): the run's
    roof, the best of a sweep kept per boot, can come from a faster moment than any step (a 16x1M step read 38% of
    it, and 90% of the kernels timed beside it)."""
    key = [c for c in ("machine", "commit", "environment", "variant", "tree", "dtype", "optimizer", "case") if c in df]
    tracked = df.loc[(df["benchmark"] == FRACTION_BENCHMARK) & df["median"].notna(), [*key, "median"]]
    steps = df.index[df["benchmark"] == STEP_BENCHMARK]
    together = df.loc[steps, key].merge(tracked.drop_duplicates(key), on=key, how="left")["median"].to_numpy()
    df.loc[steps, "fraction_of_limit"] = df.loc[steps, "fraction_of_limit"].where(pd.isna(together), together)
    return df


def _attribute_devices(df: pd.DataFrame) -> pd.DataFrame:
    """Resolve each row's device for its run and give it that device's roof at its working set as ``limit_gbps``."""
    run = ["machine", "commit", "environment"]
    for device, benchmark in LIMIT_BENCHMARKS.items():
        df.loc[df["benchmark"] == benchmark, "device"] = device
    has_gpu = df[(df["benchmark"] == GPU_LIMIT_BENCHMARK) & df["median"].notna()].groupby(run).size().rename("has_gpu")
    df = df.join(has_gpu, on=run)
    default = df["device"] == "default"
    df.loc[default, "device"] = df.loc[default, "has_gpu"].notna().map({True: "gpu", False: "cpu"})
    working_sets = step_bytes(df, touched=True)
    df["limit_gbps"], df["cache_resident"] = math.nan, False
    for _, rows in df.groupby(run, sort=False):
        roofs = run_roofs(rows)
        for device, roof in roofs.items():
            at = rows.index[rows["device"] == device] if roof else []
            if len(at):
                sizes = working_sets[at]
                df.loc[at, "limit_gbps"] = [roof.at(s) if s == s else roof.beyond_caches for s in sizes]
                df.loc[at, "cache_resident"] = [roof.cache_resident(s) for s in sizes]
    return df.drop(columns=["has_gpu"])


def run_roofs(rows: pd.DataFrame) -> dict[str, Roof | None]:
    """Each device's roof from one run's rows: its sweep, or, from a run before the roof, its one limit."""
    rows = rows if "of_llc" in rows else rows.assign(of_llc=None)
    llc = rows.loc[(rows["benchmark"] == LLC_BENCHMARK) & rows["available"], "median"]
    last_level = int(llc.iloc[0]) if len(llc) else None
    roofs: dict[str, Roof | None] = {}
    for device, benchmark in LIMIT_BENCHMARKS.items():
        gbps = rows[(rows["benchmark"] == f"{ROOF_BENCHMARKS[device]}.track_gbps") & rows["available"]]
        sizes = rows[(rows["benchmark"] == f"{ROOF_BENCHMARKS[device]}.track_working_set_bytes") & rows["available"]]
        sweep = pd.merge(gbps[["of_llc", "median"]], sizes[["of_llc", "median"]], on="of_llc", suffixes=("", "_bytes"))
        sweep = sweep.drop_duplicates("median_bytes").sort_values("median_bytes")
        single = rows.loc[(rows["benchmark"] == benchmark) & rows["available"], "median"]
        if len(sweep):
            sizes_, gbps_ = tuple(sweep["median_bytes"].astype(int)), tuple(sweep["median"])
            roofs[device] = Roof(device, sizes_, gbps_, last_level_cache=last_level)
        else:
            roofs[device] = Roof.flat(device, single.median(), last_level) if len(single) else None
    return roofs


def _add_mlx_release(df: pd.DataFrame) -> pd.DataFrame:
    """Where a run's environment names no MLX release (asv's ``existing``), the one it tracked."""
    run = ["machine", "commit", "environment"]
    tracked = df[(df["benchmark"] == MLX_RELEASE_BENCHMARK) & df["available"]].groupby(run)["median"].max()
    named = tracked.map(lambda n: f"{int(n) // 10000}.{int(n) // 100 % 100}.{int(n) % 100}").rename("tracked_mlx")
    df = df.join(named, on=run)
    df["mlx"] = df["mlx"].fillna(df.pop("tracked_mlx"))
    return df


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the newest run: the newest commit and, of its runs (machines, environments), the last started."""
    if df.empty:
        return df
    run = ["machine", "environment", "commit"]
    runs = df.groupby(run, sort=False)[["commit_date", "started_at"]].max()
    newest = runs.sort_values(["commit_date", "started_at"]).index[-1]
    return df[(df[run] == pd.Series(newest, index=run)).all(axis=1)]


def latest_by(df: pd.DataFrame, keys: str | list[str]) -> pd.DataFrame:
    """:func:`latest` for each value of ``keys``: each machine's (or MLX release's) newest run."""
    if df.empty:
        return df
    return pd.concat([latest(group) for _, group in df.groupby(keys, sort=True, dropna=False)])


def bandwidth_limit(df: pd.DataFrame, device: str = "cpu") -> float | None:
    """``device``'s median bandwidth limit (GB/s) over the given rows, ``None`` where the suite did not measure it."""
    limits = df.loc[df["device"] == device, "limit_gbps"].dropna()
    return float(limits.median()) if len(limits) else None


def device_limits(df: pd.DataFrame) -> dict[str, Roof | None]:
    """Each device's roof in one run's rows (``latest(df)``): ``{"cpu": Roof, "gpu": Roof or None}``."""
    return run_roofs(df)
