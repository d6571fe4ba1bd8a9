"""The asv peers suite times the package's peer steps (``rmsprop_impls.measure.peers``), and skips what cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rmsprop_impls.measure import peers
from rmsprop_impls.rules import RULE_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside tests/

from benchmarks import bench_peers  # noqa: E402


def test_the_suite_builds_its_steps_in_the_package():
    assert bench_peers.build_peer is peers.build_peer and bench_peers.numpy_leaves is peers.numpy_leaves
    assert tuple(bench_peers.PEERS) == peers.PEERS and tuple(bench_peers.OPTIMIZERS) == RULE_NAMES
    assert bench_peers.PeerStep.params[1] == ["rmsprop", "adamw"]  # the default subset of the rule axis


def test_the_rule_axis_follows_the_environment(monkeypatch):
    monkeypatch.setenv("RMSPROP_BENCH_PEER_OPTIMIZERS", "lion,sgd")
    assert bench_peers.optimizers() == ["lion", "sgd"]
    monkeypatch.delenv("RMSPROP_BENCH_PEER_OPTIMIZERS")
    monkeypatch.setenv("RMSPROP_BENCH_GRID", "full")
    assert bench_peers.optimizers() == list(RULE_NAMES)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adamw"])
def test_the_numpy_peer_sets_up_and_steps(optimizer):
    bench = bench_peers.PeerStep()
    bench.setup("numpy", optimizer, "4x1K", "float32")
    bench.time_step("numpy", optimizer, "4x1K", "float32")
    assert bench.built_for == ("numpy", optimizer, "4x1K", "float32")


def test_bfloat16_is_skipped():
    with pytest.raises(NotImplementedError, match="no bfloat16"):
        bench_peers.PeerStep().setup("numpy", "rmsprop", "4x1K", "bfloat16")


def test_a_peer_without_its_package_is_skipped_with_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(peers.PEER_PACKAGES, "optax", ("jax", "a_package_that_is_not_installed"))
    with pytest.raises(NotImplementedError, match=r"optax needs the \[peers\] extra"):
        bench_peers.PeerStep().setup("optax", "adamw", "4x1K", "float32")


def test_a_rule_the_library_lacks_is_skipped_with_the_reason():
    if not peers.peer_installed("torch-foreach"):
        pytest.skip(f"torch-foreach {peers.NEEDS_EXTRA}")
    with pytest.raises(NotImplementedError, match="torch.optim has no Lion"):
        bench_peers.PeerStep().setup("torch-foreach", "lion", "4x1K", "float32")
