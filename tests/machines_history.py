"""Real asv results of two machines, and of two MLX releases on one of them, for the tracking tests.

One commit of a throw-away copy of this project is benchmarked three ways:
``asv run --machine machine-a`` and ``--machine machine-b`` in asv's ``existing``
environment (this test Python, as in ``asv_project``), and ``rmsprop-bench run
--mlx 0.31.2 0.32.4 --machine machine-a``, which builds one real virtualenv per
MLX release. The step benchmarks run on two small trees only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from asv_project import AsvHistory, chained_python, copy_project, git
from built_once import built_once

MACHINES = ("machine-a", "machine-b")
RELEASES = ("0.31.2", "0.32.4")
BENCHMARKS = r"^bench_step\.Step\.time_step|Bandwidth|Environment"


@dataclass
class MachinesHistory:
    history: AsvHistory
    #: The output of ``rmsprop-bench run --mlx``, whose results are in ``history`` too.
    release_run: subprocess.CompletedProcess


def machines_history(tmp_path_factory: pytest.TempPathFactory) -> MachinesHistory:
    """Built once per test session (``built_once``), shared by every module and worker that asks.

    The two machines' runs take about half a minute; the virtualenvs (installing two MLX releases, building
    the project's wheel in each) a few minutes on a busy 2-core machine.
    """
    return built_once(tmp_path_factory, "machines-history", _build)


def _build(workdir: Path) -> MachinesHistory:
    repo = copy_project(workdir / "repo")
    env = {
        **os.environ,
        "HOME": str(workdir / "home"),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
        "RMSPROP_BENCH_VARIANTS": "eager,flat", "RMSPROP_BENCH_TREES": "4x1K,16x256",
        "RMSPROP_BENCH_DTYPES": "float32",
        "RMSPROP_BENCH_NO_EXTENSION": "1",  # the virtualenvs: cpu_kernel is not measured here
    }  # fmt: skip
    (workdir / "home").mkdir()
    git(repo, "init", "-q", "-b", "main")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "the project"], check=True, env=env)
    history = AsvHistory(repo, chained_python(workdir / "env", repo), env, [git(repo, "rev-parse", "HEAD")], "")
    for machine in MACHINES:
        history.asv("machine", "--yes", "--machine", machine)
        history.asv(
            *("run", "--quick", "-E", f"existing:{history.python}", "--set-commit-hash", history.commits[0]),
            *("--machine", machine, "-b", BENCHMARKS),
        )
    rmsprop_bench = Path(sys.executable).with_name("rmsprop-bench")
    release_run = subprocess.run(
        [str(rmsprop_bench), "run", "--quick", "--project", str(history.repo), "--machine", MACHINES[0],
         "--mlx", *RELEASES, "-b", BENCHMARKS],
        env=history.env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return MachinesHistory(history, release_run)


def split_by_machine(history: AsvHistory, dest: Path) -> list[Path]:
    """One results directory per machine, as each CI runner uploads it."""
    dirs = []
    for machine in MACHINES:
        out = dest / f"results-{machine}"
        shutil.copytree(history.results_dir / machine, out / machine)
        shutil.copy2(history.results_dir / "benchmarks.json", out / "benchmarks.json")
        dirs.append(out)
    return dirs
