"""The bandwidth roof: cache sizes read per platform, the sweep they lay out, and every fraction judged at the
step's own working set, on this machine's caches and on planted ones (a small and a large last-level cache)."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rmsprop_impls.analysis import results
from rmsprop_impls.analysis.plots import roof_seconds
from rmsprop_impls.measure import bandwidth, caches, roof, roof_cache, stream_kernels
from rmsprop_impls.measure.caches import MIB, CacheSizes
from rmsprop_impls.measure.roof import Roof, sweep_sizes, working_set

#: A roof shaped like this EPYC's (32 MiB L3): fast while the working set is cached, memory's beyond.
EPYC = Roof("cpu", tuple(s * MIB for s in (1, 16, 32, 128, 512)), (140.0, 140.0, 90.0, 60.0, 55.0), (), 32 * MIB)
#: The same machine with a 4 MiB last-level cache: the cache's roof ends earlier.
SMALL_CACHE = Roof("cpu", tuple(s * MIB for s in (1, 2, 4, 16, 64)), (140.0, 140.0, 90.0, 60.0, 55.0), (), 4 * MIB)


def _sysfs(root, cpu: int, index: int, level: int, kind: str, size: str, shared: str) -> None:
    folder = root / f"cpu{cpu}" / "cache" / f"index{index}"
    folder.mkdir(parents=True)
    for name, value in {"level": level, "type": kind, "size": size, "shared_cpu_list": shared}.items():
        (folder / name).write_text(f"{value}\n")


def test_linux_sums_each_shared_cache_once(tmp_path):
    for cpu in (0, 1, 2, 3):
        _sysfs(tmp_path, cpu, 0, 1, "Data", "48K", str(cpu))
        _sysfs(tmp_path, cpu, 1, 1, "Instruction", "32K", str(cpu))
        _sysfs(tmp_path, cpu, 2, 2, "Unified", "1024K", str(cpu))
        _sysfs(tmp_path, cpu, 3, 3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")  # two L3s, as on an EPYC
    found = caches.linux_cache_sizes(tmp_path)
    assert (found.l2, found.last_level) == (4 * MIB, 64 * MIB) and "L3" in found.source


def test_apple_silicon_reports_its_l2_and_says_the_slc_is_missing(monkeypatch):
    monkeypatch.setattr(caches, "_sysctl", {"hw.perflevel0.l2cachesize": 16 * MIB}.get)
    found = caches.macos_cache_sizes()
    assert (found.l2, found.last_level) == (16 * MIB, 16 * MIB) and "system-level cache" in found.source


def test_unknown_caches_fall_back_to_the_documented_size(monkeypatch, tmp_path):
    monkeypatch.setattr(caches, "SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(caches, "_sysctl", lambda key: None)
    monkeypatch.setattr(caches, "sysconf_cache_sizes", lambda: None)
    monkeypatch.setattr(caches, "linux_cache_sizes", lambda: None)
    found = caches.cache_sizes()
    assert found.last_level is None and found.last_level_or_fallback == caches.FALLBACK_LAST_LEVEL
    assert "unknown" in found.source


def test_this_machine_reports_a_last_level_cache():
    found = caches.cache_sizes()
    assert found.last_level is None or 64 * 1024 <= found.last_level <= 4096 * MIB, found


@pytest.mark.parametrize(
    ("llc_mib", "first", "last"),
    [(32, 512 * 1024, 512 * MIB), (4, 64 * 1024, 64 * MIB), (256, 4 * MIB, roof.MAX_WORKING_SET)],
    ids=["epyc-32MiB", "small-4MiB", "large-256MiB-capped"],
)
def test_the_sweep_spans_1_64th_to_16_times_the_last_level_cache(llc_mib, first, last):
    sizes = sweep_sizes(CacheSizes(None, llc_mib * MIB, "planted"))
    assert sizes[0] == first and sizes[-1] == last and sizes == sorted(set(sizes))
    assert llc_mib * MIB in sizes


def test_the_roof_interpolates_in_log_size_and_is_flat_beyond_its_ends():
    assert EPYC.at(16 * MIB) == 140.0 and EPYC.at(32 * MIB) == 90.0
    assert EPYC.at(64 * MIB) == pytest.approx(75.0)  # halfway in log size between 32 MiB and 128 MiB
    assert EPYC.at(1024) == 140.0 and EPYC.at(8 << 30) == EPYC.beyond_caches == 55.0
    assert EPYC.cache_resident(32 * MIB) and not EPYC.cache_resident(33 * MIB)
    assert not Roof.flat("cpu", 10.0).cache_resident(1)


@pytest.mark.parametrize(("machine", "resident"), [(EPYC, True), (SMALL_CACHE, False)], ids=["32MiB", "4MiB"])
def test_a_step_is_judged_against_the_roof_at_its_own_working_set(machine, resident):
    limits = {"cpu": machine, "gpu": None}
    small = working_set(20 * 1_000_000)  # 1M float32 parameters: 12 MB touched
    large = working_set(20 * 2**27)  # 128M float32 parameters: 1.5 GiB touched, beyond both sweeps
    assert bandwidth.cache_resident(limits, "cpu", small) is resident
    assert not bandwidth.cache_resident(limits, "cpu", large)
    # 120 GB/s on the small tree: within the 32 MiB cache's roof, above memory's beyond a 4 MiB cache.
    fraction = bandwidth.fraction_of_limit(120.0, limits, "cpu", small)
    assert fraction == pytest.approx(120.0 / machine.at(small)) and (fraction <= 1.0) is resident
    assert bandwidth.fraction_of_limit(55.0, limits, "cpu", large) == pytest.approx(1.0)
    assert bandwidth.percent_text(fraction, resident).endswith(" (cache-resident)") is resident


def test_the_cpu_roof_lays_its_sweep_out_by_the_caches_read_here(monkeypatch):
    monkeypatch.setattr(roof, "cache_sizes", lambda: CacheSizes(None, 1 * MIB, "planted"))
    measured = roof.measure_cpu_roof(threads=2)
    assert measured.working_sets == tuple(sweep_sizes(CacheSizes(None, 1 * MIB, "planted")))
    assert measured.last_level_cache == 1 * MIB and len(measured.gbps) == len(measured.best_kernels)
    assert all(0.1 < g < 100_000 for g in measured.gbps)
    assert {"numpy triad", "numpy step pattern", "numpy copy"} <= set(measured.by_kernel)
    for i, best in enumerate(measured.best_kernels):  # the roof is the best kernel at each size
        assert measured.gbps[i] == max(r[i] for r in measured.by_kernel.values() if r[i] is not None) and best


def _sweep_rows(machine: Roof) -> list[dict]:
    base = {"machine": "m", "commit": "c", "environment": "e", "available": True, "device": None}
    rows = [{**base, "benchmark": results.LIMIT_BENCHMARK, "median": machine.beyond_caches}]
    rows.append({**base, "benchmark": results.LLC_BENCHMARK, "median": float(machine.last_level_cache)})
    for i, (size, gbps) in enumerate(zip(machine.working_sets, machine.gbps)):
        point = {**base, "of_llc": str(i)}
        rows.append({**point, "benchmark": "bench_bandwidth.Roof.track_gbps", "median": gbps})
        rows.append({**point, "benchmark": "bench_bandwidth.Roof.track_working_set_bytes", "median": float(size)})
    return rows


@pytest.mark.parametrize("machine", [EPYC, SMALL_CACHE], ids=["32MiB", "4MiB"])
def test_results_divide_each_step_by_the_roof_at_its_working_set(machine):
    step = {"machine": "m", "commit": "c", "environment": "e", "available": True, "benchmark": results.STEP_BENCHMARK}
    trees = {"4x256K": 1 << 20, "16x1M": 16 << 20}
    rows = _sweep_rows(machine) + [
        {**step, "variant": "cpu_kernel", "device": "cpu", "dtype": "float32", "tree": t, "n_params": n}
        | {"optimizer": "rmsprop"}
        for t, n in trees.items()
    ]
    df = pd.DataFrame(rows, columns=[*results.COLUMNS])
    df["median"] = df["median"].fillna(df["n_params"] * 20 / 50e9)  # 50 GB/s on every tree
    df = results._add_throughput(df)
    steps = df[df["benchmark"] == results.STEP_BENCHMARK].set_index("tree")
    for tree, n in trees.items():
        touched = 12 * n
        assert steps.loc[tree, "limit_gbps"] == pytest.approx(machine.at(touched))
        assert steps.loc[tree, "fraction_of_limit"] == pytest.approx(50.0 / machine.at(touched))
        assert steps.loc[tree, "cache_resident"] == machine.cache_resident(touched)
    assert results.device_limits(df)["cpu"] == machine


def test_the_scaling_figure_draws_the_roof_with_the_caches_steps():
    params = [1e4, 1e6, 2.8e6, 1e8]  # 120 KB, 12 MB, 34 MB and 1.2 GB touched
    seconds = roof_seconds(params, "float32", EPYC)
    rates = [20 * n / s / 1e9 for n, s in zip(params, seconds)]
    assert rates == pytest.approx([140.0, 140.0, EPYC.at(12 * 2.8e6), 55.0])


def test_compare_shows_the_roof_at_each_trees_working_set_and_marks_the_cache_resident(monkeypatch, capsys):
    from rmsprop_impls.cli import compare, main

    monkeypatch.setattr(compare, "measure_limits", lambda: {"cpu": EPYC, "gpu": None})
    assert main(["compare", "--tree", "4x1K", "--variants", "eager", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("4x1K  ")]
    assert "140.0" in row.split() and "(cache-resident)" in row
    assert "cpu 55.0 GB/s beyond the caches, up to 140.0 in them" in out and "last-level cache 32 MiB" in out


@pytest.mark.parametrize("kernel", stream_kernels.KERNELS)
@pytest.mark.parametrize(
    ("w_offset", "v_offset", "n"),
    [(0, 0, 4096), (1, 1, 4099), (3, 3, 5), (0, 1, 4096), (0, 0, 0)],
    ids=["aligned", "tail", "short", "w-and-v-never-aligned", "empty"],
)
def test_the_c_kernels_add_g_into_w_and_each_state_in_place_and_touch_nothing_else(kernel, w_offset, v_offset, n):
    lib, why = stream_kernels.load()
    if lib is None:
        pytest.skip(why)
    w, g, *states = (
        np.arange(n + 16, dtype=np.float32) * k for k in (1.0, 0.5, 2.0, 3.0)[: stream_kernels.KERNELS[kernel]]
    )
    offsets = [w_offset] + [v_offset] * len(states)
    expected = [x.copy() for x in (w, *states)]
    for x, offset in zip(expected, offsets):
        x[offset : offset + n] += g[:n]
    g_before = g.copy()
    written = [x[offset:].ctypes.data for x, offset in zip((w, *states), offsets)]
    getattr(lib, kernel)(written[0], g.ctypes.data, *written[1:], n)
    assert all(np.array_equal(x, e) for x, e in zip((w, *states), expected)) and np.array_equal(g, g_before)


def test_the_c_kernels_are_built_or_say_why_not(monkeypatch):
    monkeypatch.setattr(stream_kernels, "compiler", lambda: None)
    stream_kernels.load.cache_clear()
    try:
        assert stream_kernels.load() == (None, "no C compiler (set CC or install cc)")
    finally:
        stream_kernels.load.cache_clear()


def test_a_busy_measurement_keeps_the_best_this_machine_showed_at_each_size(monkeypatch, tmp_path):
    monkeypatch.setenv("RMSPROP_BENCH_CACHE_DIR", str(tmp_path))
    sizes = (1 * MIB, 64 * MIB)
    quiet = Roof("cpu", sizes, (140.0, 55.0), ("numpy triad", "c step pattern, non-temporal stores"), 32 * MIB)
    busy = Roof("cpu", sizes, (150.0, 30.0), ("numpy copy", "numpy triad"), 32 * MIB)
    assert roof_cache.best_so_far(quiet) == quiet
    best = roof_cache.best_so_far(busy)
    assert best.gbps == (150.0, 55.0) and best.best_kernels == ("numpy copy", "c step pattern, non-temporal stores")
    other_sweep = Roof("cpu", (2 * MIB, 64 * MIB), (10.0, 10.0), ("numpy triad",) * 2, 32 * MIB)
    assert roof_cache.best_so_far(other_sweep) == other_sweep  # another sweep is another machine's, or caches'
    monkeypatch.setenv("RMSPROP_BENCH_ROOF_CACHE", "0")
    assert roof_cache.best_so_far(busy) == busy and len(list(tmp_path.glob("roof-*.json"))) == 2
    assert roof_cache.best_so_far(None) is None


def test_a_roof_kept_from_another_boot_is_not_this_ones(monkeypatch, tmp_path):
    """A VM restarted on another host keeps its CPU's name: that host's roof must not stand over this one's."""
    monkeypatch.setenv("RMSPROP_BENCH_CACHE_DIR", str(tmp_path))
    sizes = (1 * MIB, 64 * MIB)
    faster_host = Roof("cpu", sizes, (160.0, 64.0), ("numpy triad",) * 2, 32 * MIB)
    this_host = Roof("cpu", sizes, (120.0, 43.0), ("numpy triad",) * 2, 32 * MIB)
    monkeypatch.setattr(roof_cache, "boot_id", lambda: "boot-on-the-faster-host")
    assert roof_cache.best_so_far(faster_host) == faster_host
    monkeypatch.setattr(roof_cache, "boot_id", lambda: "boot-on-this-host")
    assert roof_cache.best_so_far(this_host) == this_host
    assert roof_cache.best_so_far(replace(this_host, gbps=(100.0, 40.0))) == this_host  # within a boot: the best


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") or sys.platform == "darwin"), reason="only Linux and macOS name a boot"
)
def test_this_machine_names_its_boot():
    roof_cache.boot_id.cache_clear()
    boot = roof_cache.boot_id()
    roof_cache.boot_id.cache_clear()
    assert boot and boot == roof_cache.boot_id()
