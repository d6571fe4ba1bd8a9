"""Run the asv suite on the current commit with the Python at hand, or in virtualenvs across MLX releases.

``rmsprop-bench run`` is this module behind a command line. It benchmarks the
installed package through asv's ``existing`` environment (this Python), so it
starts in seconds and needs no build; ``asv run`` in the checkout builds real
virtualenvs instead, one per MLX release in asv.conf.json's matrix, and
``rmsprop-bench run --mlx`` does too, for the releases it is given. asv saves a commit's results once all its benchmarks
have run, and an interrupted run puts back every results file as it was
before (:class:`KeptResults`), whatever asv managed to write.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..measure.mlx_settings import MEMORY_LIMIT_MB, describe_cache_limit, memory_cap, on_cpu_allocator

#: asv prefixes each line of progress with ``[ 12.50%]``.
_PROGRESS = re.compile(r"^\[\s*(\d+(?:\.\d+)?)%\]")


class ProjectNotFoundError(FileNotFoundError):
    """No asv project (a git checkout with ``asv.conf.json``) where one was looked for."""


def find_project(explicit: Path | None = None) -> Path:
    """The checkout to benchmark: ``explicit``, else the one this package runs from, else the one around the cwd.

    With an editable install (the README's command) the package itself lives
    in the checkout, so the command works from any directory.
    """
    candidates = [explicit] if explicit else [Path(__file__).resolve().parents[1], Path.cwd(), *Path.cwd().parents]
    for path in candidates:
        if (path / "asv.conf.json").is_file() and (path / ".git").exists():
            return path
    raise ProjectNotFoundError(
        f"no asv project (a git checkout with asv.conf.json) at {explicit}"
        if explicit
        else "no asv project found: run from a clone of rmsprop-bench (pip install -e .) or pass --project"
    )


def read_conf(project: Path) -> dict:
    return json.loads((project / "asv.conf.json").read_text())


def mlx_matrix(conf: dict, releases: Sequence[str], cuda13: Sequence[str] = ()) -> dict:
    """``conf`` with its matrix holding ``releases`` of MLX: one virtualenv each, on macOS and Linux alike, and on
    Linux one more per release in ``cuda13`` with MLX's CUDA 13 back-end.

    On Linux MLX's back-end is a separate package, ``mlx-cpu`` or ``mlx-cuda-13``
    (``mlx[cpu]``, ``mlx[cuda13]``; asv drops extras), with Linux wheels only,
    and exactly one may be installed (both ship ``mlx/lib/libmlx.so``). asv
    crosses every matrix entry with every other, so each back-end is "none" or
    one of the releases, and exclude rules (which match ``sys_platform`` too)
    keep on Linux the pairs of one release and one back-end, and elsewhere
    ``mlx`` alone. asv.conf.json holds this for its own releases (a test checks).
    """
    release = [re.escape(r) for r in releases]
    backends = {"mlx-cpu": list(releases), **({"mlx-cuda-13": list(cuda13)} if cuda13 else {})}
    exclude = [
        {"sys_platform": "linux", "req": dict.fromkeys(backends)},  # no back-end at all
        *({"sys_platform": "(?!linux$).*", "req": {b: ".+"}} for b in backends),
        *([{"req": dict.fromkeys(backends, ".+")}] if cuda13 else []),  # two: one libmlx.so would win
        *({"req": {"mlx": r, b: f"(?!{r}$).+"}} for b in backends for r in release),
    ]
    req = {k: v for k, v in conf["matrix"]["req"].items() if k not in ("mlx", "mlx-cpu", "mlx-cuda-13")}
    req = {"mlx": list(releases), **{b: [None, *rs] for b, rs in backends.items()}, **req}
    return {**conf, "matrix": {**conf["matrix"], "req": req}, "exclude": exclude}


def cuda_here() -> bool:
    """Whether the running MLX has its CUDA back-end and a GPU."""
    import mlx.core as mx

    return mx.cuda.is_available()


def write_run_conf(project: Path, mlx: Sequence[str] | None = None) -> Path:
    """The project's asv configuration, tracking the checked-out branch; returns the file to pass as ``--config``.

    asv refuses a checkout without the configured ``main`` branch, and its
    dashboard draws only commits on the configured branches, so a clone of a
    feature branch gets its own branch here (``HEAD`` when detached). ``mlx``
    replaces the matrix's MLX releases (:func:`mlx_matrix`): with MLX's CUDA 13 back-end too where this MLX runs
    on CUDA, with the CPU back-end alone elsewhere (a CUDA environment would pull NVIDIA's libraries for nothing).
    """
    conf = mlx_matrix(read_conf(project), mlx, cuda13=mlx if cuda_here() else ()) if mlx else read_conf(project)
    for key, default in [("repo", "."), ("benchmark_dir", "benchmarks"), ("env_dir", "env"), ("results_dir", "results"),
                         ("html_dir", "html")]:  # fmt: skip
        conf[key] = str((project / conf.get(key, default)).resolve())
    branch = _git(project, "rev-parse", "--abbrev-ref", "HEAD")
    has_main = subprocess.run(["git", "-C", str(project), "rev-parse", "--verify", "-q", "main"], capture_output=True)
    conf["branches"] = list(dict.fromkeys(["main"] * (has_main.returncode == 0) + [branch]))
    path = Path(conf["results_dir"]).parent / "rmsprop-bench.conf.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conf, indent=4) + "\n")
    return path


@dataclass
class RunSettings:
    """What a run measures and the MLX settings it sets deliberately; all of it is printed with the results."""

    full: bool = False
    quick: bool = False
    bench: list[str] | None = None
    cache_limit_mb: int | None = None  # None: 8 GiB on the CPU, MLX's own default on a GPU (measure.mlx_settings)
    compile_dir: Path | None = None  # TMPDIR, where mx.compile caches its g++ kernels
    machine: str | None = None
    mlx: list[str] | None = None  # MLX releases, one virtualenv each; None: this Python (asv's existing environment)
    optimizers: list[str] | None = None  # rules of both step suites; None: the grid's own (RMSprop, AdamW by default)

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.cache_limit_mb is not None:
            env["RMSPROP_BENCH_CACHE_LIMIT_MB"] = str(self.cache_limit_mb)
        if self.full:
            env["RMSPROP_BENCH_GRID"] = "full"
        if self.optimizers:
            env["RMSPROP_BENCH_OPTIMIZERS"] = env["RMSPROP_BENCH_TRAIN_RULES"] = ",".join(self.optimizers)
        if self.compile_dir:
            self.compile_dir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.compile_dir)
        return env

    def describe(self) -> str:
        grid = "full grid" if self.full else "default subset"
        if self.optimizers:
            grid += f" of {', '.join(self.optimizers)}"
        compile_dir = self.compile_dir or os.environ.get("TMPDIR", "/tmp")
        memory_mb = int(os.environ.get("RMSPROP_BENCH_MEMORY_LIMIT_MB", MEMORY_LIMIT_MB))
        where = (
            f"MLX {', '.join(self.mlx)} in asv virtualenvs (the committed HEAD, built by asv)"
            if self.mlx
            else f"MLX {_installed_mlx()} (this Python)"
        )
        # Only MLX's CPU back-end builds mx.compile kernels with a C++ compiler and caches them under $TMPDIR/mlx.
        compile_cache = f"; mx.compile kernel cache under TMPDIR={compile_dir}" if on_cpu_allocator() else ""
        return f"{grid}; {where}; {describe_cache_limit(self.cache_limit_mb)}; {memory_cap(memory_mb)}{compile_cache}"


def _installed_mlx() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx")
    except PackageNotFoundError:
        return "not installed"


def asv_command(project: Path, command: str, *args: str, mlx: Sequence[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "asv", command, "--config", str(write_run_conf(project, mlx)), *args]


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True, text=True).stdout.strip()


def git_head(project: Path) -> str:
    return _git(project, "rev-parse", "HEAD")


class KeptResults:
    """The results files as they were before a run, to put back if the run is interrupted.

    asv writes nothing before a commit's benchmarks have all run, but a Ctrl-C that lands
    while it saves (or just after, while this process still reads its output) would keep
    part of a run the user stopped. Results files are small JSON; all of them are kept.
    """

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir
        self.files = {p: p.read_bytes() for p in self._json_files()}

    def _json_files(self) -> list[Path]:
        return sorted(self.results_dir.rglob("*.json")) if self.results_dir.is_dir() else []

    def restore(self) -> None:
        for path in self._json_files():
            if path not in self.files:
                path.unlink()
        for path, data in self.files.items():
            if not path.is_file() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                staged = path.with_name(path.name + ".restoring")
                staged.write_bytes(data)
                staged.replace(path)


def run_benchmarks(project: Path, settings: RunSettings, python: str, on_line: Callable[[str], None]) -> int:
    """``asv run`` for HEAD with ``python``, a progress bar from asv's ``[ NN%]`` lines; returns asv's exit status.

    With ``settings.mlx``, asv builds HEAD in one virtualenv per MLX release instead of using ``python``
    (named by a hash file: ``HEAD^!`` has no parent to exclude on a first commit). Ctrl-C reaches
    asv too (same process group); a SIGINT sent to this process alone is passed on, so asv stops
    its benchmark and saves nothing partial.
    """
    env = {**settings.environment(dict(os.environ)), "PYTHONUNBUFFERED": "1"}  # asv's lines as they happen
    machine = ["--machine", settings.machine] if settings.machine else []
    subprocess.run(
        asv_command(project, "machine", "--yes", *machine), cwd=project, env=env, check=True, capture_output=True
    )
    if settings.mlx:
        hashes = Path(read_conf(project).get("results_dir", "results")).parent / "rmsprop-bench.hashes"
        (project / hashes).parent.mkdir(parents=True, exist_ok=True)
        (project / hashes).write_text(git_head(project) + "\n")
        args = [f"HASHFILE:{project / hashes}", "--show-stderr", *machine]
    else:
        args = ["-E", f"existing:{python}", "--set-commit-hash", git_head(project), "--show-stderr", *machine]
    if settings.quick:
        args.append("--quick")
    for regex in settings.bench or []:
        args += ["-b", regex]
    with subprocess.Popen(
        asv_command(project, "run", *args, mlx=settings.mlx),
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as asv:
        try:
            with tqdm(
                total=100, desc="asv run", unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}]"
            ) as bar:
                for line in asv.stdout:
                    on_line(line)
                    match = _PROGRESS.match(line)
                    if match and float(match[1]) > bar.n:
                        bar.update(float(match[1]) - bar.n)
        except KeyboardInterrupt:
            asv.send_signal(signal.SIGINT)
            asv.wait()
            raise
    return asv.returncode
