"""Builds the ``cpu_kernel`` C++ extension with CMake against the running Python's mlx, and caches it per user.

Installing the package never builds the extension: it is built on first use,
the way ``torch.utils.cpp_extension.load`` builds, so that it always matches
the mlx installed at run time (MLX's C++ ABI changes between releases) and
the package never needs to pin or replace the user's mlx. ``__init__.py``
loads it; this module builds it.

- :func:`build_extension` runs CMake into a directory. The CI lanes call it
  with their own toolchain and sanitizer options.
- :func:`cached_extension` gives the cached build for the running mlx, and
  builds it on first use. The cache entry is keyed by the mlx version, the
  Python tag, the platform and a hash of the sources. A lock keeps two
  processes from building it at once (asv runs benchmarks in many processes).
  A failed build records why, and it is not retried until its inputs change
  (the sources, mlx, ``CXX``, the cmake found) or a rebuild is forced.

``python -m rmsprop_impls.kernels._cpu_ext.build`` builds it into the cache now
if it is not there (asv's install step runs it, so that no benchmark waits for
it), ``--force`` rebuilds it, and ``--out DIR`` builds into DIR instead, for
``$RMSPROP_BENCH_CPU_EXT_DIR``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
#: The files whose contents key the cache: a change to any of them means a new build.
SOURCE_PATTERNS = ("*.cpp", "*.cc", "*.h", "*.hpp", "*.cmake", "CMakeLists.txt", "build.py")
LOG_NAME = "build.log"
FAILURE_NAME = "failure.json"

#: nanobind releases by the version of their internal data structures. An extension shares mlx.core's
#: types (mx.array) only when both were built with nanobind internals of one version; mlx records its own.
NANOBIND_FOR_INTERNALS = {17: "2.10.2", 18: "2.11.0", 19: "2.12.0", 20: "2.14.0", 21: "2.15.0", 22: "3.1.0"}


class BuildError(RuntimeError):
    """The extension could not be built; ``reason`` is one line, ``log`` the full build log (if any)."""

    def __init__(self, reason: str, log: Path | None = None):
        self.reason = reason
        self.log = log
        super().__init__(reason if log is None else f"{reason} (build log: {log})")


# ------------------------------------------------------------------ building ---


def find_cmake() -> str | None:
    """CMake from this environment (the ``cmake`` wheel, a dependency) first, then from ``PATH``."""
    beside_python = Path(sys.executable).parent / "cmake"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    try:
        import cmake

        bundled = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if bundled.is_file():
            return str(bundled)
    except (ImportError, AttributeError):
        pass
    return shutil.which("cmake")


def build_extension(out_dir: Path, *, cmake_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Path:
    """Configures and builds ``_ext`` into ``out_dir`` (the CMake tree in ``out_dir/build``) and returns the ``.so``.

    ``cmake_args`` go to the configure step after this module's own (``-DCMAKE_TOOLCHAIN_FILE=...``,
    ``-DRMSPROP_SANITIZE=address,undefined``, ``-DRMSPROP_MLX_LIB_DIR=...``); ``env`` is added to
    ``os.environ`` for both steps (``CXX`` picks the compiler). Raises :class:`BuildError` with the
    compiler's first error line, or CMake's, and keeps the whole log in ``out_dir/build.log``.
    """
    if sys.platform not in ("linux", "darwin"):
        raise BuildError(f"unsupported platform: {sys.platform} (it builds on Linux and macOS)")
    cmake = find_cmake()
    if cmake is None:
        raise BuildError("cmake not found (pip install cmake)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    build_dir = out_dir / "build"
    shutil.rmtree(build_dir, ignore_errors=True)  # a fresh configure, so that CXX is honoured
    for stale in out_dir.glob("_ext*.so"):
        stale.unlink()
    log_path = out_dir / LOG_NAME
    environment = {**os.environ, **(env or {})}
    own_args = [f"-DPython_EXECUTABLE={sys.executable}", f"-DRMSPROP_OUTPUT_DIR={out_dir}"]
    if not any(arg.startswith("-Dnanobind_ROOT") for arg in cmake_args):
        own_args.append(f"-Dnanobind_ROOT={nanobind_cmake_dir(cache_root())}")
    steps = [
        [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *own_args, *cmake_args],
        [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)],
    ]
    # A failed parallel build runs again on one job: compilers writing at once interleave their error lines.
    serial = [cmake, "--build", str(build_dir), "--parallel", "1"]
    with open(log_path, "w") as log:
        for step in steps:
            failed = _run_logged(step, log, log_path, environment)
            if failed is not None and step is steps[-1]:
                failed = _run_logged(serial, log, log_path, environment) or failed
            if failed is not None:
                hint = known_cause(failed)
                raise BuildError(first_error(failed) + (f"; {hint}" if hint else ""), log_path)
    built = sorted(out_dir.glob("_ext*.so"))
    if not built:
        raise BuildError(f"the build made no _ext*.so in {out_dir}", log_path)
    return built[0]


def _run_logged(step: list[str], log, log_path: Path, environment: Mapping[str, str]) -> str | None:
    """Runs ``step`` with its output appended to ``log``; ``None`` if it succeeded, else its part of the log."""
    log.write(f"$ {shlex.join(step)}\n")
    log.flush()
    start = log.tell()
    try:
        done = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, env=environment, check=False)
    except OSError as e:
        raise BuildError(f"cannot run cmake: {e}", log_path) from e
    if done.returncode == 0:
        return None
    log.seek(0, os.SEEK_END)
    with open(log_path, errors="replace") as text:
        text.seek(start)
        return text.read()


#: Failures whose cause the compiler's or CMake's words do not name, each with what to do.
KNOWN_CAUSES = (
    (
        re.compile(r"dependency (CUDAToolkit|CUDNN) could not be found|Could NOT find (CUDAToolkit|CUDNN)"),
        "mlx-cuda's CMake package (MLX 0.32.1 on) asks for the CUDA toolkit and cuDNN installed on the system "
        "(find_dependency(CUDAToolkit REQUIRED), find_dependency(CUDNN REQUIRED)), which the mlx-cuda wheels do "
        "not bring: install both (nvcc's toolkit, cuDNN's headers), then rebuild",
    ),
    (
        re.compile(r"xcrun: error|xcode-select: (error|note)|CommandLineTools.*missing|invalid active developer path"),
        "Xcode's command-line tools are missing: run xcode-select --install, then rebuild",
    ),
    (
        re.compile(r"No CMAKE_CXX_COMPILER could be found"),
        "no C++ compiler was found: install g++ or clang++ (on a Mac: xcode-select --install), or set CXX",
    ),
)


def known_cause(log: str) -> str | None:
    """What to do about a failure whose cause the first error line does not say, or ``None``."""
    return next((advice for pattern, advice in KNOWN_CAUSES if pattern.search(log)), None)


COMPILER_ERROR = re.compile(r"(^|\s|:)(fatal )?error:")


def first_error(log: str) -> str:
    """The line a person needs from a failed build: the compiler's first error, else CMake's first error message.

    A CMake error that wraps a compiler's output (a compiler that cannot build a test program)
    keeps its first sentence and adds the compiler's first error line.
    """
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if COMPILER_ERROR.search(line) and not line.startswith("CMake"):
            return line.strip().replace(f"{SOURCE_DIR}{os.sep}", "")
        if line.startswith("CMake Error"):
            block = []
            for follow in lines[i + 1 :]:
                if follow.startswith(("CMake ", "-- ", "$ ", "Call Stack")):
                    break
                block.append(follow.strip())
            message = " ".join(" ".join(block).split("It fails with the following output:")[0].split())
            inner = next((b for b in block if COMPILER_ERROR.search(b)), None)
            text = f"CMake: {message[:300]}" if message else line.strip()
            return f"{text} ({inner})" if inner else text
        if re.search(r"undefined reference to|ld: .*error", line):
            return line.strip()
    tail = [line.strip() for line in lines if line.strip() and not line.startswith("$ ")]
    return tail[-1] if tail else "the build failed and printed nothing"


# ----------------------------------------------------------------- nanobind ---


def mlx_nanobind_internals() -> tuple[int, str]:
    """The version of nanobind internals the running mlx.core was built with, and its full key.

    nanobind keeps each domain's type registry in the interpreter's dict under
    ``__nb_internals_<abi>_<domain>__``; mlx's domain is ``mlx``.
    """
    import mlx.core  # noqa: F401  (registers its key)

    keys = [key for key in _interpreter_dict() if isinstance(key, str) and key.endswith("_mlx__")]
    for key in keys:
        found = re.search(r"(?:^|_)v(\d+)(?:_|$)", key.removeprefix("__nb_internals_").removesuffix("_mlx__"))
        if found:
            return int(found.group(1)), key
    raise BuildError("cannot tell which nanobind mlx.core was built with")


def _interpreter_dict() -> dict:
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_GetDict.restype = ctypes.c_void_p  # a borrowed reference: not py_object, which steals it
    api.PyInterpreterState_GetDict.argtypes = [ctypes.c_void_p]
    return ctypes.cast(api.PyInterpreterState_GetDict(api.PyInterpreterState_Get()), ctypes.py_object).value


def mlx_nanobind_keys() -> list[str]:
    """Every nanobind registry of the ``mlx`` domain in this process: one where the extension shares mx.array."""
    return sorted(key for key in _interpreter_dict() if isinstance(key, str) and key.endswith("_mlx__"))


def nanobind_internals_of(cmake_dir: Path) -> int | None:
    """The internals version a nanobind installation (given by its ``cmake`` folder) builds with."""
    for header in ("nb_internals.h", "nb_abi.h"):
        path = Path(cmake_dir).parent / "src" / header
        if path.is_file():
            found = re.search(r"define\s+NB_INTERNALS_VERSION\s+(\d+)", path.read_text(errors="replace"))
            if found:
                return int(found.group(1))
    return None


def nanobind_cmake_dir(cache: Path) -> Path:
    """A nanobind whose internals match the running mlx.core's: the installed one, else one fetched into ``cache``.

    mlx 0.30.1-0.31.1 were built with nanobind 2.10, 0.31.2 with 2.12, 0.32.0-0.32.1 with 2.13,
    0.32.2 with 2.15, 0.32.3 on with 3.x. An extension built with another one loads but cannot take
    an mx.array. The fetched copy goes to ``cache/nanobind-<version>`` (pip ``--target``), not into
    the environment.
    """
    wanted, key = mlx_nanobind_internals()
    try:
        import nanobind

        installed = Path(nanobind.cmake_dir())
        if nanobind_internals_of(installed) == wanted:
            return installed
    except ImportError:
        pass
    if "_gcc_" in key or "_clang_" in key or wanted not in NANOBIND_FOR_INTERNALS:
        raise BuildError(
            f"mlx {_mlx_version()} was built with nanobind internals v{wanted} ({key}), which this build does not "
            "support; use mlx 0.30.1 or newer"
        )
    version = NANOBIND_FOR_INTERNALS[wanted]
    target = Path(cache) / f"nanobind-{version}"
    cmake_dir = target / "nanobind" / "cmake"
    if nanobind_internals_of(cmake_dir) == wanted:
        return cmake_dir
    fetch = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target)]
    done = subprocess.run([*fetch, f"nanobind=={version}"], capture_output=True, text=True, check=False)
    if done.returncode != 0 or nanobind_internals_of(cmake_dir) != wanted:
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BuildError(
            f"mlx {_mlx_version()} needs nanobind {version} (internals v{wanted}) and it could not be fetched "
            f"({why}); pip install nanobind=={version}"
        )
    return cmake_dir


def _mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


# -------------------------------------------------------------------- cache ---


def source_hash() -> str:
    """A hash of the extension's sources (the C++, the headers, the CMake files and this file)."""
    digest = hashlib.sha256()
    files = {p for pattern in SOURCE_PATTERNS for p in SOURCE_DIR.rglob(pattern)}
    for path in sorted(files):
        relative = path.relative_to(SOURCE_DIR)
        if any(part.startswith((".", "build", "__pycache__")) for part in relative.parts[:-1]):
            continue  # a CMake tree made by hand holds .cmake files of its own
        digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_key() -> str:
    """``mlx-<version>-<python tag>-<platform>-<source hash>``: what the compiled ``.so`` depends on."""
    python = f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}"
    platform = re.sub(r"[^A-Za-z0-9_.]+", "_", sysconfig.get_platform())
    return f"mlx-{_mlx_version()}-{python}-{platform}-{source_hash()}"


def cache_root() -> Path:
    from ...user_cache import cache_dir

    return cache_dir() / "cpu_ext"


def _build_inputs() -> dict[str, str | None]:
    """What a failed build may be retried for, beside the key: another compiler or another cmake."""
    return {"CXX": os.environ.get("CXX"), "cmake": find_cmake()}


def cached_extension(*, force: bool = False, announce=None) -> Path:
    """The ``.so`` built for the running mlx, Python and sources; built first if there is none.

    Raises :class:`BuildError` with the recorded reason when the build failed, now or earlier with
    the same inputs. ``force`` rebuilds even so. ``announce(message)`` is told before a build starts
    or a wait for another process's build (default: one line on stderr).
    """
    from filelock import FileLock, Timeout

    announce = announce or _to_stderr
    entry = cache_root() / cache_key()
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(entry) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        announce(f"rmsprop-bench: waiting for another process that builds the cpu_kernel C++ extension in {entry}")
        lock.acquire()
    try:
        return _cached_or_built(entry, force, announce)
    finally:
        lock.release()


def _cached_or_built(entry: Path, force: bool, announce) -> Path:
    """``cached_extension``'s work, under the lock."""
    built = sorted(entry.glob("_ext*.so"))
    if built and not force:
        return built[0]
    failure = entry / FAILURE_NAME
    if failure.is_file() and not force:
        recorded = json.loads(failure.read_text())
        if recorded.get("inputs") == _build_inputs():
            raise BuildError(recorded["reason"], Path(recorded["log"]) if recorded.get("log") else None)
    announce(
        f"rmsprop-bench: building the cpu_kernel C++ extension for mlx {_mlx_version()} "
        f"(once per mlx release; about a minute) in {entry}"
    )
    failure.unlink(missing_ok=True)
    try:
        so = build_extension(entry)
    except BuildError as e:
        entry.mkdir(parents=True, exist_ok=True)
        record = {"reason": e.reason, "log": str(e.log) if e.log else None, "inputs": _build_inputs()}
        failure.write_text(json.dumps(record, indent=1))
        raise
    shutil.rmtree(entry / "build", ignore_errors=True)  # the log stays; the object files are not needed
    return so


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_impls.kernels._cpu_ext.build",
        description="Build the cpu_kernel C++ extension now, into the user cache unless it is there, or into --out.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild it even if it is cached or failed before")
    parser.add_argument("--out", type=Path, help="build into this directory instead (for $RMSPROP_BENCH_CPU_EXT_DIR)")
    parser.add_argument("cmake_args", nargs="*", help="extra CMake arguments, after --, with --out only")
    args = parser.parse_args(argv)
    if args.cmake_args and args.out is None:
        parser.error("extra CMake arguments need --out (the cache holds the default build only)")
    if args.out is None and os.environ.get("RMSPROP_BENCH_NO_EXTENSION") == "1":
        print("not built: RMSPROP_BENCH_NO_EXTENSION=1 is set", file=sys.stderr)
        return 0
    try:
        so = build_extension(args.out, cmake_args=args.cmake_args) if args.out else cached_extension(force=args.force)
    except BuildError as e:
        print(f"not built: {e}", file=sys.stderr)
        return 1
    print(so)
    return 0


if __name__ == "__main__":
    sys.exit(main())
