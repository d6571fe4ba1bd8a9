"""The same suite across MLX releases and across machines: tables the report, the figures and notebook 4 share.

asv keeps one results folder per machine and one environment per MLX release
(asv.conf.json's matrix), so both comparisons are views of the one tidy table
that :func:`~.results.load_asv_results` returns: each machine's newest run,
and on one machine and commit, each release's run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from packaging.version import InvalidVersion, Version

from .results import STEP_BENCHMARK, latest_by, results_dirs

#: What one step-time row is known by, on every machine and release.
STEP_KEY = ["optimizer", "tree", "dtype", "variant"]
#: The order of the tables' rows: by optimizer, then smallest tree first.
SIZE_ORDER = ["optimizer", "n_params", "tree", "dtype", "variant"]


def release_order(releases: pd.Series | list) -> list[str]:
    """MLX releases oldest first (0.9.0 before 0.31.2), unnamed ones last."""

    def key(release: str) -> tuple:
        try:
            return (0, Version(release))
        except InvalidVersion:
            return (1, release)

    return sorted({r for r in releases if isinstance(r, str)}, key=key)


def step_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Measured step timings, with the tree size columns the tables sort by."""
    return df[(df["benchmark"] == STEP_BENCHMARK) & df["available"]]


def by_release(df: pd.DataFrame) -> pd.DataFrame:
    """Median step time per MLX release on each machine's newest commit measured with two releases or more.

    One row per machine, optimizer, tree, dtype and variant (with the tree's size); one
    column per release, oldest first, and ``ratio``: the newest release's median over the oldest's
    (above 1 is slower). Empty where no machine has two releases on one commit.
    """
    rows = step_rows(df).dropna(subset=["mlx"])
    tables = []
    for machine, on_machine in rows.groupby("machine", sort=True):
        releases_per_commit = on_machine.groupby("commit")["mlx"].nunique()
        shared = releases_per_commit[releases_per_commit >= 2].index
        if not len(shared):
            continue
        newest = on_machine[on_machine["commit"].isin(shared)].sort_values("commit_date")["commit"].iloc[-1]
        runs = latest_by(on_machine[on_machine["commit"] == newest], "mlx")
        table = runs.pivot_table(index=STEP_KEY + ["n_params", "n_leaves"], columns="mlx", values="median")
        order = release_order(table.columns)
        table = table[order]
        table["ratio"] = table[order[-1]] / table[order[0]]
        table.insert(0, "commit", newest)
        table.insert(0, "machine", machine)
        tables.append(table.reset_index())
    if not tables:
        return pd.DataFrame(columns=["machine", "commit", *STEP_KEY, "n_params", "n_leaves", "ratio"])
    out = pd.concat(tables, ignore_index=True).sort_values(["machine", *SIZE_ORDER])
    out.columns.name = None
    return out.reset_index(drop=True)


def by_machine(df: pd.DataFrame) -> pd.DataFrame:
    """Each machine's newest run: per optimizer, tree, dtype and variant, its median step time and fraction of its
    own limit.

    Machines differ in speed, so both figures are there: the absolute time, and
    the share of the bandwidth limit measured on that machine in that run.
    """
    rows = latest_by(step_rows(df), "machine")
    columns = ["machine", "mlx", *STEP_KEY, "n_params", "n_leaves", "median", "gbps", "limit_gbps", "fraction_of_limit"]
    columns += ["cache_resident"]
    return rows[columns].sort_values([*SIZE_ORDER, "machine"], ignore_index=True)


def machines(df: pd.DataFrame) -> list[str]:
    return sorted(df["machine"].dropna().unique())


def releases_in(table: pd.DataFrame) -> list[str]:
    """The release columns of a :func:`by_release` table, oldest first."""
    fixed = {"machine", "commit", *STEP_KEY, "n_params", "n_leaves", "ratio"}
    return release_order([c for c in table.columns if c not in fixed])


def merge_results(sources: str | Path | Sequence[str | Path], dest: str | Path) -> list[str]:
    """Copy every machine's results in ``sources`` into one asv results directory ``dest``; returns the machines.

    ``asv publish`` reads one ``results_dir``: this is how several machines' results (CI artifacts, a
    colleague's folder) become one dashboard. A file of the same name (same machine, commit and
    environment) is replaced; ``benchmarks.json``, asv's index of benchmarks, is the union of all.
    """
    dest = Path(dest)
    index_path = dest / "benchmarks.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    machines = set()
    for source in results_dirs(sources):
        if source.resolve() == dest.resolve():
            continue
        for machine_file in source.glob("*/machine.json"):
            target = dest / machine_file.parent.name
            target.mkdir(parents=True, exist_ok=True)
            for path in machine_file.parent.glob("*.json"):
                shutil.copy2(path, target / path.name)
            machines.add(machine_file.parent.name)
        if (source / "benchmarks.json").is_file():
            index.update(json.loads((source / "benchmarks.json").read_text()))
    dest.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index, indent=4, sort_keys=True) + "\n")
    return sorted(machines | {p.parent.name for p in dest.glob("*/machine.json")})
