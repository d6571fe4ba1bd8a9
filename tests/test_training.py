"""Whole training steps: every variant bit-identical with stock inside the step, the optimizer factory,
mlx-lm's absence said in words, and ``rmsprop-bench train``."""

from __future__ import annotations

import importlib.metadata

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_cli import cli

from rmsprop_impls import available_variants, create, variant_names
from rmsprop_impls.measure import training, training_models
from rmsprop_impls.measure.training import (
    STOCK,
    make_optimizer,
    measure_training,
    optimizer_variants,
    skip_reason,
    training_loop,
    trajectories,
)
from rmsprop_impls.measure.training_models import mlx_lm_missing, model_from_file, training_model
from rmsprop_impls.rules import RULE_NAMES, rule

needs_mlx_lm = pytest.mark.skipif(mlx_lm_missing() is not None, reason=str(mlx_lm_missing()))


@pytest.fixture(scope="module")
def linear_chain_file(tmp_path_factory) -> str:
    """A parameters file of three linear layers, as ``nn.Sequential`` saves them: the model read back from it."""
    mx.random.seed(3)
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 64), nn.Linear(64, 32))
    path = tmp_path_factory.mktemp("params") / "chain.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    return str(path)


def assert_bit_identical_with_stock(model, compiled: bool, steps: int = 3, rule: str = "rmsprop") -> None:
    """After ``steps`` training steps from the same weights on the same batch, every leaf equals stock's bit for bit."""
    variants = [STOCK, *available_variants()]
    after = trajectories(model, rule, variants, compiled, steps)
    start = dict(tree_flatten(model.module.trainable_parameters()))
    stock = after[STOCK]
    assert all(not mx.array_equal(stock[k], start[k]).item() for k in start)  # the steps moved every leaf
    for variant in variants[1:]:
        differ = [k for k in stock if not mx.array_equal(after[variant][k], stock[k]).item()]
        assert not differ, f"{variant} ({'compiled' if compiled else 'uncompiled'} step) differs at {differ[:3]}"


@needs_mlx_lm
@pytest.mark.parametrize("name", ["llama-tiny", "llama-tiny-lora"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
def test_every_variant_trains_mlx_lm_models_bit_identically_with_stock(name, compiled):
    assert_bit_identical_with_stock(training_model(name), compiled)


@pytest.mark.parametrize("rule", ["rmsprop", "adamw"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
def test_every_variant_trains_a_model_from_a_parameters_file_bit_identically_with_stock(
    linear_chain_file, compiled, rule
):
    assert_bit_identical_with_stock(model_from_file(linear_chain_file), compiled, rule=rule)


@needs_mlx_lm
def test_lora_trains_only_its_adapters():
    model = training_model("llama-tiny-lora")
    d = model.describe()
    trainable = dict(tree_flatten(model.module.trainable_parameters()))
    assert d["trainable"] < d["parameters"] / 5 and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert d["trainable_leaves"] == 2 * 7 * 2  # 7 linear layers per block, 2 blocks, 2 leaves each
    loop = training_loop(model, make_optimizer("rmsprop", STOCK), compiled=True)
    frozen = {k: v for k, v in tree_flatten(loop.module.parameters()) if k not in trainable}
    loop.step()
    assert all(mx.array_equal(v, dict(tree_flatten(loop.module.parameters()))[k]).item() for k, v in frozen.items())


@needs_mlx_lm
def test_the_variants_take_optimizer_update_of_an_mlx_lm_module_as_stock_does():
    """mlx-lm's ``layer_types`` (strings) has the gradient ``[{}, {}]``, which stock maps over without looking at the
    parameters: ``optimizer.update(model, grads)`` gives stock's bits on the whole module."""
    spec = training_model("llama-tiny")
    _, grads = nn.value_and_grad(spec.module, spec.loss)(spec.module, *spec.batch)
    want = optim.RMSprop(1e-3).apply_gradients(grads, spec.module.parameters())
    for variant in ("eager", "cpu_kernel"):
        got = create(variant, 1e-3).apply_gradients(grads, spec.module.parameters())
        for (_, a), (_, b) in zip(tree_flatten(got), tree_flatten(want)):
            assert np.array_equal(np.array(a), np.array(b)), variant


@pytest.mark.parametrize("name", RULE_NAMES)
def test_the_factory_gives_stock_and_every_variant_for_every_rule(name):
    stock = make_optimizer(name, STOCK, hyper={"eps": 1e-6} if name != "sgd" and name != "lion" else {})
    assert type(stock) is rule(name).stock and optimizer_variants(name) == [STOCK, *variant_names()]
    variant = make_optimizer(name, "eager", hyper=rule(name).configurations()[-1])
    assert variant.name == "eager" and variant.rule is rule(name) and variant.hyper == rule(name).configurations()[-1]
    assert skip_reason(name, STOCK) is None and skip_reason(name, "eager") is None
    assert skip_reason(name, "nope") == "no variant 'nope'"


def test_the_factory_rejects_an_unknown_rule_and_a_bad_hyper_parameter():
    with pytest.raises(ValueError, match="unknown optimizer rule 'nadam'"):
        make_optimizer("nadam", STOCK)
    with pytest.raises(TypeError, match=r"of AdamW got unknown option\(s\) alpha"):
        make_optimizer("adamw", "eager", hyper={"alpha": 0.9})


@pytest.mark.parametrize(
    "installed, words", [(None, "mlx-lm is not installed"), ("0.20.1", "mlx-lm 0.20.1 is older than 0.30.7")]
)
def test_a_missing_or_old_mlx_lm_is_said_in_words(monkeypatch, installed, words):
    def version(name: str) -> str:
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(training_models, "version", version)
    assert words in training_models.mlx_lm_missing() and "rmsprop-bench[train]" in training_models.mlx_lm_missing()
    with pytest.raises(RuntimeError, match=words):
        training_model("llama-tiny")
    assert training_model("mlp-2048").describe()["parameters"] == 4 * (2048 * 2048 + 2048)  # the MLP still builds


def test_measure_training_reports_every_candidate(linear_chain_file, monkeypatch):
    monkeypatch.setattr(training, "unavailable_reason", lambda v: "planted" if v == "flat" else None)
    result = measure_training(model_from_file(linear_chain_file), ["rmsprop", "adamw"], [STOCK, "eager", "flat"],
                              time_budget_s=0, min_rounds=2, hyper={"adamw": {"weight_decay": 0.1}})  # fmt: skip
    ran = {(r.step_kind, r.rule, r.variant): r for r in result.rows if r.step_s == r.step_s}
    assert set(ran) == {(k, rule, v) for k in ("compiled", "uncompiled") for rule in ("rmsprop", "adamw")
                        for v in (STOCK, "eager")}  # fmt: skip
    params = 48 * 64 + 64 * 64 + 64 * 32
    for r in ran.values():
        arrays = 3 if r.rule == "rmsprop" else 4  # w, g and the state: v; m and v
        assert r.step_s > 0 and r.alone_s > 0 and r.peak_bytes > arrays * 4 * params
        assert r.in_step_s == pytest.approx(r.step_s - result.grad_only_s[r.step_kind])
    assert ran[("compiled", "rmsprop", STOCK)].speedup == 1.0 and ran[("compiled", "adamw", STOCK)].speedup == 1.0
    skipped = [r for r in result.rows if r.step_s != r.step_s]
    assert {(r.rule, r.variant) for r in skipped} == {("rmsprop", "flat"), ("adamw", "flat")}
    assert all(r.note == "skipped: planted" for r in skipped)
    for rule_name in ("rmsprop", "adamw"):
        assert result.saving_per_step("eager", rule_name) == pytest.approx(
            ran[("compiled", rule_name, STOCK)].step_s - ran[("compiled", rule_name, "eager")].step_s
        )


def test_train_prints_the_table(linear_chain_file):
    out = cli("train", "--params", linear_chain_file, "--variants", "stock", "cpu_kernel", "--time-budget", "0")
    assert out.returncode == 0, out.stderr
    assert "9,376 parameters, 9,376 trainable in 6 leaves; batch 8x48" in out.stdout
    table = out.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:5] == ["step", "rule", "variant", "step", "ms"] and "vs stock" in table[0]
    variants = ["stock"] + ["cpu_kernel"] * ("cpu_kernel" in available_variants())
    rows = {tuple(line.split()[:3]) for line in table[2:]}
    assert rows == {(kind, r, v) for kind in ("compiled", "uncompiled") for r in ("rmsprop", "adamw") for v in variants}
    assert "forward and backward alone, compiled:" in out.stdout


def test_train_runs_the_optimizers_named_with_their_hyper_parameters(linear_chain_file):
    out = cli("train", "--params", linear_chain_file, "--optimizer", "AdamW", "Lion", "--hyper", "weight_decay=0.1",
              "--variants", "stock", "eager", "--step", "uncompiled", "--time-budget", "0")  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:3]) for line in out.stdout.split("\n\n")[1].splitlines()[2:]}
    assert rows == {("uncompiled", r, v) for r in ("adamw", "lion") for v in ("stock", "eager")}


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--params", "missing.npz"], "missing.npz: no such file"),
        (["train", "--model", "llama-huge"], "invalid choice: 'llama-huge'"),
        (["train"], "one of the arguments --model --params is required"),
        (["train", "--model", "mlp-2048", "--optimizer", "rmsprop", "nadam"], "unknown optimizer 'nadam'"),
        (["train", "--model", "mlp-2048", "--optimizer", "sgd", "--hyper", "betas=0.9"], "SGD has no hyper-parameter"),
    ],
)
def test_train_mistakes_are_one_line(args, words):
    out = cli(*args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_choose_says_what_its_winner_saves_per_training_step(linear_chain_file):
    out = cli("choose", "--params", linear_chain_file, "--variants", "eager", "--time-budget", "0",
              "--optimizer", "adamw")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout[out.stdout.index("per training step, eager instead of stock optim.AdamW:") :].splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["compiled", "uncompiled"]
    assert all(line.split()[1] in ("saves", "costs") and " ms of " in line for line in lines[1:3])
    tree = cli("choose", "--tree", "4x1K", "--variants", "eager", "--time-budget", "0")
    assert tree.returncode == 0 and "per training step" not in tree.stdout
