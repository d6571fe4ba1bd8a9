"""The package installs beside the mlx a user already has and keeps it; the tests that need no GPU pass under
the oldest and the newest supported release; and a CUDA back-end stays after the README's command for it.

For each release: a throw-away virtualenv gets that mlx first (and mlx-cpu on Linux), then
``pip install <this repository>``; then the mlx version must be unchanged and :data:`RELEASE_TESTS`
must pass, run against the installed package, with ``cpu_kernel``'s extension built on first use
against that mlx and the GPU kernels' host simulations writing their source the way that release does.
The mlx wheels are kept in pytest's cache (``.pytest_cache``), everything else in pip's.
Without PyPI the tests are skipped. ``RMSPROP_BENCH_TEST_MLX_RELEASES="0.31.2"`` picks other
releases. It takes a few minutes per release: an install, a build of the extension and the tests.

The CUDA install needs no GPU: which ``libmlx.so`` ends up in the environment is a matter of files.
``mlx`` and ``mlx-cuda-13`` are installed with ``--no-deps`` (91 MB, without their NVIDIA libraries).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLDEST, NEWEST = "0.30.1", "0.32.4"
RELEASES = os.environ.get("RMSPROP_BENCH_TEST_MLX_RELEASES", f"{OLDEST} {NEWEST}").split()
#: The tests that need no GPU and touch what differs between MLX releases: every variant against stock and the
#: reference, the GPU kernels' generated source (MLX's own wrapper, per release) and launches, cpu_kernel, the
#: errors, the devices, auto's cache key (mx.device_info arrived in 0.30.4). Not the asv, docs, notebook, dashboard
#: and CLI tests (they read the checkout, not the release; test_choose's rankings take minutes).
RELEASE_TESTS = [
    *(f"tests/test_{name}.py" for name in ("agreement", "gpu_host", "gpu_kernels", "errors", "devices", "properties")),
    *(f"tests/test_{name}.py" for name in ("cpu_kernel", "cpu_kernel_paths")),
    "tests/test_choose.py::test_the_device_description_and_the_auto_cache_key_on_every_release",
    "tests/test_choose.py::test_the_choice_is_cached_reused_and_invalidated",
]


def mlx_requirements(release: str) -> list[str]:
    """mlx, and on Linux mlx-cpu (MLX's CPU back-end, Linux wheels only), at ``release``."""
    return [f"mlx=={release}"] + ([f"mlx-cpu=={release}"] if sys.platform == "linux" else [])


def run(command: list, **options) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=1200, **options)


def tail(done: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


def download(folder: Path, requirements: list[str], *options: str) -> None:
    """Each wheel once into ``folder``; skips the test without PyPI."""
    fetch = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", folder, *options, *requirements]
    done = run(fetch)
    if done.returncode != 0:
        pytest.skip(f"cannot download {' '.join(requirements)} (PyPI unreachable?): {tail(done, 1)}")


@pytest.fixture(scope="module")
def mlx_wheels(request) -> Path:
    """A folder holding each release's mlx wheels, downloaded once; skips the module without PyPI."""
    folder = Path(request.config.cache.mkdir("mlx-wheels"))
    for release in RELEASES:
        if len(list(folder.glob(f"mlx*-{release}-*.whl"))) < len(mlx_requirements(release)):
            download(folder, mlx_requirements(release))
    return folder


def virtualenv(where: Path) -> Path:
    made = run([sys.executable, "-m", "virtualenv", "--quiet", where])
    assert made.returncode == 0, tail(made)
    return where / "bin" / "python"


@pytest.mark.parametrize("release", RELEASES)
def test_installs_beside_an_mlx_release_keeps_it_and_the_tests_pass(release, mlx_wheels, tmp_path):
    env_dir = tmp_path / "venv"
    python = virtualenv(env_dir)
    pip = [python, "-m", "pip", "install", "--quiet", "--find-links", mlx_wheels]

    first = run([*pip, *mlx_requirements(release)])
    assert first.returncode == 0, tail(first)
    ours = run([*pip, REPO, "pytest", "hypothesis"])
    assert ours.returncode == 0, tail(ours)

    version = run([python, "-c", "import mlx.core; print(mlx.core.__version__)"])
    assert version.stdout.strip() == release, "installing the package changed mlx"
    where = run([python, "-c", "import rmsprop_impls; print(rmsprop_impls.__file__)"], cwd=tmp_path)
    assert str(env_dir) in where.stdout, "the test must import the installed package, not the checkout"

    environment = {k: v for k, v in os.environ.items() if not k.startswith("RMSPROP_BENCH_")}
    environment["RMSPROP_BENCH_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh build against this mlx
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-o", "addopts=", "-rs"]
    done = run([*tests, *(REPO / t for t in RELEASE_TESTS)], cwd=tmp_path, env=environment)
    assert done.returncode == 0, tail(done)
    assert "cpu_kernel unavailable" not in done.stdout, tail(done)  # its extension built against this mlx


def libmlx(python: Path) -> tuple[str, str]:
    """``(the package that installed mlx/lib/libmlx.so, its sha256)`` in ``python``'s environment."""
    code = """
import importlib.metadata as md, pathlib, sys
for dist in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"):
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        continue
    if any(str(f).endswith("mlx/lib/libmlx.so") for f in files):
        print(dist)
site = pathlib.Path(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
print(site / "mlx" / "lib" / "libmlx.so")
"""
    done = run([python, "-c", code])
    *owners, path = done.stdout.split()
    return ",".join(owners), hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's CUDA back-end has Linux wheels only")
def test_the_readme_command_for_a_cuda_machine_keeps_its_libmlx(request, tmp_path):
    """The README: on an NVIDIA machine, leave the back-end out (``-e .``). Then pip keeps ``mlx-cuda-13``'s
    ``libmlx.so``; with ``[cpu]``, ``mlx-cpu`` would write its own over it, which is why ``mlx-cpu`` is no
    dependency."""
    folder = Path(request.config.cache.mkdir("mlx-cuda-wheels"))
    wanted = [f"mlx=={NEWEST}", f"mlx-cuda-13=={NEWEST}"]
    if len(list(folder.glob(f"mlx*-{NEWEST}-*.whl"))) < 3:
        download(folder, [*wanted, f"mlx-cpu=={NEWEST}"])
    python = virtualenv(tmp_path / "venv")
    pip = [python, "-m", "pip", "install", "--quiet", "--find-links", folder]
    first = run([*pip, "--no-deps", *wanted])  # the NVIDIA libraries are not needed to see which files are there
    assert first.returncode == 0, tail(first)
    before = libmlx(python)
    assert before[0] == "mlx-cuda-13", before

    ours = run([*pip, "-e", REPO])
    assert ours.returncode == 0, tail(ours)
    assert libmlx(python) == before, "installing the package the README's way replaced MLX's CUDA back-end"
    listed = run([python, "-m", "pip", "list", "--format=freeze"]).stdout
    assert "mlx-cpu" not in listed and f"mlx-cuda-13=={NEWEST}" in listed, listed

    clash = run([*pip, "--no-deps", f"mlx-cpu=={NEWEST}"])  # what the old mlx-cpu dependency did: pip sees no clash
    assert clash.returncode == 0, tail(clash)
    assert libmlx(python)[1] != before[1], "this test could not tell the CPU library from the CUDA one"
    # cuda_kernel's reason names the clash: the package's own check, which reads files and imports no mlx
    ask = "import runpy, sys; print(runpy.run_path(sys.argv[1])['libmlx_backends']())"
    answer = run([python, "-c", ask, REPO / "rmsprop_impls" / "mlx_packages.py"], cwd=tmp_path)
    assert answer.stdout.strip() == "(['mlx-cpu', 'mlx-cuda-13'], 'mlx-cpu')", tail(answer)
