"""A throw-away copy of this project with real asv results over a few commits, one deliberately slowed.

asv's ``existing`` environment benchmarks whatever the given Python imports, and
asv drops ``PYTHONPATH``. So the copy gets a tiny virtualenv whose ``.pth`` puts
the copy's working tree first on ``sys.path`` and this test environment's
site-packages (mlx, asv, ...) after it: checking out a commit in the copy then
changes the code that asv measures, with nothing to build or install.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Appended to the eager variant's module in the slowed commit: every step sleeps 20 ms, far beyond noise.
SLOWDOWN = """

import time as _time

_unslowed = EagerOptimizer.update_leaves


def _slowed(self, *args):
    _time.sleep(0.02)
    return _unslowed(self, *args)


EagerOptimizer.update_leaves = _slowed
"""


#: What ``build_history`` runs on the commits between the first and the newest.
STEP_SUITES = r"^bench_(step|bandwidth|environment)\."


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def copy_project(dest: Path) -> Path:
    """The files git would commit from this checkout (tracked and untracked-not-ignored), plus built extensions."""
    listed = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    built = [p.relative_to(ROOT).as_posix() for p in (ROOT / "rmsprop_impls").rglob("*.so")]
    for rel in filter(None, listed + built):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def chained_python(env_dir: Path, project: Path) -> Path:
    """A virtualenv whose Python imports ``project`` first, then everything this Python has."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    env_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    lines = [str(project)] + [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(ours)]
    Path(env_site, "chain-to-test-env.pth").write_text("\n".join(lines) + "\n")
    return python


@dataclass
class AsvHistory:
    """A repo with results for ``commits`` (oldest first); ``slowed`` made ``eager`` 20 ms slower."""

    repo: Path
    python: Path
    env: dict
    commits: list[str]
    slowed: str

    @property
    def results_dir(self) -> Path:
        return self.repo / ".asv" / "results"

    @property
    def html_dir(self) -> Path:
        return self.repo / ".asv" / "html"

    def asv(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run asv in the repo; ``env`` adds to (or overrides) the history's environment variables."""
        asv = Path(sys.executable).with_name("asv")
        return subprocess.run(
            [str(asv), *args],
            cwd=self.repo,
            env={**self.env, **(env or {})},
            check=check,
            capture_output=True,
            text=True,
        )


def build_history(
    workdir: Path,
    variants: str = "eager,flat",
    trees: str = "4x1K",
    commits_each_side: int = 2,
    optimizers: str = "rmsprop",
) -> AsvHistory:
    """Commit the project, a few harmless commits, the slowdown, a few more; run asv on each commit (the whole
    suite on the first and the newest, the step suites on those between).

    The step suites time ``optimizers`` only: RMSprop alone by default, so that a results file of this history
    less its one-valued ``optimizer`` parameter is one from before that parameter.
    """
    repo = copy_project(workdir / "repo")
    env = {
        **os.environ,
        "HOME": str(workdir / "home"),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
        "RMSPROP_BENCH_VARIANTS": variants, "RMSPROP_BENCH_TREES": trees, "RMSPROP_BENCH_DTYPES": "float32",
        "RMSPROP_BENCH_OPTIMIZERS": optimizers,
        "RMSPROP_BENCH_ROOF_MAX_MIB": "16",  # the trees here are tiny: a roof to 16 MiB takes a second, not ten
        # One training-step case per commit: stock AdamW on mlx-lm's tiny Llama, both step kinds (about 10 s).
        "RMSPROP_BENCH_TRAIN_MODELS": "llama-tiny", "RMSPROP_BENCH_TRAIN_RULES": "adamw",
        "RMSPROP_BENCH_TRAIN_VARIANTS": "stock",
    }  # fmt: skip
    (workdir / "home").mkdir()
    history = AsvHistory(repo, chained_python(workdir / "env", repo), env, [], "")

    def commit(message: str) -> None:
        # One commit an hour, so the dashboard's time axis and asv's ordering agree.
        date = {"GIT_AUTHOR_DATE": f"2026-01-01T{len(history.commits):02d}:00:00Z"}
        date["GIT_COMMITTER_DATE"] = date["GIT_AUTHOR_DATE"]
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True, env={**env, **date})
        history.commits.append(git(repo, "rev-parse", "HEAD"))

    git(repo, "init", "-q", "-b", "main")
    commit("the project")
    for i in range(commits_each_side - 1):
        (repo / "CHANGES").write_text(f"harmless change {i}\n")
        commit(f"harmless change {i}")
    with open(repo / "rmsprop_impls" / "variants" / "eager.py", "a") as f:
        f.write(SLOWDOWN)
    commit("make eager slower")
    history.slowed = history.commits[-1]
    for i in range(commits_each_side - 1):
        (repo / "CHANGES").write_text(f"later change {i}\n")
        commit(f"later change {i}")
    history.asv("machine", "--yes", "--machine", "test-machine")
    for sha in history.commits:
        git(repo, "checkout", "-q", sha)
        # The step suites (where the slowdown shows) and the limits they are read against on every commit; the
        # whole suite on the first and the newest.
        only_steps = [] if sha in (history.commits[0], history.commits[-1]) else ["--bench", STEP_SUITES]
        history.asv(
            *("run", "--quick", "-E", f"existing:{history.python}", "--set-commit-hash", sha),
            *("--machine", "test-machine", *only_steps),
        )
    git(repo, "checkout", "-q", "main")
    return history
