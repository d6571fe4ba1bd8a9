"""Tree makers, packing, tables, timing and the bandwidth probe."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from trajectory import as_f64, gradient_sequence, max_rel_error, run

from rmsprop_impls import PackedGradients, create
from rmsprop_impls.analysis.tables import format_table
from rmsprop_impls.kernels.packing import FlatLayout
from rmsprop_impls.measure.roof import _add_in_place, _step_pattern
from rmsprop_impls.measure.timing import _NoUpdate, time_floor, time_steps
from rmsprop_impls.measure.trees import (
    leaves_of,
    model_tree,
    random_like,
    step_bytes,
    synthetic_tree,
    tree_by_name,
    tree_info,
)


def test_synthetic_tree_counts_and_nesting():
    tree = synthetic_tree(300, 3, mx.float16, depth=3)
    leaves = leaves_of(tree)
    assert len(leaves) == 300 and all(x.shape == (3,) and x.dtype == mx.float16 for x in leaves)
    assert max(k.count(".") for k, _ in tree_flatten(tree)) == 2


@pytest.mark.parametrize(
    "name, leaves, n_params",
    [("16x1M", 16, 16 * 2**20), ("16384x256", 16384, 16384 * 256), ("1x1K", 1, 1024), ("3x5", 3, 15)],
)
def test_synthetic_names(name, leaves, n_params):
    info = tree_info(name)
    assert (info.n_leaves, info.n_params) == (leaves, n_params)


def test_gpt2_small_is_the_real_size():
    info = tree_info("transformer-base")
    assert info.n_leaves == 148 and 124e6 < info.n_params < 125e6


@pytest.mark.parametrize("model", ["mlp", "transformer", "cnn"])
def test_model_trees_are_real_module_parameters(model):
    tree = model_tree(model, "tiny", mx.bfloat16)
    leaves = leaves_of(tree)
    assert leaves and all(x.dtype == mx.bfloat16 for x in leaves)


def test_unknown_tree_name_says_what_is_known():
    with pytest.raises(ValueError, match="unknown tree 'big'.*16x1M.*transformer-base"):
        tree_by_name("big")


def test_step_bytes_is_20_per_float32_parameter():
    assert step_bytes(synthetic_tree(2, 10)) == 20 * 20
    assert step_bytes(synthetic_tree(2, 10, mx.bfloat16)) == 10 * 20


@pytest.mark.parametrize(
    "optimizer, hyper, per_float32",
    [("sgd", {}, 12), ("sgd", {"momentum": 0.9}, 20), ("adamw", {}, 28), ("adadelta", {}, 28), ("lion", {}, 20)],
)
def test_step_bytes_counts_each_rules_streams(optimizer, hyper, per_float32):
    """w and g, each state the update reads, w again and each state it writes: SGD without momentum never
    touches its v."""
    assert step_bytes(synthetic_tree(2, 10), optimizer, hyper) == 20 * per_float32
    assert step_bytes(synthetic_tree(2, 10, mx.float16), optimizer, hyper) == 10 * per_float32


def test_random_like_matches_shapes_and_dtypes():
    tree = model_tree("mlp", "tiny", mx.float16)
    grads = random_like(tree)
    assert [(x.shape, x.dtype) for x in leaves_of(grads)] == [(x.shape, x.dtype) for x in leaves_of(tree)]


def test_layout_round_trip_over_mixed_dtypes():
    leaves = [mx.arange(6).reshape(2, 3).astype(mx.float16), mx.array(2.0), mx.arange(4).astype(mx.float16)]
    layout = FlatLayout(leaves)
    buffers = layout.pack(leaves)
    assert {d: b.size for d, b in buffers.items()} == {mx.float16: 10, mx.float32: 1}
    for a, b in zip(layout.unpack(buffers), leaves):
        assert a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b)


def test_flat_with_prepacked_gradients_matches_flat():
    params = {"a": mx.random.normal((5, 4)), "b": [mx.random.normal((3,)), mx.random.normal((2,)).astype(mx.float16)]}
    grads = gradient_sequence(params, 10)
    plain = run(create("flat", 1e-2), params, grads)
    packed = run(create("flat", 1e-2), params, [PackedGradients.pack(g) for g in grads])
    assert max_rel_error(as_f64(packed), as_f64(plain)) == 0.0


def test_prepacked_gradients_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="float32 gradients need a 1-D buffer of 5 elements, got shape \\(4,\\)"):
        PackedGradients({"a": mx.ones((5,))}, {mx.float32: mx.ones((4,))})


def test_table_aligns_columns():
    text = format_table(["variant", "ms"], [["eager", "12.5"], ["compiled", "3.25"], ["metal", None]])
    lines = text.splitlines()
    assert lines[0] == "variant     ms"
    assert lines[2] == "eager     12.5"
    assert lines[4] == "metal        -"
    assert len({len(line) for line in lines}) == 1


def test_time_steps_evaluates_and_feeds_back():
    params = {"w": mx.ones((1000,))}
    opt = create("eager", 1e-2)
    timing = time_steps(opt, params, {"w": mx.ones((1000,))}, repeats=5, warmup=2)
    assert len(timing.samples) == 5 and timing.first_s > 0 and timing.q1 <= timing.median <= timing.q3
    assert int(opt.state["step"]) == 8  # first + warmup + repeats: every step really ran


def test_the_floor_walks_and_rebuilds_the_tree_and_changes_nothing():
    params = {"a": [mx.ones((3,)), {"b": mx.zeros((2, 2))}]}
    grads = random_like(params)
    floor = _NoUpdate(params)
    out = floor.apply_gradients(grads, params)
    assert out["a"][0] is params["a"][0] and out["a"][1]["b"] is params["a"][1]["b"]
    assert set(floor.state["a"][1]["b"]) == {"v"}  # the stock state layout, walked like a variant's
    timing = time_floor(params, grads, repeats=3)
    assert len(timing.samples) == 3 and timing.median > 0


def test_the_roof_kernels_update_in_place_and_read_only_g():
    a, b = np.ones(1 << 19, np.float32), np.full(1 << 19, 2.0, np.float32)
    _add_in_place(a, b)
    assert np.all(a == 3.0) and np.all(b == 2.0)
    w, g, v = np.ones(1 << 10, np.float32), np.full(1 << 10, 2.0, np.float32), np.zeros(1 << 10, np.float32)
    _step_pattern(w, g, v)
    assert np.all(w == 3.0) and np.all(v == 2.0) and np.all(g == 2.0)


def test_kept_results_put_back_what_an_interrupted_run_wrote(tmp_path):
    from rmsprop_impls.analysis.suite import KeptResults

    machine = tmp_path / "results" / "m"
    machine.mkdir(parents=True)
    (machine / "old.json").write_text('{"a": 1}')
    (machine / "gone.json").write_text('{"b": 2}')
    kept = KeptResults(tmp_path / "results")
    (machine / "old.json").write_text('{"a": 99}')  # rewritten by the stopped run
    (machine / "gone.json").unlink()
    (machine / "new.json").write_text('{"partial": true}')
    kept.restore()
    assert sorted(p.name for p in machine.iterdir()) == ["gone.json", "old.json"]
    assert (machine / "old.json").read_text() == '{"a": 1}' and (machine / "gone.json").read_text() == '{"b": 2}'
    KeptResults(tmp_path / "nothing-yet").restore()  # a first run has no results directory
