"""The figures the notebooks, the report and the tests share, drawn from ``load_asv_results``'s table.

Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot, so
they need no display and leave no global state behind. Every figure has a
title, axis labels with units, and a ``caption``: one sentence that says what
to read from it, also printed under the plot so a saved PNG carries it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..measure.bandwidth import limit_text as limit_text_of
from ..measure.roof import Roof
from ..registry import variant_names
from ..rules import DEFAULT_RULE, RULE_NAMES, rule
from .regressions import commit_series, find_regressions
from .results import ITEMSIZE, STEP_BENCHMARK, bytes_per_parameter_byte, device_limits, latest
from .tracking import by_machine, by_release, releases_in

#: Entries per column of a legend drawn beside the axes.
LEGEND_ROWS = 16


class NothingToPlot(ValueError):
    """The results hold none of the measurements this figure draws."""


class CaptionedFigure(Figure):
    """A figure that carries the one sentence saying what to read from it."""

    caption: str = ""


def _figure(n_axes: int = 1, width: float = 7.0, height: float = 4.5) -> tuple[CaptionedFigure, list]:
    fig = CaptionedFigure(figsize=(width, height))
    axes = fig.subplots(1, n_axes, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig: CaptionedFigure, title: str, caption: str, right: float = 1.0) -> CaptionedFigure:
    """Title, caption and layout; the axes keep left of ``right`` (a fraction of the width)."""
    fig.suptitle(title, fontweight="bold")
    fig.caption = caption
    fig.text(0.01, 0.01, caption, fontsize=8, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.08, right, 1))
    return fig


def _one_of(rows: pd.DataFrame, column: str, wanted: str | None, preferred: str) -> pd.DataFrame:
    """The rows of one value of ``column``: ``wanted``, else ``preferred`` where measured, else the first."""
    values = rows[column].dropna().unique().tolist()
    return rows[rows[column] == (wanted or (preferred if preferred in values or not values else values[0]))]


def _step_rows(df: pd.DataFrame, dtype: str | None = None, optimizer: str | None = None) -> pd.DataFrame:
    """The newest run's step timings in one dtype (float32 where measured) of one optimizer (RMSprop where
    measured)."""
    rows = latest(df[df["benchmark"] == STEP_BENCHMARK])
    if rows.empty:
        raise NothingToPlot(f"no '{STEP_BENCHMARK}' results to plot")
    return _one_of(_one_of(rows, "dtype", dtype, "float32"), "optimizer", optimizer, DEFAULT_RULE)


def _measured_step_rows(df: pd.DataFrame, dtype: str | None = None, optimizer: str | None = None) -> pd.DataFrame:
    """The newest run's step timings that have a value."""
    rows = _step_rows(df, dtype, optimizer)
    rows = rows[rows["available"]]
    if rows.empty:
        raise NothingToPlot(f"every '{STEP_BENCHMARK}' result in the newest run was skipped or failed")
    return rows


def _variant_order(variants: pd.Series) -> list[str]:
    """Registry order first (eager, compiled, ...), then anything else (peers, ``flat+packed``)."""
    known = [v for v in variant_names() if v in set(variants)]
    return known + sorted(set(variants) - set(known))


def _label(rows: pd.DataFrame, variant: str) -> str:
    """``variant (device)`` for a legend: each variant's GB/s is a fraction of its own device's limit."""
    devices = rows.loc[rows["variant"] == variant, "device"].dropna().unique()
    return f"{variant} ({'/'.join(devices)})" if len(devices) else variant


def _trees_by_size(rows: pd.DataFrame) -> list[str]:
    return rows.sort_values(["n_params", "n_leaves"]).drop_duplicates("tree")["tree"].tolist()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _what(rows: pd.DataFrame) -> str:
    """``AdamW, float32``: the optimizer and dtype a figure's rows ran."""
    return f"{rule(rows['optimizer'].iloc[0]).title}, {rows['dtype'].iloc[0]}"


def _status(per_variant: pd.DataFrame) -> pd.Series:
    """Why each variant has no bar: '' where it ran, else unavailable (asv skipped it), failed or not run."""
    reason = per_variant["skip_reason"].fillna("").astype(str)
    missing = per_variant["available"].isna()
    return reason.map(lambda r: "" if not r else "unavailable" if "NotImplementedError" in r else "failed").mask(
        missing, "not run"
    )


def variant_comparison(
    df: pd.DataFrame, dtype: str | None = None, max_trees: int = 4, optimizer: str | None = None
) -> CaptionedFigure:
    """Median step time of every variant on each tree, with asv's interquartile range as error bars."""
    rows = _step_rows(df, dtype, optimizer)
    trees = _trees_by_size(rows)[:max_trees]
    order = _variant_order(rows["variant"])
    fig, axes = _figure(len(trees), width=max(7.0, 3.2 * len(trees)))
    winners = []
    for ax, tree in zip(axes, trees):
        per = rows[rows["tree"] == tree].set_index("variant").reindex(order)
        status = _status(per)
        ran = per[status == ""]
        x = np.arange(len(order))
        ms = per["median"].to_numpy() * 1e3
        low = np.clip(ms - per["q25"].to_numpy() * 1e3, 0, None)
        high = np.clip(per["q75"].to_numpy() * 1e3 - ms, 0, None)
        ax.bar(x, np.nan_to_num(ms), yerr=[np.nan_to_num(low), np.nan_to_num(high)], capsize=4, color="C0")
        ax.set_xticks(x, order, rotation=30, ha="right")
        for i, (label, why) in enumerate(zip(ax.get_xticklabels(), status)):
            if why:
                ax.text(i, 0, f" {why}", rotation=90, ha="center", va="bottom", color="dimgray", fontsize=8)
                label.set_color("dimgray")
        ax.set_title(f"{tree}\n{int(per['n_params'].max()):,} params, {int(per['n_leaves'].max())} leaves", fontsize=10)
        ax.set_xlabel("variant")
        ax.set_ylabel("median step time (ms)")
        if len(ran):
            best = ran["median"].idxmin()
            winners.append(f"{best} on {tree} ({_ms(ran.loc[best, 'median'])})")
    caption = (
        f"Shorter bars are faster and whiskers span asv's interquartile range; fastest: {', '.join(winners)}; "
        "grey labels mark variants that cannot run on this machine (unavailable), failed, or were not run."
    )
    return _finish(fig, f"Step time per variant ({_what(rows)}, newest commit)", caption)


def roof_seconds(n_params: np.ndarray, dtype: str, roof: Roof, optimizer: str = DEFAULT_RULE) -> np.ndarray:
    """The fastest a step can be: the bytes ``optimizer`` moves (RMSprop 5 per parameter byte) at the roof at its
    working set (the arrays it touches: RMSprop's w, g and v)."""
    moved_per_byte, touched_per_byte = bytes_per_parameter_byte(optimizer)
    moved = moved_per_byte * ITEMSIZE[dtype] * np.asarray(n_params, dtype=float)
    return moved / (np.array([roof.at(b * touched_per_byte / moved_per_byte) for b in moved]) * 1e9)


def scaling(df: pd.DataFrame, dtype: str | None = None, optimizer: str | None = None) -> CaptionedFigure:
    """Step time against parameter count, log-log, one line per variant, with each device's roof as a curve."""
    rows = _measured_step_rows(df, dtype, optimizer).sort_values("n_params")
    # One point per size: where several trees share a size, the one with the fewest leaves (per_leaf_overhead
    # shows the others).
    rows = rows[rows["n_leaves"] == rows.groupby("n_params")["n_leaves"].transform("min")]
    dtype, optimizer = rows["dtype"].iloc[0], rows["optimizer"].iloc[0]
    fig, (ax,) = _figure()
    for variant in _variant_order(rows["variant"]):
        line = rows[rows["variant"] == variant]
        ax.plot(line["n_params"], line["median"] * 1e3, marker="o", label=_label(rows, variant))
    limits = device_limits(latest(df))
    sizes = np.geomspace(rows["n_params"].min(), rows["n_params"].max(), 400)
    drawn = [d for d in ("cpu", "gpu") if limits[d] and (d == "cpu" or (rows["device"] == d).any())]
    for device, style in zip(drawn, ("k--", "k:")):
        roof = limits[device]
        label = f"{device} roof ({limit_text_of(roof, device)})"
        ax.plot(sizes, roof_seconds(sizes, dtype, roof, optimizer) * 1e3, style, label=label)
        llc = roof.last_level_cache
        fits = llc / (bytes_per_parameter_byte(optimizer)[1] * ITEMSIZE[dtype]) if llc else math.nan
        if sizes[0] <= fits <= sizes[-1]:
            ax.axvline(fits, color="0.6", linewidth=0.8)
    if drawn:
        limit_text = (
            "the dashed curve is the fastest a step can be at the roof measured at its working set "
            + ("(dotted: the GPU's) " if "gpu" in drawn else "")
            + "so the gap above it is what a variant leaves on the table; its slope changes where the working set "
            "outgrows a cache, and the grey line marks where it outgrows the last-level cache (left of it, a tree is "
            "cache-resident)"
        )
    else:
        limit_text = "no bandwidth limit (track_triad_gbps) is in these results, so no limit line is drawn"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters in the tree (count, log scale)")
    ax.set_ylabel("median step time (ms, log scale)")
    ax.legend(fontsize=8)
    caption = f"Lines with slope 1 scale with size and lines flat at the left are overhead-bound; {limit_text}."
    return _finish(fig, f"Scaling with tree size ({_what(rows)})", caption)


def fraction_of_limit(df: pd.DataFrame, dtype: str | None = None, optimizer: str | None = None) -> CaptionedFigure:
    """Each variant's effective bandwidth as a share of its device's roof at the tree's working set, per tree."""
    rows = _step_rows(df, dtype, optimizer)
    fig, (ax,) = _figure()
    measured = rows[rows["available"] & rows["fraction_of_limit"].notna()]
    if measured.empty:
        _empty(ax, "no bandwidth limit (bench_bandwidth.Bandwidth.track_triad_gbps) in these results")
        caption = "Nothing to read yet: run the bandwidth benchmark with the step benchmarks to get the limit."
    else:
        trees, order = _trees_by_size(measured), _variant_order(measured["variant"])
        width = 0.8 / len(order)
        for i, variant in enumerate(order):
            per = measured[measured["variant"] == variant].set_index("tree").reindex(trees)
            x = np.arange(len(trees)) + (i - (len(order) - 1) / 2) * width
            ax.bar(x, per["fraction_of_limit"] * 100, width, label=_label(measured, variant))
        ax.axhline(100, color="k", linestyle="--", linewidth=1)
        resident = measured.groupby("tree")["cache_resident"].any()
        ax.set_xticks(np.arange(len(trees)), [f"{t}\n(cache-resident)" if resident[t] else t for t in trees])
        ax.legend(fontsize=8)
        best = measured.loc[measured["fraction_of_limit"].idxmax()]
        caption = (
            "Bars near the 100% line move memory as fast as their device allows (each bar is of the roof of the "
            "device in its label at the tree's working set; a cache-resident tree's is the cache's); the best here "
            f"is {best['variant']} on {best['tree']} at "
            f"{100 * best['fraction_of_limit']:.0f}% of the {best['device']} limit."
        )
    ax.set_xlabel("tree")
    ax.set_ylabel("effective bandwidth (% of its device's limit)")
    return _finish(fig, f"Fraction of the memory-bandwidth roof at each tree's working set ({_what(rows)})", caption)


def per_leaf_overhead(df: pd.DataFrame, dtype: str | None = None, optimizer: str | None = None) -> CaptionedFigure:
    """Step time against leaf count at the total size measured with the most leaf counts."""
    rows = _measured_step_rows(df, dtype, optimizer)
    fig, (ax,) = _figure()
    total = rows.groupby("n_params")["n_leaves"].nunique().idxmax()
    same_size = rows[rows["n_params"] == total].sort_values("n_leaves")
    for variant in _variant_order(same_size["variant"]):
        line = same_size[same_size["variant"] == variant]
        ax.plot(line["n_leaves"], line["median"] * 1e3, marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("leaves in the tree (count, log scale)")
    ax.set_ylabel("median step time (ms)")
    ax.legend(fontsize=8)
    trees = ", ".join(same_size.drop_duplicates("tree")["tree"])
    caption = (
        f"At a fixed {int(total):,} parameters ({trees}), a line that rises with the leaf "
        "count pays a cost per leaf (dispatch, kernel launch); a flat line does not."
    )
    return _finish(fig, f"Per-leaf overhead at a fixed total size ({_what(rows)})", caption)


def speedup_heatmap(
    df: pd.DataFrame, baseline: str = "eager", dtype: str | None = None, optimizer: str | None = None
) -> CaptionedFigure:
    """``baseline``'s median over each variant's, for every variant and tree; n/a where one did not run."""
    rows = _step_rows(df, dtype, optimizer)
    trees, order = _trees_by_size(rows), _variant_order(rows["variant"])
    medians = rows[rows["available"]].pivot_table(index="variant", columns="tree", values="median")
    medians = medians.reindex(index=order, columns=trees)
    speedup = medians.loc[baseline] / medians if baseline in medians.index else medians * math.nan
    fig, (ax,) = _figure(width=max(6.0, 1.3 * len(trees) + 3), height=max(3.5, 0.5 * len(order) + 2))
    values = np.log2(speedup.to_numpy(dtype=float))
    span = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    image = ax.imshow(values, cmap="RdYlGn", norm=TwoSlopeNorm(0, -max(span, 1e-3), max(span, 1e-3)), aspect="auto")
    for (i, j), value in np.ndenumerate(speedup.to_numpy(dtype=float)):
        ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.2f}x", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(trees)), trees, rotation=30, ha="right")
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("tree")
    ax.set_ylabel("variant")
    fig.colorbar(image, ax=ax, label="log2(speed-up); 1 = twice as fast")
    caption = (
        f"Green cells are faster than {baseline} and red ones slower, by the factor written in them; "
        "n/a marks a variant that did not run on that tree."
    )
    return _finish(fig, f"Speed-up over {baseline} (step time ratio; {_what(rows)})", caption)


def history(
    df: pd.DataFrame, benchmark: str = STEP_BENCHMARK, regressions: pd.DataFrame | None = None
) -> CaptionedFigure:
    """One line per series over commits (oldest left); asv's step detection marks each regression's commit."""
    rows = df[df["benchmark"] == benchmark]
    if not rows["available"].any():
        raise NothingToPlot(f"no '{benchmark}' results to plot")
    regressions = find_regressions(rows) if regressions is None else regressions
    regressions = regressions[regressions["benchmark"] == benchmark]
    commits = rows.sort_values("commit_date").drop_duplicates("commit")["commit"].tolist()
    position = {c: i for i, c in enumerate(commits)}
    lines = list(commit_series(rows))
    # A legend of every series inside the axes outgrew the figure (tight_layout gave up): it goes to
    # their right, in columns of at most LEGEND_ROWS entries, and the figure widens by a column each.
    columns = max(1, math.ceil(len(lines) / LEGEND_ROWS))
    plot_width = max(7.0, 0.6 * len(commits) + 4)
    fig, (ax,) = _figure(width=plot_width + 3.0 * columns)
    for key, series in lines:
        label = "/".join(str(v) for v in key[3:] if isinstance(v, str))
        ax.plot(series["commit"].map(position), series["median"] * 1e3, marker="o", label=label)
    for _, r in regressions.iterrows():
        x, y = position[r["commit"]], r["after"] * 1e3
        ax.plot(x, y, marker="v", color="red", markersize=12, linestyle="none")
        ax.annotate(
            f"regression in {r['commit'][:8]}\n{r['variant']}/{r['tree']}/{r['optimizer']}: {r['ratio']:.1f}x slower",
            (x, y),
            textcoords="offset points",
            xytext=(-10, -30),
            ha="right",
            color="red",
            fontsize=8,
        )
    ax.set_xticks(range(len(commits)), [c[:8] for c in commits], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("commit (oldest left)")
    ax.set_ylabel("median step time (ms, log scale)")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, ncol=columns, loc="upper right", bbox_to_anchor=(1, 0.92))
    named = [f"{r.variant}/{r.tree}/{r.optimizer} at {r.commit[:8]} ({r.ratio:.1f}x)" for r in regressions.itertuples()]
    caption = (
        f"Red triangles mark the first slow commit of each step up that asv's step detection finds: {'; '.join(named)}."
        if named
        else "asv's step detection finds no regression in this history: every line stays at its level."
    )
    title = f"History of {benchmark.split('.', 1)[-1]} over commits"
    return _finish(fig, title, caption, right=plot_width / fig.get_figwidth())


def _grouped_bars(ax, table: pd.DataFrame, groups: list[str], values: str, scale: float = 1.0) -> None:
    """Bars of ``values`` per variant (x), one bar per group (a machine, a release), side by side."""
    order = _variant_order(table["variant"])
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        per = table[table["group"] == group].set_index("variant").reindex(order)
        ax.bar(np.arange(len(order)) + (i - (len(groups) - 1) / 2) * width, per[values] * scale, width, label=group)
    ax.set_xticks(np.arange(len(order)), order, rotation=30, ha="right")


def _time_and_fraction(rows: pd.DataFrame, groups: list[str], legend: str, max_trees: int) -> CaptionedFigure:
    """Per tree (a column), each variant's step time (top) and fraction of its limit (bottom), a bar per group."""
    trees = _trees_by_size(rows)[:max_trees]
    fig = CaptionedFigure(figsize=(max(7.0, 3.4 * len(trees)), 7.5))
    axes = fig.subplots(2, len(trees), squeeze=False)
    for (top, bottom), tree in zip(axes.T, trees):
        per = rows[rows["tree"] == tree]
        _grouped_bars(top, per, groups, "median", 1e3)
        top.set_title(
            f"{tree}\n{int(per['n_params'].max()):,} params, {int(per['n_leaves'].max())} leaves", fontsize=10
        )
        top.set_ylabel("median step time (ms)")
        _grouped_bars(bottom, per, groups, "fraction_of_limit", 100)
        bottom.axhline(100, color="k", linestyle="--", linewidth=1)
        bottom.set_ylabel("% of its machine's limit" if legend == "machine" else "% of its device's limit")
        bottom.set_xlabel("variant")
    axes[0][0].legend(title=legend, fontsize=8)
    return fig


def machine_comparison(
    df: pd.DataFrame, dtype: str | None = None, max_trees: int = 4, optimizer: str | None = None
) -> CaptionedFigure:
    """Per tree, each variant's step time and fraction of its own machine's limit, machine by machine."""
    rows = by_machine(df)
    machines = sorted(rows["machine"].unique())
    if len(machines) < 2:
        raise NothingToPlot(f"results from one machine only ({', '.join(machines) or 'none'}); pass several")
    rows = _one_of(_one_of(rows, "dtype", dtype, "float32"), "optimizer", optimizer, DEFAULT_RULE)
    fig = _time_and_fraction(rows.assign(group=rows["machine"]), machines, "machine", max_trees)
    caption = (
        "Top: shorter bars are faster on that machine; bottom: each bar is a share of its own machine's "
        f"bandwidth roof at the step's working set ({machine_roofs_text(rows, machines)}), so a variant that is "
        "slow on a slow machine but near 100% there is doing "
        "all the machine allows."
    )
    return _finish(fig, f"Machines compared ({_what(rows)}, each machine's newest commit)", caption)


def optimizer_comparison(df: pd.DataFrame, dtype: str | None = None, max_trees: int = 4) -> CaptionedFigure:
    """Per tree, each variant's step time and fraction of its limit, optimizer by optimizer."""
    rows = latest(df[(df["benchmark"] == STEP_BENCHMARK) & df["available"]])
    rows = _one_of(rows, "dtype", dtype, "float32")
    names = [name for name in RULE_NAMES if name in set(rows["optimizer"])]
    if len(names) < 2:
        raise NothingToPlot(f"one optimizer only in the newest run ({', '.join(names) or 'none'})")
    fig = _time_and_fraction(rows.assign(group=rows["optimizer"]), names, "optimizer", max_trees)
    per_byte = ", ".join(f"{rule(n).title} {bytes_per_parameter_byte(n)[0]:g}" for n in names)
    caption = (
        "Top: bars side by side are one variant running each optimizer, shorter is faster; bottom: each bar is a "
        "share of its device's roof at the step's working set, so an optimizer that moves more bytes per "
        f"parameter byte ({per_byte}) may take longer and still be as near its limit."
    )
    return _finish(fig, f"Optimizers compared ({rows['dtype'].iloc[0]}, newest commit)", caption)


def machine_roofs_text(rows: pd.DataFrame, machines: list[str]) -> str:
    """``"m1 25.3-61.0 GB/s, m2 no limit"``: the range of each machine's roof over the working sets of ``rows``."""
    span = rows.groupby("machine")["limit_gbps"].agg(["min", "max"])
    return ", ".join(
        f"{m} {lo:.1f}-{hi:.1f} GB/s" if pd.notna(lo) else f"{m} no limit"
        for m, (lo, hi) in ((m, span.loc[m, ["min", "max"]]) for m in machines)
    )


def release_comparison(
    df: pd.DataFrame, machine: str | None = None, max_trees: int = 4, optimizer: str | None = None
) -> CaptionedFigure:
    """Per tree, each variant's step time under each MLX release, on one machine and commit."""
    table = by_release(df)
    if table.empty:
        raise NothingToPlot("no machine has results of two MLX releases on one commit (rmsprop-bench run --mlx)")
    machine = machine or table["machine"].value_counts().idxmax()
    table = table[table["machine"] == machine]
    releases = releases_in(table)
    table = _one_of(_one_of(table, "dtype", None, "float32"), "optimizer", optimizer, DEFAULT_RULE)
    long = table.melt(id_vars=["tree", "n_params", "n_leaves", "variant"], value_vars=releases, var_name="group",
                      value_name="median")  # fmt: skip
    trees = _trees_by_size(long)[:max_trees]
    fig, axes = _figure(len(trees), width=max(7.0, 3.4 * len(trees)))
    for ax, tree in zip(axes, trees):
        _grouped_bars(ax, long[long["tree"] == tree], releases, "median", 1e3)
        ax.set_title(tree, fontsize=10)
        ax.set_xlabel("variant")
        ax.set_ylabel("median step time (ms)")
    axes[0].legend(title="MLX", fontsize=8)
    ratios = table.dropna(subset=["ratio"])
    worst = (
        f"; the biggest slow-down from {releases[0]} to {releases[-1]} is {r['variant']} on {r['tree']}, "
        f"{r['ratio']:.2f}x the time"
        if len(ratios) and (r := ratios.loc[ratios["ratio"].idxmax()]) is not None
        else ""
    )
    caption = (
        f"Bars side by side are one variant under each MLX release ({', '.join(releases)}), same commit "
        f"({table['commit'].iloc[0][:8]}) and machine ({machine}); a taller bar on the right is slower in the "
        f"newer release{worst}."
    )
    return _finish(fig, f"MLX releases compared ({_what(table)})", caption)


#: Every figure by file name, in the order the report shows them.
FIGURES = {
    "variant_comparison": variant_comparison,
    "scaling": scaling,
    "fraction_of_limit": fraction_of_limit,
    "per_leaf_overhead": per_leaf_overhead,
    "speedup_heatmap": speedup_heatmap,
    "history": history,
}

#: Figures over several optimizers, machines or MLX releases, which the report draws only where the results hold
#: them.
COMPARISON_FIGURES = {
    "optimizer_comparison": optimizer_comparison,
    "machine_comparison": machine_comparison,
    "release_comparison": release_comparison,
}
