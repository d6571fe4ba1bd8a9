"""The C++ extension's build on first use: the cache, the recorded reason, the switches and the lock.

One real build (about a minute), into a temporary cache; the other tests reuse its ``.so`` or
fake the build step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rmsprop_impls.kernels._cpu_ext import build

PROGRESS = "rmsprop-bench: building the cpu_kernel C++ extension"
REASON_AND_FILE = """
import mlx.core as mx
from rmsprop_impls import create
from rmsprop_impls.registry import unavailable_reason
print(unavailable_reason("cpu_kernel"))
from rmsprop_impls.kernels import _cpu_ext
if unavailable_reason("cpu_kernel") is None:
    mx.eval(create("cpu_kernel", 0.1).apply_gradients({"w": mx.ones(3)}, {"w": mx.ones(3)}))  # in the same process
    print(_cpu_ext._ext.__file__)
"""


def run_python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose user cache is ``cache``, with only ``env``'s extension switches set."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RMSPROP_BENCH_")}
    environment.update(RMSPROP_BENCH_CACHE_DIR=str(cache), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=900
    )


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(PROGRESS)]


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """The first use of cpu_kernel with an empty cache: (its run, the cache)."""
    cache = tmp_path_factory.mktemp("cache")
    return run_python(REASON_AND_FILE, cache), cache


@pytest.fixture(scope="module")
def built_so(first_build) -> Path:
    done, _ = first_build
    if done.returncode != 0 or done.stdout.splitlines()[0] != "None":
        pytest.fail(f"the first-use build failed:\n{done.stdout}\n{done.stderr}")
    return Path(done.stdout.splitlines()[1])


def test_first_use_builds_into_the_cache_with_one_progress_line_and_keeps_the_log(first_build, built_so):
    done, cache = first_build
    entry = built_so.parent
    assert entry.parent == cache / "cpu_ext"
    assert entry.name.startswith(f"mlx-{__import__('mlx.core').core.__version__}-{sys.implementation.cache_tag}")
    assert entry.name.endswith(build.source_hash())
    assert len(progress_lines(done.stderr)) == 1, done.stderr
    assert "Build files have been written" in (entry / build.LOG_NAME).read_text()
    assert not (entry / "build").exists(), "the object files are removed after a build"
    again = run_python(REASON_AND_FILE, cache)
    assert again.stdout.splitlines() == ["None", str(built_so)]
    assert progress_lines(again.stderr) == [], "a cached build is not rebuilt"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils) to read the rpath")
def test_the_rpath_is_the_mlx_lib_folder(built_so):
    import mlx.core

    dynamic = subprocess.run(["readelf", "-d", str(built_so)], capture_output=True, text=True, check=True).stdout
    assert f"[{Path(mlx.core.__file__).parent / 'lib'}]" in dynamic


def test_a_failing_compiler_is_recorded_reported_and_not_retried(tmp_path):
    first = run_python(REASON_AND_FILE, tmp_path, CXX="/nonexistent/c++")
    reason = first.stdout.strip()
    assert reason.startswith("the C++ extension rmsprop_impls.kernels._cpu_ext does not load (its build failed: CMake:")
    assert "/nonexistent/c++" in reason and "build.log" in reason
    assert len(progress_lines(first.stderr)) == 1
    (record,) = (tmp_path / "cpu_ext").glob(f"*/{build.FAILURE_NAME}")
    assert json.loads(record.read_text())["inputs"]["CXX"] == "/nonexistent/c++"
    second = run_python(REASON_AND_FILE, tmp_path, CXX="/nonexistent/c++")
    assert second.stdout.strip() == reason
    assert progress_lines(second.stderr) == [], "a failed build is not retried with the same inputs"


def test_no_extension_neither_builds_nor_loads(tmp_path, built_so):
    shutil.copytree(built_so.parent, tmp_path / "cpu_ext" / built_so.parent.name)  # even a cached build
    done = run_python(REASON_AND_FILE, tmp_path, RMSPROP_BENCH_NO_EXTENSION="1")
    assert done.stdout.strip() == (
        "the C++ extension rmsprop_impls.kernels._cpu_ext does not load "
        "(RMSPROP_BENCH_NO_EXTENSION=1 is set, so it is neither built nor loaded)"
    )
    assert progress_lines(done.stderr) == []


def test_the_directory_variable_loads_a_prebuilt_extension_and_builds_nothing(tmp_path, built_so):
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    shutil.copy(built_so, prebuilt)
    done = run_python(REASON_AND_FILE, tmp_path / "cache", RMSPROP_BENCH_CPU_EXT_DIR=str(prebuilt))
    assert done.stdout.splitlines() == ["None", str(prebuilt / built_so.name)], done.stderr
    assert not (tmp_path / "cache" / "cpu_ext").exists()
    empty = run_python(REASON_AND_FILE, tmp_path / "cache", RMSPROP_BENCH_CPU_EXT_DIR=str(tmp_path / "cache"))
    assert "which holds no _ext*.so" in empty.stdout


def test_processes_that_start_at_once_build_once(tmp_path, built_so):
    count = tmp_path / "builds"
    fake_build = f"""
        import shutil, sys, time
        from pathlib import Path
        from rmsprop_impls.kernels._cpu_ext import build

        def slow_copy(out_dir, **options):
            with open({str(count)!r}, "a") as f:
                f.write("built\\n")
            time.sleep(3)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy({str(built_so)!r}, out_dir))

        build.build_extension = slow_copy
        from rmsprop_impls.kernels import _cpu_ext
        print(_cpu_ext.EAGER_MAX_ELEMENTS)
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RMSPROP_BENCH_")}
    environment["RMSPROP_BENCH_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-c", textwrap.dedent(fake_build)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) for _ in range(3)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert len(set(outputs)) == 1 and outputs[0].strip().isdigit()
    assert count.read_text() == "built\n"


# ---------------------------------------------------------------- in process ---


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RMSPROP_BENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    builds = []

    def failing(out_dir, **options):
        builds.append(out_dir)
        raise build.BuildError("rmsprop_cpu.cpp:1:1: error: nope", Path(out_dir) / build.LOG_NAME)

    monkeypatch.setattr(build, "build_extension", failing)
    return builds


def test_a_failed_build_is_retried_for_another_compiler_or_when_forced(fake_cache, monkeypatch):
    messages = []
    for _ in range(2):
        with pytest.raises(build.BuildError, match="error: nope"):
            build.cached_extension(announce=messages.append)
    assert len(fake_cache) == 1
    monkeypatch.setenv("CXX", "clang++")
    with pytest.raises(build.BuildError):
        build.cached_extension(announce=messages.append)
    with pytest.raises(build.BuildError):
        build.cached_extension(announce=messages.append, force=True)
    assert len(fake_cache) == 3 and len(messages) == 3


def test_the_key_follows_the_sources(monkeypatch, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    before = build.source_hash()
    (copy / "build" / "CMakeFiles").mkdir(parents=True)
    (copy / "build" / "CMakeFiles" / "x.cmake").write_text("made by a build by hand")
    assert build.source_hash() == before
    (copy / "mlx_compat.h").write_text((copy / "mlx_compat.h").read_text() + "\n")
    assert build.source_hash() != before


def test_unsupported_platform_and_missing_cmake_are_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(build.BuildError, match="^unsupported platform: win32"):
        build.build_extension(tmp_path)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(build, "find_cmake", lambda: None)
    with pytest.raises(build.BuildError, match="^cmake not found"):
        build.build_extension(tmp_path)


def test_first_error_is_the_compilers_line_or_cmakes_message():
    compiler = f"[ 50%] Building\n{build.SOURCE_DIR}/rmsprop_cpu.cpp:15:10: fatal error: immintrin.h: No such file\n"
    assert build.first_error(compiler) == "rmsprop_cpu.cpp:15:10: fatal error: immintrin.h: No such file"
    cmake = "-- The CXX compiler\nCMake Error at CMakeLists.txt:4 (project):\n  The CMAKE_CXX_COMPILER:\n\n    /x\n\n"
    cmake += "  is not a full path to an existing compiler tool.\n\n\n-- Configuring incomplete, errors occurred!\n"
    expected = "CMake: The CMAKE_CXX_COMPILER: /x is not a full path to an existing compiler tool."
    assert build.first_error(cmake) == expected
    assert build.first_error("$ cmake\nsomething odd\n") == "something odd"
    wrapped = "CMake Error at x.cmake:1 (message):\n  The C++ compiler\n\n  is not able to compile a simple test"
    wrapped += " program.\n\n  It fails with the following output:\n\n    c++ -o a.o\n    a.cpp:1:1: error: bad\n\n"
    assert build.first_error(wrapped) == (
        "CMake: The C++ compiler is not able to compile a simple test program. (a.cpp:1:1: error: bad)"
    )


#: How each compiler says it: GCC ``fatal error: /nonexistent/missing.h: No such file or directory``,
#: clang (Apple's g++ too) ``fatal error: '/nonexistent/missing.h' file not found``.
MISSING_HEADER = {"g++": "fatal error: /nonexistent/missing.h", "clang++": "fatal error: '/nonexistent/missing.h'"}


@pytest.mark.parametrize("cxx", MISSING_HEADER)
def test_a_compile_error_is_the_compilers_first_error_line(tmp_path, cxx):
    """A real compiler failing on the real sources: build_extension with the lanes' cmake_args, with GCC and clang."""
    if shutil.which(cxx) is None:
        pytest.skip(f"needs {cxx} (the clang lane in .ci/run installs Debian's clang)")
    force_include = "-DCMAKE_CXX_FLAGS_RELEASE=-include /nonexistent/missing.h"  # not used by CMake's compiler check
    with pytest.raises(build.BuildError) as failed:
        build.build_extension(tmp_path, cmake_args=[force_include], env={"CXX": cxx})
    assert MISSING_HEADER[cxx] in failed.value.reason
    assert failed.value.log == tmp_path / build.LOG_NAME and failed.value.log.is_file()


def test_the_command_builds_unless_cached_forces_and_respects_no_extension(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(build, "cached_extension", lambda force=False: calls.append(force) or tmp_path / "_ext.so")
    monkeypatch.delenv("RMSPROP_BENCH_NO_EXTENSION", raising=False)
    assert build.main([]) == 0 and build.main(["--force"]) == 0
    assert calls == [False, True]
    monkeypatch.setenv("RMSPROP_BENCH_NO_EXTENSION", "1")
    assert build.main([]) == 0 and calls == [False, True]
    assert "RMSPROP_BENCH_NO_EXTENSION=1" in capsys.readouterr().err

    def failing(out_dir, cmake_args):
        assert (out_dir, cmake_args) == (tmp_path, ["-DX=1"])
        raise build.BuildError("no")

    monkeypatch.setattr(build, "build_extension", failing)
    assert build.main(["--out", str(tmp_path), "--", "-DX=1"]) == 1
    assert capsys.readouterr().err == "not built: no\n"


def test_an_mlx_cuda_cmake_package_without_the_cuda_toolkit_says_so(tmp_path):
    """mlx-cuda 0.32.1 on: MLXConfig.cmake runs find_dependency(CUDAToolkit REQUIRED), then with its own FindCUDNN
    find_dependency(CUDNN REQUIRED), which a machine with the wheels alone fails. A real CMake run on a package
    config that does the second as MLX's does (this machine may have a CUDA toolkit, not cuDNN's headers)."""
    package = tmp_path / "mlx-cmake"
    package.mkdir()
    (package / "FindCUDNN.cmake").write_text(
        "find_path(CUDNN_INCLUDE_DIR cudnn.h PATHS /nonexistent NO_DEFAULT_PATH)\n"
        "include(FindPackageHandleStandardArgs)\n"
        "find_package_handle_standard_args(CUDNN REQUIRED_VARS CUDNN_INCLUDE_DIR)\n"
    )
    (package / "MLXConfig.cmake").write_text(
        "include(CMakeFindDependencyMacro)\nlist(PREPEND CMAKE_MODULE_PATH ${CMAKE_CURRENT_LIST_DIR})\n"
        "find_dependency(CUDNN REQUIRED)\n"
    )
    with pytest.raises(build.BuildError) as failed:
        build.build_extension(tmp_path / "out", cmake_args=[f"-DMLX_ROOT={package}", "-DMLX_PY_VERSION=0.32.4"])
    assert "asks for the CUDA toolkit and cuDNN installed on the system" in failed.value.reason, failed.value.reason


@pytest.mark.parametrize(
    "log, advice",
    [
        ("xcrun: error: invalid active developer path (/Library/Developer/CommandLineTools), missing xcrun at: "
         "/Library/Developer/CommandLineTools/usr/bin/xcrun", "xcode-select --install"),
        ("CMake Error at CMakeLists.txt:5 (project):\n  No CMAKE_CXX_COMPILER could be found.", "g++ or clang++"),
        ("a.cpp:1:1: error: bad", None),
    ],
)  # fmt: skip
def test_a_missing_toolchain_names_what_to_install(log, advice):
    assert build.known_cause(log) == advice or advice in build.known_cause(log)
