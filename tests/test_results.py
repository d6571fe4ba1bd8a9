"""The results loader, regression detection, figures and report, on results that real asv runs produced."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from analysis_history import UNAVAILABLE, analysis_history
from test_cli import cli

from rmsprop_impls.analysis import plots
from rmsprop_impls.analysis.regressions import find_regressions
from rmsprop_impls.analysis.report import winners, write_report
from rmsprop_impls.analysis.results import (
    COLUMNS,
    FRACTION_BENCHMARK,
    LIMIT_BENCHMARK,
    STEP_BENCHMARK,
    ResultsError,
    bytes_per_parameter_byte,
    case_params,
    latest,
    load_asv_results,
    run_roofs,
)
from rmsprop_impls.analysis.training_report import GRADIENT_STEP, PEAK_MEMORY, UPDATE_ALONE, training_steps
from rmsprop_impls.measure.roof import working_set
from rmsprop_impls.measure.training_models import mlx_lm_missing


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    return analysis_history(tmp_path_factory)


@pytest.fixture(scope="module")
def rich_df(rich):
    return load_asv_results(rich.results_dir)


def test_one_row_per_measurement_with_sizes_and_throughput(asv_history):
    df = load_asv_results(asv_history.results_dir)
    assert set(COLUMNS) <= set(df.columns) and df["started_at"].notna().all()
    assert sorted(df["commit"].unique()) == sorted(asv_history.commits)
    assert df["commit_date"].is_monotonic_increasing and (df["machine"] == "test-machine").all()
    steps = df[df["benchmark"] == STEP_BENCHMARK]
    assert len(steps) == 2 * len(asv_history.commits)  # eager and flat on 4x1K float32, per commit
    assert (steps["n_leaves"] == 4).all() and (steps["n_params"] == 4096).all() and (steps["dtype"] == "float32").all()
    assert (steps["optimizer"] == "rmsprop").all()
    assert steps["gbps"].tolist() == pytest.approx((5 * 4 * 4096 / steps["median"] / 1e9).tolist())
    eager = steps[steps["variant"] == "eager"].set_index("commit")["median"]
    slowed_from = asv_history.commits.index(asv_history.slowed)
    assert [eager[c] > 0.02 for c in asv_history.commits] == [i >= slowed_from for i in range(len(eager))]
    assert steps["available"].all() and (steps["limit_gbps"] > 0).all()
    # Each step's fraction is its track_fraction_of_limit's, timed beside the roof's kernels, not time_step's GB/s
    # over the run's roof.
    together = df[df["benchmark"] == FRACTION_BENCHMARK].set_index(["commit", "variant"])["median"]
    assert steps["fraction_of_limit"].tolist() == together[list(zip(steps["commit"], steps["variant"]))].tolist()


def test_skipped_variant_is_a_row_with_its_reason_and_the_limit_is_the_runs_roof(rich_df):
    skipped = rich_df[rich_df["variant"] == UNAVAILABLE]
    assert len(skipped) and not skipped["available"].any() and skipped["median"].isna().all()
    assert skipped["skip_reason"].str.contains("NotImplementedError").all()
    newest = rich_df[rich_df["commit"] == rich_df["commit"].iloc[-1]]
    roof = run_roofs(newest)["cpu"]
    assert roof.beyond_caches == newest.loc[newest["benchmark"] == LIMIT_BENCHMARK, "median"].item() > 0
    assert len(roof.working_sets) > 1 and roof.last_level_cache  # the sweep, as asv tracked it
    steps = newest[(newest["benchmark"] == STEP_BENCHMARK) & newest["available"]]
    assert set(steps["optimizer"]) == {"rmsprop", "adamw"}
    touched = steps["optimizer"].map({"rmsprop": 12, "adamw": 16})  # w, g and v; w, g, m and v; in float32
    at_working_sets = [roof.at(b * n) for b, n in zip(touched, steps["n_params"])]
    assert steps["limit_gbps"].tolist() == pytest.approx(at_working_sets)
    moved = steps["optimizer"].map({"rmsprop": 20, "adamw": 28})  # reads and writes per float32 parameter
    assert steps["gbps"].tolist() == pytest.approx((moved * steps["n_params"] / steps["median"] / 1e9).tolist())


@pytest.mark.parametrize(
    "optimizer, moved, touched", [("rmsprop", 5, 3), ("adamw", 7, 4), ("adam", 7, 4), ("sgd", 3, 2), ("lion", 5, 3)]
)
def test_each_rule_moves_and_touches_its_own_arrays(optimizer, moved, touched):
    assert bytes_per_parameter_byte(optimizer) == (moved, pytest.approx(touched))
    assert working_set(moved * 1000, optimizer) == pytest.approx(touched * 1000)


def test_results_from_before_the_optimizer_parameter_read_as_rmsprop(asv_history, tmp_path):
    """The history times RMSprop alone, so its files less the one-valued parameter are as an older suite wrote them."""
    results = shutil.copytree(asv_history.results_dir, tmp_path / "results")
    index = json.loads((results / "benchmarks.json").read_text())
    for path in results.glob("test-machine/*-existing-*.json"):
        run = json.loads(path.read_text())
        params_at = run["result_columns"].index("params")
        for name, entry in run["results"].items():
            if name.startswith("bench_step."):
                assert entry[params_at][-1] == ["'rmsprop'"]
                entry[params_at] = entry[params_at][:-1]
                index[name]["param_names"] = index[name]["param_names"][:-1]
                index[name]["params"] = index[name]["params"][:-1]
        path.write_text(json.dumps(run))
    (results / "benchmarks.json").write_text(json.dumps(index))
    old, new = load_asv_results(results), load_asv_results(asv_history.results_dir)
    steps = old["benchmark"].str.startswith("bench_step.")
    assert steps.any() and (old.loc[steps, "optimizer"] == "rmsprop").all()
    assert old.equals(new)  # the same table, with the parameter or without


def test_missing_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(ResultsError, match=f"no asv results directory at {tmp_path / 'nope'}"):
        load_asv_results(tmp_path / "nope")
    with pytest.raises(ResultsError, match=f"no asv results in {tmp_path}"):
        load_asv_results(tmp_path)


def test_corrupt_and_truncated_files_are_named_and_skipped(asv_history, tmp_path):
    results = shutil.copytree(asv_history.results_dir, tmp_path / "results")
    files = sorted(results.glob("test-machine/*-existing-*.json"))
    truncated, corrupt = files[0], files[1]
    truncated.write_text(truncated.read_text()[:200])
    corrupt.write_text('{"version": 2, "results": 7}')
    with pytest.warns(UserWarning) as caught:
        df = load_asv_results(results)
    messages = " ".join(str(w.message) for w in caught)
    assert str(truncated) in messages and str(corrupt) in messages
    assert [p for p, _ in df.attrs["skipped_files"]] == [str(truncated), str(corrupt)]
    assert df["commit"].nunique() == len(files) - 2
    for path in files[2:]:
        path.write_text("")
    with warnings.catch_warnings(), pytest.raises(ResultsError, match="unreadable: .*" + files[-1].name):
        warnings.simplefilter("ignore")
        load_asv_results(results)


def test_step_detection_finds_the_planted_regression(asv_history):
    found = find_regressions(load_asv_results(asv_history.results_dir))
    # --quick runs time one sample, so step detection may also flag noise; the planted 20 ms stands out among the
    # step suites (the peers, run on the first and newest commits only, are other libraries' noise).
    is_planted = (found["variant"] == "eager") & (found["commit"] == asv_history.slowed)
    planted = found[is_planted & (found["benchmark"] == STEP_BENCHMARK)]
    others = found[~is_planted & found["benchmark"].str.startswith("bench_step.")]
    assert len(planted) == 1 and planted["ratio"].item() > max(others["ratio"], default=1.0)
    assert planted["previous"].item() == asv_history.commits[asv_history.commits.index(asv_history.slowed) - 1]
    assert planted["after"].item() > 0.02 > planted["before"].item()


@pytest.mark.parametrize("name", list(plots.FIGURES))
def test_every_figure_has_a_title_labelled_axes_and_a_caption(name, rich_df, tmp_path):
    fig = plots.FIGURES[name](rich_df)
    assert fig._suptitle.get_text()
    plotted = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax in plotted:
        assert "(" in ax.get_xlabel() or ax.get_xlabel() in ("variant", "tree"), ax.get_xlabel()
        assert "(" in ax.get_ylabel() or ax.get_ylabel() == "variant", ax.get_ylabel()
    assert fig.caption.endswith(".") and fig.caption.count(". ") == 0  # one sentence
    fig.savefig(tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_unavailable_variants_are_drawn_as_such(rich_df):
    fig = plots.variant_comparison(rich_df)
    for ax in fig.axes:
        assert UNAVAILABLE in [t.get_text() for t in ax.get_xticklabels()]
        assert any("unavailable" in t.get_text() for t in ax.texts)


def test_scaling_draws_the_roof_and_history_names_the_commit(rich_df, asv_history):
    (ax,) = plots.scaling(rich_df).axes
    assert any(line.get_label().startswith("cpu roof") for line in ax.get_lines())
    fig = plots.history(load_asv_results(asv_history.results_dir))
    assert any(f"regression in {asv_history.slowed[:8]}" in t.get_text() for t in fig.axes[0].texts)
    assert asv_history.slowed[:8] in fig.caption


def test_winners_pick_the_fastest_measured_variant(rich_df):
    table = winners(rich_df)
    newest = rich_df[(rich_df["commit"] == rich_df["commit"].iloc[-1]) & (rich_df["benchmark"] == STEP_BENCHMARK)]
    assert sorted(set(table["optimizer"])) == ["adamw", "rmsprop"]
    for row in table.itertuples():
        ran = newest[(newest["tree"] == row.tree) & (newest["optimizer"] == row.optimizer) & newest["available"]]
        assert row.median == ran["median"].min() and row.variant != UNAVAILABLE
        eager = ran.loc[ran["variant"] == "eager", "median"].item()
        assert row.speedup == pytest.approx(eager / row.median)


def test_figures_draw_one_optimizer_and_the_comparison_draws_each(rich_df):
    assert "RMSprop, float32" in plots.variant_comparison(rich_df)._suptitle.get_text()
    assert "AdamW, float32" in plots.fraction_of_limit(rich_df, optimizer="adamw")._suptitle.get_text()
    fig = plots.optimizer_comparison(rich_df)
    assert len(fig.axes) == 6 and "RMSprop 5, AdamW 7" in fig.caption  # 3 trees x (time, fraction)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["rmsprop", "adamw"]
    for ax in fig.axes:
        assert len(ax.patches) == 2 * 2  # eager and flat (the unavailable one has no bar), each optimizer
    with pytest.raises(plots.NothingToPlot, match="one optimizer only"):
        plots.optimizer_comparison(rich_df[rich_df["optimizer"] != "adamw"])


def test_report_command_writes_figures_and_a_summary(asv_history, tmp_path):
    out = cli("report", "--results", str(asv_history.results_dir), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Fastest variant per optimizer and tree" in summary and "| rmsprop | 4x1K | float32 |" in summary
    assert f"| eager/4x1K/float32/rmsprop | {asv_history.slowed[:8]} |" in summary
    assert sorted(p.stem for p in (tmp_path / "report").glob("*.png")) == sorted(plots.FIGURES)


def test_report_says_which_figures_it_could_not_draw(rich_df, tmp_path):
    summary = write_report(rich_df[rich_df["benchmark"] == LIMIT_BENCHMARK], tmp_path).read_text()
    assert "**Memory-bandwidth roof:**" in summary and " GB/s beyond the caches" in summary
    assert summary.count("not drawn: no 'bench_step.Step.time_step' results") == len(plots.FIGURES)


def test_report_on_a_bad_directory_is_one_line(tmp_path):
    out = cli("report", "--results", str(tmp_path / "missing"), "--out", str(tmp_path / "report"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no asv results directory" in out.stderr


@pytest.mark.skipif(mlx_lm_missing() is not None, reason=str(mlx_lm_missing()))
def test_the_report_shows_the_training_steps_beside_the_optimizer_steps(asv_history, tmp_path):
    df = load_asv_results(asv_history.results_dir)
    table = training_steps(df)
    assert set(zip(table["step"], table["variant"])) == {("compiled", "stock"), ("uncompiled", "stock")}
    assert (table["speedup"] == 1.0).all() and (table["alone_s"] > 0).all() and (table["peak_bytes"] > 0).all()
    assert (table["in_step_s"] == table["step_s"] - df_grad(df, table["step"])).all()
    summary = write_report(df, tmp_path).read_text()
    assert summary.index("## Fastest variant per optimizer and tree") < summary.index("## Per training step")
    assert "| llama-tiny | compiled | adamw | stock |" in summary


def test_a_run_of_some_training_benchmarks_only_reports_what_it_has(asv_history, tmp_path):
    """``asv run -b`` can leave the whole step without its peak memory or its update alone (a regex such as
    ``Step.time_step`` matches ``TrainStep.time_step`` only): their columns are empty, the rows stay."""
    df = load_asv_results(asv_history.results_dir)
    df = df[~df["benchmark"].isin([PEAK_MEMORY, UPDATE_ALONE, GRADIENT_STEP])]
    table = training_steps(df)
    assert len(table) == 2 and table["step_s"].gt(0).all()
    assert table[["peak_bytes", "alone_s", "in_step_s"]].isna().all().all()
    assert "| llama-tiny | compiled | adamw | stock |" in write_report(df, tmp_path).read_text()


def df_grad(df, steps):
    """The forward-and-backward time of the newest run for each step kind in ``steps``."""
    newest = latest(df[df["benchmark"] == "bench_train.GradientStep.time_step"])
    by_kind = {case_params(c)["step"]: m for c, m in zip(newest["case"], newest["median"])}
    return steps.map(by_kind)
