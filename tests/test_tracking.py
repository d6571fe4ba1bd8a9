"""Tracking across MLX releases and machines: asv's matrix on both platforms, and real results of two machines
and of two MLX releases (``machines_history``) through the loader, the report, the figures and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from asv import environment
from asv.config import Config
from machines_history import MACHINES, RELEASES, MachinesHistory, machines_history, split_by_machine

from rmsprop_impls.analysis import plots
from rmsprop_impls.analysis.regressions import find_release_regressions
from rmsprop_impls.analysis.results import load_asv_results, results_dirs
from rmsprop_impls.analysis.suite import mlx_matrix, read_conf, write_run_conf
from rmsprop_impls.analysis.tracking import by_machine, by_release, releases_in

ROOT = Path(__file__).resolve().parents[1]
RMSPROP_BENCH = str(Path(sys.executable).with_name("rmsprop-bench"))


def _environments(conf_path: Path, platform: str, monkeypatch) -> list[dict]:
    monkeypatch.setattr(sys, "platform", platform)
    conf = Config.load(str(conf_path))
    return [env.requirements for env in environment.get_environments(conf, None, verbose=False)]


CUDA13 = [r for r in read_conf(ROOT)["matrix"]["req"]["mlx-cuda-13"] if r]


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_asv_matrix_is_one_virtualenv_per_mlx_release_and_back_end_on_linux(platform, monkeypatch):
    """On Linux each release with mlx-cpu, and the CUDA entry with mlx-cuda-13; never both (one libmlx.so wins)."""
    envs = _environments(ROOT / "asv.conf.json", platform, monkeypatch)
    cpu = [env for env in envs if "mlx-cuda-13" not in env]
    assert sorted(env["mlx"] for env in cpu) == list(RELEASES)
    for env in cpu:
        assert env.get("mlx-cpu") == (env["mlx"] if platform == "linux" else None), env
    cuda = [env for env in envs if "mlx-cuda-13" in env]
    assert [(env["mlx"], env["mlx-cuda-13"], env.get("mlx-cpu")) for env in cuda] == (
        [(r, r, None) for r in CUDA13] if platform == "linux" else []
    )


def test_asv_conf_matrix_is_what_mlx_matrix_writes_for_its_releases():
    conf = read_conf(ROOT)
    assert CUDA13 and mlx_matrix(conf, conf["matrix"]["req"]["mlx"], cuda13=CUDA13) == conf


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_run_conf_for_other_releases(platform, monkeypatch, tmp_path):
    project = tmp_path / "repo"
    project.mkdir()
    (project / "asv.conf.json").write_text((ROOT / "asv.conf.json").read_text())
    subprocess.run(["git", "init", "-q", "-b", "main", str(project)], check=True)
    subprocess.run(["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q",
                    "--allow-empty", "-m", "empty"], check=True)  # fmt: skip
    envs = _environments(write_run_conf(project, ["0.30.0", "0.31.2", "0.32.4"]), platform, monkeypatch)
    assert sorted(env["mlx"] for env in envs) == ["0.30.0", "0.31.2", "0.32.4"]  # no CUDA entry without CUDA
    assert all(env.get("mlx-cpu") == (env["mlx"] if platform == "linux" else None) for env in envs)
    monkeypatch.setattr("rmsprop_impls.analysis.suite.cuda_here", lambda: True)
    envs = _environments(write_run_conf(project, ["0.31.2", "0.32.4"]), platform, monkeypatch)
    backends = ["cpu", "cuda13"] if platform == "linux" else ["metal"]
    got = sorted((env["mlx"], "cuda13" if env.get("mlx-cuda-13") else "cpu" if env.get("mlx-cpu") else "metal")
                 for env in envs)  # fmt: skip
    assert got == [(r, b) for r in ("0.31.2", "0.32.4") for b in backends]


@pytest.fixture(scope="module")
def machines(tmp_path_factory) -> MachinesHistory:
    return machines_history(tmp_path_factory)


@pytest.fixture(scope="module")
def history(machines):
    """Two machines' results of one commit, and machine-a's under two MLX releases (``rmsprop-bench run --mlx``)."""
    return machines.history


def test_loader_reads_two_machines_from_one_directory_or_several(history, tmp_path):
    merged = load_asv_results(history.results_dir)
    assert set(merged["machine"]) == set(MACHINES)
    split = split_by_machine(history, tmp_path)
    for source in (split, tmp_path):  # several directories; one holding several (downloaded CI artifacts)
        assert results_dirs(source) == split
        df = load_asv_results(source)
        assert set(df["machine"]) == set(MACHINES)
        existing = df[df["environment"].str.startswith("existing")]
        assert set(existing["mlx"]) == {mlx_installed()}  # tracked by bench_environment


def mlx_installed() -> str:
    from importlib.metadata import version

    return version("mlx")


def test_machine_comparison_per_tree_both_absolute_and_fraction(history, tmp_path):
    df = load_asv_results(split_by_machine(history, tmp_path))
    table = by_machine(df)
    assert set(table["machine"]) == set(MACHINES) and set(table["tree"]) == {"4x1K", "16x256"}
    assert set(table["optimizer"]) == {"rmsprop", "adamw"}  # the default subset's
    assert (table["median"] > 0).all() and (table["fraction_of_limit"] > 0).all()
    fig = plots.machine_comparison(df)
    assert len(fig.axes) == 4 and all(m in fig.caption for m in MACHINES)  # 2 trees x (time, fraction)
    assert "RMSprop, float32" in fig._suptitle.get_text()
    assert "AdamW" in plots.machine_comparison(df, optimizer="adamw")._suptitle.get_text()


def test_report_over_two_machines_directories(history, tmp_path):
    dirs = split_by_machine(history, tmp_path / "artifacts")
    out = subprocess.run(
        [RMSPROP_BENCH, "report", "--results", *map(str, dirs), "--out", str(tmp_path / "report")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Machines compared" in summary and all(f"{m} % of limit" in summary for m in MACHINES)
    assert "| optimizer | tree | dtype | variant | machine-a ms |" in summary and "| adamw | 4x1K |" in summary
    assert (tmp_path / "report" / "machine_comparison.png").is_file()


def test_run_mlx_records_each_release_in_its_own_virtualenv(machines):
    out, releases = machines.release_run, machines.history
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step time per MLX release" in out.stdout and all(f"MLX {r} ms" in out.stdout for r in RELEASES)
    df = load_asv_results(releases.results_dir)
    venvs = df[df["environment"].str.startswith("virtualenv") & (df["machine"] == MACHINES[0])]
    assert sorted(venvs["mlx"].unique()) == list(RELEASES)
    for release, runs in venvs.groupby("mlx"):
        tracked = runs[runs["benchmark"] == "bench_environment.Environment.track_mlx_release"]["median"]
        major, minor, patch = map(int, release.split("."))
        assert tracked.tolist() == [major * 10000 + minor * 100 + patch]  # the env really imported that release
    table = by_release(df)
    assert releases_in(table) == list(RELEASES) and set(table["tree"]) == {"4x1K", "16x256"}
    summary = (releases.repo / "report" / "summary.md").read_text()
    assert "## MLX releases compared" in summary and (releases.repo / "report" / "release_comparison.png").is_file()
    results = json.loads(next((releases.results_dir / MACHINES[0]).glob("*-virtualenv-*mlx0.31.2*.json")).read_text())
    assert results["params"]["mlx"] == "0.31.2"
    published = json.loads((releases.repo / ".asv" / "html" / "index.json").read_text())
    assert set(RELEASES) <= set(published["params"]["mlx"])  # the dashboard's MLX selector (run publishes it)


def test_a_slower_release_is_flagged_like_a_slower_commit(history):
    df = load_asv_results(history.results_dir)
    older = df[df["environment"].str.startswith("virtualenv") & (df["mlx"] == RELEASES[0])]
    newer = older.assign(mlx=RELEASES[-1])  # the same timings, but eager on 4x1K three times slower
    slowed = (newer["variant"] == "eager") & (newer["tree"] == "4x1K") & (newer["benchmark"].str.endswith("time_step"))
    newer.loc[slowed, "median"] *= 3
    found = find_release_regressions(pd.concat([older, newer]))
    expected = [["eager", "4x1K", optimizer, *RELEASES[::-1]] for optimizer in ("adamw", "rmsprop")]
    assert found[["variant", "tree", "optimizer", "mlx", "previous"]].values.tolist() == expected


def test_publish_merges_machines_into_one_report_and_dashboard(history, tmp_path):
    """What CI's publish job runs on the downloaded artifacts, in a clone that has no results of its own."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(history.repo), str(clone)], check=True)
    artifacts = tmp_path / "artifacts"
    split_by_machine(history, artifacts)
    out = subprocess.run(
        [RMSPROP_BENCH, "publish", str(artifacts), "--project", str(clone)],
        env=history.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"merged into {clone / '.asv' / 'results'}: {', '.join(MACHINES)}" in out.stdout
    assert "## Machines compared" in (clone / "report" / "summary.md").read_text()
    published = json.loads((clone / ".asv" / "html" / "index.json").read_text())
    assert sorted(published["params"]["machine"]) == sorted(MACHINES)  # the dashboard's machine selector
    assert published["benchmarks"]["bench_step.Step.time_step"]["param_names"][-1] == "optimizer"
    assert published["benchmarks"]["bench_step.Step.time_step"]["params"][-1] == ["'rmsprop'", "'adamw'"]
