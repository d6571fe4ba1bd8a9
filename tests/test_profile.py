"""The profiler measures real steps and flags the three known slow patterns, and only when they occur."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import mlx.core as mx
import pytest
from test_cli import cli

from rmsprop_impls import create
from rmsprop_impls.measure.profile import current_cache_limit, plot_profiles, profile_optimizer, profile_variants
from rmsprop_impls.measure.trees import random_like, tree_by_name
from rmsprop_impls.variants.compiled import CompiledOptimizer

BANDWIDTH_GBPS = 10.0  # the findings compare against it; a fixed figure keeps these tests fast


@pytest.fixture
def cache_limit():
    """Set MLX's allocator cache limit for one test and restore it afterwards."""
    before = current_cache_limit()
    yield lambda megabytes: mx.set_cache_limit(megabytes * 1024 * 1024)
    mx.set_cache_limit(before)


def findings_about(words: str, profile) -> list[str]:
    return [f for f in profile.findings if words in f]


@pytest.fixture(scope="module")
def big_tree():
    params = tree_by_name("4x4M")  # 64 MB of float32: a step allocates 192 MB of new w, v and temporaries
    return params, random_like(params)


#: The tiny-cache profile, in a process of its own: whether a freed big buffer is faulted in again on the next
#: step depends on how earlier work in the process left the allocator (glibc's grown mmap threshold keeps such
#: buffers in its heap; the C++ kernel's huge-page advice covers ranges it has seen).
TINY_CACHE_PROFILE = """
import json, resource, sys
import mlx.core as mx
from rmsprop_impls import create
from rmsprop_impls.measure.profile import profile_optimizer
from rmsprop_impls.measure.trees import random_like, tree_by_name

mx.set_cache_limit(0)
params = tree_by_name("4x4M")  # 64 MB of float32: a step allocates 192 MB of new w, v and temporaries
p = profile_optimizer(create("eager", 1e-3), params, random_like(params), float(sys.argv[1]), steps=3)
fault_bytes = p.faults_per_step * resource.getpagesize()
print(json.dumps({"findings": p.findings, "fault_bytes": fault_bytes, "growth": p.peak_growth_bytes}))
"""


def test_page_fault_flag_fires_with_a_tiny_cache():
    out = subprocess.run(
        [sys.executable, "-c", TINY_CACHE_PROFILE, str(BANDWIDTH_GBPS)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout.splitlines()[-1])
    (finding,) = [f for f in p["findings"] if "page-faults" in f]
    assert "--cache-limit-mb" in finding and "mx.set_cache_limit" in finding
    assert p["fault_bytes"] > 0.25 * p["growth"] > 0


def test_page_fault_flag_stays_quiet_with_a_generous_cache(cache_limit, big_tree):
    cache_limit(8192)
    p = profile_optimizer(create("eager", 1e-3), *big_tree, BANDWIDTH_GBPS, steps=3)
    assert findings_about("page-faults", p) == []
    assert p.faults_per_step * resource.getpagesize() < 0.1 * p.peak_growth_bytes


class RetracingCompiled(CompiledOptimizer):
    """The classic mistake: a fresh mx.compile every step, so every step traces again."""

    def update_leaves(self, w, g, s, scalars):
        self._steps.clear()
        return super().update_leaves(w, g, s, scalars)


def test_retrace_flag_fires_only_when_every_step_traces():
    params = tree_by_name("4x1K")
    grads = random_like(params)
    bad = profile_optimizer(RetracingCompiled(1e-3), params, grads, BANDWIDTH_GBPS, steps=3)
    good = profile_optimizer(create("compiled", 1e-3), params, grads, BANDWIDTH_GBPS, steps=3)
    assert bad.traces_per_step == 1 and "retraces on 100% of the steps" in findings_about("retrace", bad)[0]
    assert good.traces_per_step == 0 and findings_about("retrace", good) == []


def test_per_leaf_overhead_flag_on_a_many_leaf_tree_only():
    many = tree_by_name("256x16")
    few = tree_by_name("4x256K")
    on_many = profile_optimizer(create("eager", 1e-3), many, random_like(many), BANDWIDTH_GBPS, steps=3)
    on_few = profile_optimizer(create("eager", 1e-3), few, random_like(few), BANDWIDTH_GBPS, steps=3)
    (finding,) = findings_about("per-leaf overhead", on_many)
    assert "256 leaves" in finding and "flat" in finding
    assert findings_about("per-leaf overhead", on_few) == []


def test_profile_reports_real_memory_and_unavailable_variants(monkeypatch, tmp_path):
    from rmsprop_impls import registry

    monkeypatch.setitem(registry._MODULES, "broken", "no_such_module")
    params = tree_by_name("2x64K")
    profiles, unavailable, limit = profile_variants(
        params, random_like(params), ["eager", "broken"], steps=2, limits={"cpu": BANDWIDTH_GBPS, "gpu": None}
    )
    (p,) = profiles
    assert limit == {"cpu": BANDWIDTH_GBPS, "gpu": None} and "cannot import" in unavailable["broken"]
    assert p.peak_bytes >= p.active_bytes >= 3 * 2 * 64 * 1024 * 4  # params, grads and v are all alive
    assert p.build_s > 0 and p.eval_s > 0 and p.step_s >= p.eval_s and p.of_limit == p.gbps / BANDWIDTH_GBPS
    figure = tmp_path / "profile.png"
    plot_profiles(profiles, "test", str(figure))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_profile_prints_a_table_and_saves_a_figure(tmp_path):
    figure = tmp_path / "p.png"
    out = cli("profile", "--tree", "4x1K", "--variants", "eager", "flat", "--steps", "2", "--figure", str(figure))
    assert out.returncode == 0, out.stderr
    assert "memory-bandwidth roof" in out.stdout and "faults/step" in out.stdout and "findings" in out.stdout
    assert figure.stat().st_size > 0


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal, so a capture is possible")
def test_metal_capture_explains_itself_without_metal(tmp_path):
    out = cli("profile", "--tree", "4x1K", "--metal-capture", str(tmp_path / "t.gputrace"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "--metal-capture is unavailable here" in out.stderr


@pytest.fixture
def fake_metal(monkeypatch):
    """Metal as on a Mac, for the capture's logic: each start and stop recorded with the steps run between them."""
    from rmsprop_impls import optimizer

    events: list = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr("rmsprop_impls.measure.profile.measure_limits", lambda: {"cpu": 10.0, "gpu": None})
    monkeypatch.setattr(mx.metal, "start_capture", lambda path: events.append(("start", path)))
    monkeypatch.setattr(mx.metal, "stop_capture", lambda: events.append(("stop",)))
    step = optimizer.OptimizerBase.apply_gradients
    monkeypatch.setattr(
        optimizer.OptimizerBase, "apply_gradients", lambda self, *a: events.append("step") or step(self, *a)
    )
    return events


def test_metal_capture_records_the_profiled_steps_of_each_variant_and_nothing_else(fake_metal, tmp_path, capsys):
    from rmsprop_impls.cli import main

    trace = tmp_path / "t.gputrace"
    assert main(["profile", "--tree", "4x1K", "--variants", "eager", "flat", "--steps", "3", "--metal-capture",
                 str(trace)]) == 0  # fmt: skip
    starts = [i for i, e in enumerate(fake_metal) if e[0] == "start"]
    assert [fake_metal[i][1] for i in starts] == [str(tmp_path / "t-eager.gputrace"), str(tmp_path / "t-flat.gputrace")]
    for i in starts:  # between each start and its stop: exactly the --steps steps, no tree, bandwidth or warm-up
        assert fake_metal[i + 1 : i + 5] == ["step"] * 3 + [("stop",)]
    assert "step" in fake_metal[: starts[0]]  # the table's measurements ran before, outside any capture
    assert "recorded after the table's measurements" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, words",
    [
        ("t.trace", "Metal writes a trace only to a path ending in .gputrace"),
        ("exists.gputrace", "exists, and Metal does not overwrite a trace"),
        ("no/such/dir/t.gputrace", "its directory does not exist"),
    ],
)
def test_metal_capture_says_what_is_wrong_with_its_path(fake_metal, tmp_path, capsys, name, words):
    from rmsprop_impls.cli import main

    (tmp_path / "exists.gputrace").mkdir()
    assert main(["profile", "--tree", "4x1K", "--variants", "eager", "--steps", "1", "--metal-capture",
                 str(tmp_path / name)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert words in err and "MTL_CAPTURE_ENABLED" not in err and err.count("\n") == 1


def test_a_refused_capture_names_mtl_capture_enabled_only_when_it_is_unset(fake_metal, monkeypatch, tmp_path, capsys):
    from rmsprop_impls.cli import main

    def refuse(path):
        raise RuntimeError("[metal::start_capture] Failed to start: Capturing is not supported.")

    monkeypatch.setattr(mx.metal, "start_capture", refuse)
    for enabled, hint in [(None, True), ("1", False)]:
        if enabled is None:
            monkeypatch.delenv("MTL_CAPTURE_ENABLED", raising=False)
        else:
            monkeypatch.setenv("MTL_CAPTURE_ENABLED", enabled)
        args = ["profile", "--tree", "4x1K", "--variants", "eager", "--steps", "1"]
        assert main([*args, "--metal-capture", str(tmp_path / "t.gputrace")]) == 2
        err = capsys.readouterr().err
        assert "Capturing is not supported" in err and ("MTL_CAPTURE_ENABLED=1 set?" in err) == hint


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tree", "huge"], "unknown tree 'huge'"),
        (["--tree", "4x1K", "--figure", "/no/such/dir/p.png"], "--figure /no/such/dir/p.png: its directory does not"),
        (["--tree", "4x1K", "--steps", "0"], "--steps: needs a whole number of at least 1, not '0'"),
    ],
)
def test_cli_profile_mistakes_are_one_line(args, words):
    out = cli("profile", *args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_the_profile_runs_the_rule_asked_for_and_counts_its_bytes():
    params = tree_by_name("4x1K")
    profiles, _, _ = profile_variants(
        params, random_like(params), ["eager"], steps=2, limits={"cpu": 10.0, "gpu": None}, optimizer="adamw"
    )
    (p,) = profiles
    assert p.optimizer == "adamw" and p.step_bytes == 28 * 4 * 1024  # w, g, m, v read; w, m, v written
    assert p.gbps == pytest.approx(p.step_bytes / p.step_s / 1e9)
