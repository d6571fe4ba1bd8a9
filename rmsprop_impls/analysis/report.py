"""A one-page Markdown summary of asv results, with every figure as a PNG beside it: no Jupyter needed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..measure.bandwidth import limit_text, percent_text
from .plots import COMPARISON_FIGURES, FIGURES, NothingToPlot, machine_roofs_text
from .regressions import find_regressions, find_release_regressions
from .results import STEP_BENCHMARK, device_limits, latest
from .tables import markdown_table
from .tracking import by_machine, by_release, releases_in
from .training_report import training_section

SUMMARY = "summary.md"


#: What the fastest variant is chosen among: one step of one rule on one tree in one dtype.
CASE = ["optimizer", "tree", "dtype"]


def winners(df: pd.DataFrame, baseline: str = "eager") -> pd.DataFrame:
    """The fastest variant per optimizer, tree and dtype in the newest run, with its speed-up over ``baseline``
    running the same optimizer."""
    rows = latest(df[(df["benchmark"] == STEP_BENCHMARK) & df["available"]])
    best = rows.loc[rows.groupby(CASE)["median"].idxmin()].set_index(CASE)
    base = rows[rows["variant"] == baseline].set_index(CASE)["median"]
    best["speedup"] = base.reindex(best.index) / best["median"]
    columns = ["n_params", "n_leaves", "variant", "device", "median", "gbps", "fraction_of_limit", "cache_resident"]
    columns += ["speedup"]
    return best[columns].reset_index().sort_values([*CASE[:1], "n_params"], kind="stable", ignore_index=True)


def unavailable(df: pd.DataFrame) -> pd.DataFrame:
    """Variant, optimizer and tree triples that asv skipped or failed in the newest run, with why."""
    rows = latest(df[(df["benchmark"] == STEP_BENCHMARK) & ~df["available"]])
    return rows[["variant", *CASE, "skip_reason"]].drop_duplicates().reset_index(drop=True)


def _number(value: float, fmt: str) -> str | None:
    return None if pd.isna(value) else format(value, fmt)


def _winners_section(df: pd.DataFrame) -> str:
    table = winners(df)
    rows = [
        [
            r.optimizer,
            r.tree,
            r.dtype,
            f"{int(r.n_params):,}",
            int(r.n_leaves),
            r.variant,
            r.device,
            _number(r.median * 1e3, ".3f"),
            _number(r.gbps, ".2f"),
            percent_text(r.fraction_of_limit, r.cache_resident),
            _number(r.speedup, ".2f"),
        ]
        for r in table.itertuples()
    ]
    headers = ["optimizer", "tree", "dtype", "params", "leaves", "fastest", "device", "median ms", "GB/s", "of limit"]
    headers += ["x eager"]
    return (
        "## Fastest variant per optimizer and tree\n\nGB/s counts the arrays each optimizer reads and writes "
        "(RMSprop 5 bytes per parameter byte, AdamW 7); *x eager* is eager running the same optimizer over the "
        "fastest.\n\n" + markdown_table(headers, rows)
    )


def _series(r) -> str:
    """A regression's series: ``eager/4x1K/float32/adamw``, the optimizer left out where there is none."""
    parts = [r.variant, r.tree, r.dtype, r.optimizer]
    return "/".join(str(p) for p in parts if isinstance(p, str))


def _regressions_section(df: pd.DataFrame) -> str:
    found = find_regressions(df)
    if found.empty:
        return "## Regressions\n\nasv's step detection finds none in this history."
    rows = [[r.benchmark, _series(r), r.commit[:8], r.previous[:8], f"{r.ratio:.2f}x"] for r in found.itertuples()]
    headers = ["benchmark", "series", "first slow commit", "last good commit", "slower by"]
    return "## Regressions (asv step detection)\n\n" + markdown_table(headers, rows)


def _releases_section(df: pd.DataFrame) -> str | None:
    """Each variant per MLX release, tree by tree, and the releases that made a step slower."""
    table = by_release(df)
    if table.empty:
        return None
    parts = ["## MLX releases compared"]
    for machine, per in table.groupby("machine", sort=True):
        releases = releases_in(per)
        rows = [
            [r["optimizer"], r["tree"], r["dtype"], r["variant"], *(_number(r[m] * 1e3, ".3f") for m in releases),
             _number(r["ratio"], ".2f")]
            for _, r in per.iterrows()
        ]  # fmt: skip
        headers = ["optimizer", "tree", "dtype", "variant", *(f"MLX {m} ms" for m in releases)]
        headers.append(f"{releases[-1]} / {releases[0]}")
        parts.append(f"Machine {machine}, commit `{per['commit'].iloc[0][:8]}`:\n\n" + markdown_table(headers, rows))
    found = find_release_regressions(df)
    if found.empty:
        parts.append("asv's step detection finds no regression from one MLX release to the next.")
    else:
        rows = [[r.machine, r.benchmark, _series(r), r.mlx, r.previous, f"{r.ratio:.2f}x"] for r in found.itertuples()]
        headers = ["machine", "benchmark", "series", "first slow release", "last good release", "slower by"]
        parts.append("Regressions between releases (asv step detection):\n\n" + markdown_table(headers, rows))
    return "\n\n".join(parts)


def _machines_section(df: pd.DataFrame) -> str | None:
    """Each machine's newest run side by side: step time and the fraction of that machine's own limit."""
    table = by_machine(df)
    machines = sorted(table["machine"].unique())
    if len(machines) < 2:
        return None
    wide = table.pivot_table(index=["optimizer", "n_params", "tree", "dtype", "variant"], columns="machine",
                             values=["median", "fraction_of_limit", "cache_resident"])  # fmt: skip
    rows = [
        [optimizer, tree, dtype, variant]
        + [c for m in machines for c in (_number(r.get(("median", m), float("nan")) * 1e3, ".3f"),
                                         percent_text(r.get(("fraction_of_limit", m), float("nan")),
                                                      r.get(("cache_resident", m), 0) > 0))]
        for (optimizer, _, tree, dtype, variant), r in wide.iterrows()
    ]  # fmt: skip
    headers = ["optimizer", "tree", "dtype", "variant"] + [h for m in machines for h in (f"{m} ms", f"{m} % of limit")]
    return (
        "## Machines compared\n\nEach machine's newest run; a fraction is of that machine's own bandwidth roof at "
        f"the step's working set ({machine_roofs_text(table, machines)}).\n\n" + markdown_table(headers, rows)
    )


def write_report(df: pd.DataFrame, out_dir: str | Path, source: str = "") -> Path:
    """Write every figure as ``<name>.png`` and ``summary.md`` into ``out_dir``; returns the summary's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    newest = latest(df)
    limits = device_limits(newest)
    machines = ", ".join(sorted(df["machine"].unique()))
    sections = [
        "# rmsprop-bench results",
        f"Source: `{source}`; machine: {machines}; newest commit: `{newest['commit'].iloc[0][:8]}` "
        f"({newest['commit_date'].iloc[0]:%Y-%m-%d %H:%M} UTC); {df['commit'].nunique()} commits in the history.",
        f"**Memory-bandwidth roof:** CPU {limit_text(limits['cpu'], 'cpu')} (best of several kernels on all cores); "
        f"GPU {limit_text(limits['gpu'])}. Each step's % of limit is of its own device's roof at the step's working "
        "set (the arrays its optimizer touches: RMSprop's w, g and v); a working set that fits in the last-level "
        "cache is marked cache-resident."
        if limits["cpu"]
        else "**Memory-bandwidth roof:** not in these results (bench_bandwidth did not run).",
        _winners_section(df),
    ]
    sections += [s for s in (training_section(df),) if s]
    skipped = unavailable(df)
    if len(skipped):
        lines = [f"- {r.variant} {r.optimizer} on {r.tree} ({r.dtype}): {r.skip_reason}" for r in skipped.itertuples()]
        sections.append("## Unavailable here\n\n" + "\n".join(lines))
    sections += [s for s in (_machines_section(df), _releases_section(df)) if s]
    sections.append(_regressions_section(df))
    sections.append("## Figures")
    for name, make in tqdm({**FIGURES, **COMPARISON_FIGURES}.items(), desc="drawing figures", unit="figure",
                           leave=False):  # fmt: skip
        try:
            fig = make(df)
        except NothingToPlot as e:
            if name in FIGURES:  # a comparison with one machine or one release in the results goes unmentioned
                sections.append(f"*{name} not drawn: {e}.*")
            continue
        fig.savefig(out / f"{name}.png", dpi=110)
        sections.append(f"![{name}]({name}.png)\n\n{fig.caption}")
    for path, reason in df.attrs.get("skipped_files", []):
        sections.append(f"> Skipped unreadable results file `{path}`: {reason}")
    summary = out / SUMMARY
    summary.write_text("\n\n".join(sections) + "\n")
    return summary
