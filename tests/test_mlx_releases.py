"""The package installs beside the mlx a user already has, keeps it, and ``cpu_kernel`` works with it.

For each release: a throw-away virtualenv gets that mlx first (and mlx-cpu on Linux), then
``pip install <this repository>``; then the mlx version must be unchanged and the agreement
tests must pass for ``cpu_kernel``, whose extension is built on first use against that mlx.
The mlx wheels are kept in pytest's cache (``.pytest_cache``), everything else in pip's.
Without PyPI the test is skipped. ``RMSPROP_BENCH_TEST_MLX_RELEASES="0.30.1 0.31.2"`` picks
other releases. It takes a few minutes: two installs and two builds of the extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASES = os.environ.get("RMSPROP_BENCH_TEST_MLX_RELEASES", "0.31.2 0.32.4").split()


def mlx_requirements(release: str) -> list[str]:
    """mlx, and on Linux mlx-cpu (MLX's CPU back-end, Linux wheels only), at ``release``."""
    return [f"mlx=={release}"] + ([f"mlx-cpu=={release}"] if sys.platform == "linux" else [])


def run(command: list, **options) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=1200, **options)


def tail(done: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


@pytest.fixture(scope="module")
def mlx_wheels(request) -> Path:
    """A folder holding each release's mlx wheels, downloaded once; skips the module without PyPI."""
    folder = Path(request.config.cache.mkdir("mlx-wheels"))
    for release in RELEASES:
        if len(list(folder.glob(f"mlx*-{release}-*.whl"))) >= len(mlx_requirements(release)):
            continue  # downloaded by an earlier run
        fetch = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", folder, *mlx_requirements(release)]
        done = run(fetch)
        if done.returncode != 0:
            pytest.skip(f"cannot download mlx {release} (PyPI unreachable?): {tail(done, 1)}")
    return folder


@pytest.mark.parametrize("release", RELEASES)
def test_installs_beside_an_mlx_release_keeps_it_and_cpu_kernel_agrees(release, mlx_wheels, tmp_path):
    env_dir = tmp_path / "venv"
    made = run([sys.executable, "-m", "virtualenv", "--quiet", env_dir])
    assert made.returncode == 0, tail(made)
    python = env_dir / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--quiet", "--find-links", mlx_wheels]

    first = run([*pip, *mlx_requirements(release)])
    assert first.returncode == 0, tail(first)
    ours = run([*pip, REPO, "pytest"])
    assert ours.returncode == 0, tail(ours)

    version = run([python, "-c", "import mlx.core; print(mlx.core.__version__)"])
    assert version.stdout.strip() == release, "installing the package changed mlx"
    where = run([python, "-c", "import rmsprop_impls; print(rmsprop_impls.__file__)"], cwd=tmp_path)
    assert str(env_dir) in where.stdout, "the test must import the installed package, not the checkout"

    environment = {k: v for k, v in os.environ.items() if not k.startswith("RMSPROP_BENCH_")}
    environment["RMSPROP_BENCH_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh build against this mlx
    agreement = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-k", "cpu_kernel"]
    done = run([*agreement, REPO / "tests" / "test_agreement.py"], cwd=tmp_path, env=environment)
    assert done.returncode == 0, tail(done)  # 5 would mean no cpu_kernel test ran: it was unavailable
    assert " passed" in done.stdout and "skipped" not in done.stdout, tail(done)
