"""``compare`` times every candidate of a tree round-robin with the roof's own kernels at the tree's working
set, so that its ratios and fractions of the roof compare the same moments; candidates too big to live together
are timed in groups, each with its roof."""

from __future__ import annotations

import contextlib
import os
import re
import sys

import mlx.core as mx
import pytest

from rmsprop_impls import available_variants, cpu_threads
from rmsprop_impls.measure import compare, roof, stream_kernels
from rmsprop_impls.measure.caches import MIB
from rmsprop_impls.measure.compare import Candidate, groups_that_fit, time_candidates, variant_candidates
from rmsprop_impls.measure.roof import Probe, Roof, cpu_roof_probes, kernels_around
from rmsprop_impls.measure.timing import StepTiming
from rmsprop_impls.measure.trees import random_like, step_bytes, synthetic_tree

#: A roof whose best kernel changes between its points, as this EPYC's does (torch's axpy in the caches), at
#: speeds no machine here reaches, so that a figure measured beside the steps cannot be mistaken for it.
NAMED = Roof(
    "cpu",
    (1 * MIB, 4 * MIB, 16 * MIB),
    (9000.0, 8000.0, 7000.0),
    ("numpy copy", "numpy triad", "numpy triad"),
    8 * MIB,
)


def test_the_probes_are_the_kernels_the_roof_interpolates_between():
    assert kernels_around(NAMED, 2 * MIB) == ["numpy copy", "numpy triad"]
    assert kernels_around(NAMED, 4 * MIB) == ["numpy triad"]
    assert kernels_around(NAMED, 1024) == ["numpy copy"] and kernels_around(NAMED, 1 << 40) == ["numpy triad"]
    with cpu_roof_probes(Roof.flat("cpu", 10.0), MIB) as none:  # a roof given by hand names no kernel it ran
        assert none == []


def test_a_probe_runs_its_kernel_at_the_working_set_and_moves_what_it_says(monkeypatch):
    # The step patterns are probed too, wherever the C kernels build (a C compiler: stream_kernels).
    patterns = list(roof.STEP_PATTERN_KERNELS) if stream_kernels.load()[0] is not None else []
    with cpu_roof_probes(NAMED, 2 * MIB, threads=2) as probes:
        assert [p.kernel for p in probes] == ["numpy triad", "numpy copy", *patterns]  # the roof's kernel order
        for p in probes:
            assert p.nbytes >= roof.PROBE_MIN_BYTES
            p.run()
    with cpu_roof_probes(NAMED, 64 * MIB, threads=2) as probes:  # beyond the sweep: at its largest point
        triad = probes[0]
        moved_per_pass = 3 * roof.ITEMSIZE * (16 * MIB // (2 * roof.ITEMSIZE))
        assert triad.kernel == "numpy triad" and triad.nbytes % moved_per_pass == 0
        assert [p.kernel for p in probes[1:]] == patterns


def test_a_probes_rate_is_its_median_call_as_a_steps_is():
    """Not its fastest: the rare fast call (93-104 GB/s where the median call ran at 51) is no roof for a median."""
    probe = Probe("numpy triad", lambda: None, 10**9)
    assert probe.gbps(StepTiming(first_s=9.0, samples=[0.5, 1.0, 2.0])) == pytest.approx(1.0)
    assert probe.gbps(StepTiming(first_s=4.0)) == pytest.approx(0.25)  # no timed call: its first


def _recording(name: str, calls: list[str]) -> Candidate:
    return Candidate(name, "cpu", lambda: lambda: calls.append(name))


def test_candidates_and_probes_are_timed_round_robin_and_the_unavailable_keep_their_reason():
    params = synthetic_tree(2, 64)
    calls: list[str] = []

    @contextlib.contextmanager
    def probes():
        yield [Probe("numpy triad", lambda: calls.append("roof"), 1 << 20)]

    candidates = [_recording("a", calls), Candidate("gone", "gpu", None, "no GPU"), _recording("b", calls)]
    results, rates = time_candidates(candidates, params, 3, probes, progress=False)
    assert calls == ["a", "b", "roof"] * (3 + 2)  # the first run, one warm-up round, three timed
    assert [r.variant for r in results] == ["a", "gone", "b"]
    assert results[1].timing is None and results[1].reason == "no GPU" and results[1].device == "gpu"
    assert all(len(r.timing.samples) == 3 for r in (results[0], results[2]))
    nbytes = step_bytes(params, "rmsprop", {})
    assert results[0].gbps == pytest.approx(nbytes / results[0].timing.median / 1e9)
    assert list(rates[0]) == ["numpy triad"] and rates[0]["numpy triad"] > 0


def test_candidates_that_do_not_fit_together_are_timed_in_groups_each_with_its_roof(monkeypatch):
    params = synthetic_tree(2, 64)
    nbytes = step_bytes(params, "rmsprop", {})
    assert groups_that_fit(5, nbytes, memory=int(4 * nbytes)) == [range(0, 2), range(2, 4), range(4, 5)]
    assert groups_that_fit(5, nbytes, memory=1) == [range(i, i + 1) for i in range(5)]  # one at least
    assert groups_that_fit(5, nbytes, memory=1 << 40) == [range(0, 5)]
    monkeypatch.setattr(compare, "physical_memory", lambda: int(4 * nbytes))
    calls: list[str] = []
    made: list[int] = []

    @contextlib.contextmanager
    def probes():
        made.append(len(made))
        yield [Probe("numpy triad", lambda: calls.append(f"roof {made[-1]}"), 1 << 20)]

    results, rates = time_candidates([_recording(n, calls) for n in "abc"], params, 1, probes, progress=False)
    assert [r.group for r in results] == [0, 0, 1] and len(rates) == 2
    assert calls == ["a", "b", "roof 0"] * 3 + ["c", "roof 1"] * 3


def test_the_variants_step_their_own_parameters_and_state():
    params = synthetic_tree(2, 64)
    grads = random_like(params)
    (eager,) = variant_candidates(params, grads, ["eager"], optimizer="adamw")
    before = mx.array(params["p0"])
    step = eager.build()
    step()
    step()
    assert mx.array_equal(params["p0"], before)  # the caller's tree is left as it was
    (gone,) = variant_candidates(params, grads, ["metal_kernel"])
    assert (gone.build is None) == (gone.reason is not None)


@pytest.mark.skipif("cpu_kernel" not in available_variants(), reason="cpu_kernel does not run here")
def test_under_update_each_variant_steps_a_model_of_its_own():
    """``call="update"``: ``opt.update(model, grads)`` on a model of each candidate's own, where ``cpu_kernel``
    writes its small leaves' w's over the old ones; the caller's tree is left as it was."""
    from rmsprop_impls.kernels import _cpu_ext

    params = synthetic_tree(3, 64)
    grads = random_like(params)
    before = mx.array(params["p0"])
    kernel, stock = variant_candidates(params, grads, ["cpu_kernel", "eager"], optimizer="adamw", call="update")
    in_place = _cpu_ext.w_updated_in_place()
    for step in (kernel.build(), stock.build()):
        for _ in range(4):
            step()
    assert _cpu_ext.w_updated_in_place() - in_place == 3 * 3  # every leaf from the second step on
    assert mx.array_equal(params["p0"], before)


def test_compare_judges_each_cpu_row_against_the_roof_timed_in_its_rounds(monkeypatch, capsys):
    from rmsprop_impls.cli import compare as compare_cli
    from rmsprop_impls.cli import main

    monkeypatch.setattr(compare_cli, "measure_limits", lambda: {"cpu": NAMED, "gpu": None})
    assert main(["compare", "--tree", "4x1K", "--variants", "eager", "flat", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("  4x1K (48 KiB): numpy copy ")]
    measured = max(float(g) for g in re.findall(r"([\d.]+) GB/s", line))  # the best of the kernels probed
    rows = [x.split() for x in out.splitlines() if x.startswith("4x1K  ")]
    assert [row[1] for row in rows] == ["eager", "flat"] and all(float(row[7]) == measured for row in rows)
    assert measured < 7000.0  # not the roof kept from the start
    assert "timed round-robin" in out


def test_torch_threads_spin_briefly_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert cpu_threads.short_openmp_spin() == {"GOMP_SPINCOUNT": "5", "KMP_BLOCKTIME": "1"}
    assert os.environ["KMP_BLOCKTIME"] == "1"
    monkeypatch.delenv("KMP_BLOCKTIME")
    monkeypatch.setitem(sys.modules, "torch", object())  # loaded first: too late to choose for it
    assert cpu_threads.short_openmp_spin() is None and "KMP_BLOCKTIME" not in os.environ
