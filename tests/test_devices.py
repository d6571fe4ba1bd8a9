"""Each variant names its device, each device has its limit, and every GB/s is a fraction of its own device's.

A GPU is absent here, so its measurement is stubbed: what is checked is which
limit each variant is divided by, not the GPU's figure.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pandas as pd
import pytest

import rmsprop_impls
from rmsprop_impls import optimizer, variant_class, variant_device, variant_names
from rmsprop_impls.analysis import results
from rmsprop_impls.cli.run import summary
from rmsprop_impls.measure import bandwidth, roof
from rmsprop_impls.measure.caches import CacheSizes
from rmsprop_impls.measure.roof import Roof

DECLARED = {
    "cpu_stream": "cpu",
    "cpu_kernel": "cpu",
    "eager": "default",
    "compiled": "default",
    "flat": "default",
    "metal_kernel": "gpu",
    "cuda_kernel": "gpu",
}
CPU_GBPS, GPU_GBPS = 10.0, 400.0
#: A 1 MiB last-level cache: a sweep from 16 KiB to 16 MiB, quick to measure.
PLANTED_CACHES = CacheSizes(None, 1 << 20, "planted")


@pytest.fixture
def default_is_gpu(monkeypatch):
    """MLX's default device reads as the GPU, as on Apple silicon or a CUDA build."""
    monkeypatch.setattr(optimizer.mx, "default_device", lambda: SimpleNamespace(type=mx.DeviceType.gpu))


def test_every_variant_declares_its_device():
    assert {name: variant_class(name).device for name in variant_names()} == DECLARED


def test_default_resolves_to_mlx_default_device_when_the_step_runs(default_is_gpu):
    assert {name: variant_device(name) for name in variant_names()} == {
        name: "gpu" if d == "default" else d for name, d in DECLARED.items()
    }
    assert variant_device("eager", resolve=False) == "default"


def test_default_is_the_cpu_on_a_cpu_only_mlx():
    here = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    assert variant_device("eager") == variant_device("compiled") == here
    assert variant_device("cpu_stream") == "cpu" and variant_device("metal_kernel") == "gpu"
    with pytest.raises(ValueError, match="one of cpu, default, gpu"):
        optimizer.resolve_device("tpu")


def test_every_device_gets_a_limit_in_the_same_run():
    calls = []
    limits = bandwidth.measure_limits(
        cpu=lambda: calls.append("cpu") or CPU_GBPS, gpu=lambda: calls.append("gpu") or GPU_GBPS
    )
    assert limits == {"cpu": CPU_GBPS, "gpu": GPU_GBPS} and calls == ["cpu", "gpu"]
    assert bandwidth.fraction_of_limit(200.0, limits, "gpu", 1e6) == 0.5  # a number is a flat roof
    assert bandwidth.fraction_of_limit(5.0, limits, "cpu", 1e9) == 0.5
    with pytest.raises(ValueError, match="concrete device"):
        bandwidth.limit_for(limits, "default")


def test_without_a_gpu_its_limit_reads_not_applicable():
    limits = {"cpu": CPU_GBPS, "gpu": None}
    assert bandwidth.fraction_of_limit(5.0, limits, "gpu", 1e6) is None
    assert bandwidth.describe_limits(limits).endswith("cpu 10.0 GB/s beyond the caches; gpu n/a (no GPU)")


@pytest.mark.skipif(bandwidth.gpu_available(), reason="this machine has a GPU")
def test_the_gpu_roof_measures_nothing_without_a_gpu():
    assert roof.measure_gpu_roof(PLANTED_CACHES) is None


@pytest.mark.skipif(not bandwidth.gpu_available(), reason="needs a GPU (Metal or CUDA)")
def test_the_gpu_roof_measures_the_gpu():
    gpu = roof.measure_gpu_roof(PLANTED_CACHES)
    assert gpu.device == "gpu" and all(1.0 < g < 100_000 for g in gpu.gbps)


def _run_rows(with_gpu: bool, fractions_timed_together: dict[str, float] | None = None) -> pd.DataFrame:
    """One run's loader rows before throughput: the limits, a step of 4M float32 parameters per variant, and the
    ``track_fraction_of_limit`` of the variants given."""
    base = {"machine": "m", "commit": "c", "environment": "e", "unit": "seconds", "available": True}
    rows = [{**base, "benchmark": results.LIMIT_BENCHMARK, "median": CPU_GBPS, "device": None, "optimizer": None}]
    if with_gpu:
        rows.append({**base, "benchmark": results.GPU_LIMIT_BENCHMARK, "median": GPU_GBPS, "device": None})
        rows[-1]["optimizer"] = None
    step = {**base, "benchmark": results.STEP_BENCHMARK, "tree": "4x1M", "n_leaves": 4, "n_params": 4 << 20}
    step["optimizer"] = "rmsprop"
    for variant in ["eager", "cpu_kernel", "metal_kernel", "flat+packed"]:
        rows.append({**step, "variant": variant, "device": results._declared_device(variant), "dtype": "float32"})
    rows.append({**step, "variant": "torch-foreach", "device": "cpu", "dtype": "float32"})
    for variant, fraction in (fractions_timed_together or {}).items():
        tracked = {**step, "benchmark": results.FRACTION_BENCHMARK, "unit": "fraction", "median": fraction}
        rows.append({**tracked, "variant": variant, "device": results._declared_device(variant), "dtype": "float32"})
    df = pd.DataFrame(rows)
    df["median"] = df["median"].fillna(80 * (1 << 20) / 2e9)  # 2 GB/s: 80 MiB moved per step
    return results._add_throughput(df)


@pytest.mark.parametrize("with_gpu", [True, False], ids=["gpu-limit", "no-gpu-limit"])
def test_every_result_row_names_its_device_and_divides_by_its_limit(with_gpu):
    df = _run_rows(with_gpu).set_index("variant", drop=False)
    default = "gpu" if with_gpu else "cpu"
    steps = df[df["benchmark"] == results.STEP_BENCHMARK]
    assert steps["device"].to_dict() == {
        "eager": default,
        "cpu_kernel": "cpu",
        "metal_kernel": "gpu",
        "flat+packed": default,
        "torch-foreach": "cpu",
    }
    for variant, row in steps.iterrows():
        limit = {"cpu": CPU_GBPS, "gpu": GPU_GBPS if with_gpu else math.nan}[row["device"]]
        assert row["limit_gbps"] == pytest.approx(limit, nan_ok=True), variant
        assert row["fraction_of_limit"] == pytest.approx(row["gbps"] / limit, nan_ok=True), variant
    limit_rows = df[df["benchmark"].isin(results.LIMIT_BENCHMARKS.values())]
    assert sorted(limit_rows["device"]) == (["cpu", "gpu"] if with_gpu else ["cpu"])
    roofs = results.device_limits(df)
    assert {d: bandwidth.roof_gbps(r) for d, r in roofs.items()} == {
        "cpu": CPU_GBPS,
        "gpu": GPU_GBPS if with_gpu else None,
    }


def test_the_run_summary_labels_the_device_and_each_limit():
    df = _run_rows(with_gpu=True)
    df["commit_date"] = df["started_at"] = pd.Timestamp("2026-01-01", tz="UTC")
    text = summary(df)
    assert "cpu 10.0 GB/s beyond the caches; gpu 400.0 GB/s beyond the caches" in text
    header, _, winner = text.strip().splitlines()[-3:]
    assert header.split()[:5] == ["optimizer", "tree", "dtype", "fastest", "device"]
    assert winner.split()[3:5] in (["eager", "gpu"], ["cpu_kernel", "cpu"], ["metal_kernel", "gpu"])


def _asv_suites():
    """The asv suites' shared module, bandwidth suite and step suite, imported from the checkout as asv does."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    try:
        from benchmarks import bench_bandwidth, bench_step, common
    finally:
        sys.path.pop(0)
    return common, bench_bandwidth, bench_step


def test_the_asv_step_divides_by_its_device_limit(monkeypatch, default_is_gpu):
    common, bench_bandwidth, bench_step = _asv_suites()
    Bandwidth, GpuBandwidth, Step = bench_bandwidth.Bandwidth, bench_bandwidth.GpuBandwidth, bench_step.Step
    monkeypatch.setattr(common.mx, "default_device", lambda: SimpleNamespace(type=mx.DeviceType.gpu))
    assert [common.variant_device(v) for v in ["eager", "cpu_kernel", "metal_kernel", "flat+packed"]] == [
        "gpu",
        "cpu",
        "gpu",
        "gpu",
    ]
    limits = {"cpu": CPU_GBPS, "gpu": GPU_GBPS}
    assert Bandwidth().track_triad_gbps(limits) == CPU_GBPS and GpuBandwidth().track_triad_gbps(limits) == GPU_GBPS
    with pytest.raises(NotImplementedError, match="no GPU"):
        GpuBandwidth().setup({"cpu": CPU_GBPS, "gpu": None})
    step = Step()
    step.params_ = {"w": mx.zeros((1024,))}  # 12 KiB touched per step
    monkeypatch.setattr(Step, "track_gbps", lambda self, *a: 40.0)
    assert step.track_fraction_of_limit(limits, "cpu_kernel", "1x1K", "float32", "rmsprop") == 4.0
    assert step.track_fraction_of_limit(limits, "eager", "1x1K", "float32", "rmsprop") == 0.1
    assert math.isnan(
        step.track_fraction_of_limit({"cpu": CPU_GBPS, "gpu": None}, "eager", "1x1K", "float32", "rmsprop")
    )
    cached = Roof("cpu", (8 << 10, 1 << 30), (80.0, 10.0), last_level_cache=1 << 20)  # 80 GB/s at 8 KiB, 10 at 1 GiB
    assert step.track_fraction_of_limit({"cpu": cached, "gpu": None}, "cpu_kernel", "1x1K", "float32", "rmsprop") < 0.55


def test_the_asv_steps_fraction_is_of_the_roofs_kernels_timed_beside_it(monkeypatch):
    """A roof kept from a faster moment (planted: 10,000 GB/s, more than any memory) is not the limit of a CPU step:
    the kernels it names are timed round-robin with the step, and the step is a fraction of theirs."""
    common, _, bench_step = _asv_suites()
    Step = bench_step.Step
    planted = Roof("cpu", (1 << 20, 1 << 30), (1e4, 1e4), ("numpy triad", "numpy triad"), 1 << 20)
    step = Step()  # as its setup builds it, without the memory cap setup puts on the benchmark's process
    step.params_, grads = common.tree_and_gradients("4x1M", "float32")
    step.optimizer, step.grads = common.make_optimizer("cpu_stream", grads)  # on the CPU everywhere
    timed: list[list[str]] = []
    original = roof.time_round_robin

    def recording(calls, *args, **kwargs):
        timed.append(list(calls))
        return original(calls, *args, **kwargs)

    monkeypatch.setattr(roof, "time_round_robin", recording)
    fraction = step.track_fraction_of_limit({"cpu": planted, "gpu": None}, "cpu_stream", "4x1M", "float32", "rmsprop")
    assert len(timed) == 1 and timed[0][:2] == ["step", "roof: numpy triad"]  # and the step patterns
    assert 0.02 < fraction < 5  # of the planted 10,000 GB/s it would be under 0.01
    unnamed = Roof("cpu", (1 << 20, 1 << 30), (1e4, 1e4), last_level_cache=1 << 20)  # asv's: names no kernel
    unnamed_limits = {"cpu": unnamed, "gpu": None}
    assert step.track_fraction_of_limit(unnamed_limits, "cpu_stream", "4x1M", "float32", "rmsprop") < 0.01


def test_a_step_takes_its_fraction_from_the_benchmark_that_timed_it_beside_the_roof():
    df = _run_rows(with_gpu=False, fractions_timed_together={"cpu_kernel": 0.9})
    steps = df[df["benchmark"] == results.STEP_BENCHMARK].set_index("variant")
    assert steps.loc["cpu_kernel", "fraction_of_limit"] == 0.9
    assert steps.loc["eager", "fraction_of_limit"] == pytest.approx(steps.loc["eager", "gbps"] / CPU_GBPS)


def test_the_package_exports_variant_device():
    assert rmsprop_impls.variant_device is variant_device
