"""Bad input fails with one line that says what is wrong and where."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from rmsprop_impls import (
    TreeMismatchError,
    UnknownVariantError,
    VariantUnavailableError,
    available_variants,
    create,
    variant_names,
)
from rmsprop_impls.registry import availability
from rmsprop_impls.rules import RULE_NAMES, rule

VARIANTS = available_variants()
#: One rule per number of state arrays (none used, one, two) and Adam's per-step inputs.
MULTI_STATE = ["sgd", "rmsprop", "adam", "adadelta"]


def params():
    return {"layers": [{"w": mx.ones((2, 3))}, {"w": mx.ones((3,)), "b": mx.ones((1,))}]}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "grads, path, words",
    [
        ({"layers": [{"w": mx.ones((2, 3))}, {"w": mx.ones((3,)), "c": mx.ones((1,))}]}, "layers.1.c", "missing"),
        ({"layers": [{"w": mx.ones((2, 3))}, {"w": mx.ones((4,)), "b": mx.ones((1,))}]}, "layers.1.w", "(4,)"),
        ({"layers": [{"w": mx.ones((2, 3))}, {"w": 1.0}]}, "layers.1.w", "float"),
        ({"layers": [{"w": mx.ones((2, 3))}]}, "layers", "list of 1"),
        ({"layers": {"w": mx.ones((2, 3))}}, "layers", "dict"),
    ],
    ids=["missing-key", "shape", "non-array", "list-length", "dict-vs-list"],
)
@pytest.mark.parametrize("name", MULTI_STATE)
def test_tree_mismatch_names_the_path(variant, grads, path, words, name):
    opt = create(variant, 0.1, optimizer=name)
    with pytest.raises(TreeMismatchError) as e:
        opt.apply_gradients(grads, params())
    message = str(e.value)
    assert f"'{path}'" in message and words in message and "\n" not in message
    assert e.value.path == path


@pytest.mark.parametrize("name", MULTI_STATE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_bad_first_step_leaves_no_state(variant, name):
    opt = create(variant, 0.1, optimizer=name)
    with pytest.raises(TreeMismatchError):
        opt.apply_gradients({"x": mx.ones((2,))}, {"x": mx.ones((3,))})
    assert set(opt.state) == {"step", "learning_rate"} and int(opt.state["step"]) == 0
    out = opt.apply_gradients({"x": mx.ones((3,))}, {"x": mx.ones((3,))})
    assert out["x"].shape == (3,) and int(opt.state["step"]) == 1
    assert set(opt.state["x"]) == set(rule(name).states)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["adam", "adadelta", "adamax"])
def test_a_state_missing_one_of_its_arrays_names_the_leaf_and_the_array(variant, name):
    opt = create(variant, 0.1, optimizer=name)
    params = {"layers": [{"w": mx.ones((3,))}]}
    opt.apply_gradients(params, params)
    second = rule(name).states[1]
    del opt.state["layers"][0]["w"][second]
    before = int(opt.state["step"])
    with pytest.raises(TreeMismatchError, match=f"at 'layers.0.w': the optimizer state has no '{second}'"):
        opt.apply_gradients(params, params)
    assert int(opt.state["step"]) == before


def stock_refusals():
    """Each hyper-parameter value stock's class refuses, with stock's exception."""
    candidates = {"alpha": -0.1, "eps": -1.0, "rho": -0.5, "betas": [0.9, 1.0], "nesterov": True}
    for name in RULE_NAMES:
        r = rule(name)
        for key, value in candidates.items():
            if key in r.defaults:
                try:
                    r.stock(0.1, **{key: value})
                except ValueError as e:
                    yield pytest.param(name, {key: value}, str(e), id=f"{name}-{key}")


@pytest.mark.parametrize("name, bad, message", list(stock_refusals()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_hyperparameters_of_every_rule_get_stocks_error(variant, name, bad, message):
    with pytest.raises(ValueError) as e:
        create(variant, 0.1, optimizer=name, **bad)
    assert str(e.value) == message


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize(
    "kwargs, words",
    [({"alpha": -0.1}, "alpha should be >=0"), ({"eps": 0.0}, "epsilon should be >0"), ({"eps": -1.0}, "epsilon")],
)
def test_bad_hyperparameters(variant, kwargs, words):
    if availability()[variant] is not None:
        pytest.skip(f"{variant} unavailable here: {availability()[variant]}")
    try:
        optim.RMSprop(0.1, **kwargs)
    except ValueError:
        with pytest.raises(ValueError, match=words):
            create(variant, 0.1, **kwargs)
    else:  # this MLX's stock takes it (0.30 allows eps=0), and so does every variant
        assert create(variant, 0.1, **kwargs).eps == kwargs.get("eps", 1e-8)


def test_learning_rate_of_the_wrong_type():
    with pytest.raises(TypeError, match="learning_rate must be a float or a schedule callable, not str"):
        create("eager", "0.1")


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(UnknownVariantError) as e:
        create("fastest", 0.1)
    assert "unknown variant 'fastest'" in str(e.value)
    for name in variant_names():
        assert name in str(e.value)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_unknown_option_names_it_and_what_is_taken(name):
    r = rule(name)
    with pytest.raises(TypeError) as e:
        create("eager", 0.1, optimizer=name, bogus=1)
    takes = ", ".join(sorted(r.defaults))
    assert str(e.value) == f"variant 'eager' of {r.title} got unknown option(s) bogus; it takes: {takes}"


def test_unavailable_variant_carries_its_reason(monkeypatch):
    from rmsprop_impls.variants.compiled import CompiledOptimizer

    monkeypatch.setattr(CompiledOptimizer, "unavailable_reason", classmethod(lambda cls: "needs g++ on PATH"))
    assert availability()["compiled"] == "needs g++ on PATH"
    with pytest.raises(VariantUnavailableError) as e:
        create("compiled", 0.1)
    assert e.value.variant == "compiled" and e.value.reason == "needs g++ on PATH"
    assert str(e.value) == "variant 'compiled' is unavailable here: needs g++ on PATH"


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_compiled_needs_gpp_on_the_cpu_only(monkeypatch, device):
    """MLX compiles its CPU kernels with g++; a GPU default device compiles with Metal or NVRTC, so no g++ needed."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(getattr(mx, device)))
    reason = availability()["compiled"]
    assert "g++" in reason if device == "cpu" else reason is None


def test_a_module_that_cannot_import_is_unavailable(monkeypatch):
    from rmsprop_impls import registry

    monkeypatch.setitem(registry._MODULES, "broken", "no_such_module")
    assert "cannot import" in availability()["broken"]
    with pytest.raises(VariantUnavailableError, match="variant 'broken' is unavailable here: cannot import"):
        create("broken", 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_top_of_the_tree_must_be_a_dict(variant):
    with pytest.raises(TreeMismatchError, match="at '<root>': gradients must be a dict at the top.*not a list"):
        create(variant, 0.1).apply_gradients([mx.ones((2,))], [mx.ones((2,))])


def test_mlx_without_a_back_end_says_which_to_install(tmp_path):
    """``pip install -e .`` on Linux brings ``mlx`` without ``libmlx.so``; the package and the command say what to
    install, the command in one line. A stand-in ``mlx`` fails to import exactly as that one does."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "mlx"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text('raise ImportError("libmlx.so: cannot open shared object file: No such file")')
    env = {"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin:/bin"}
    imported = subprocess.run([sys.executable, "-c", "import rmsprop_impls"], capture_output=True, text=True, env=env)
    assert "ImportError: MLX is installed without a back-end" in imported.stderr and "[cpu]" in imported.stderr
    script = "import sys; sys.argv[0] = '/venv/bin/rmsprop-bench'; from rmsprop_impls.cli import main; main()"
    command = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert command.returncode == 1 and command.stderr.count("\n") == 1, command.stderr
    assert command.stderr.startswith("rmsprop-bench: MLX is installed without a back-end")


@pytest.mark.parametrize(
    "backends, words",
    [
        ((["mlx-cpu", "mlx-cuda-13"], "mlx-cpu"), "its libmlx.so was replaced by mlx-cpu's"),
        ((["mlx-cuda-13"], "mlx-cuda-13"), "needs an NVIDIA GPU: mlx-cuda-13 is installed"),
        ((["mlx-cpu"], "mlx-cpu"), "install mlx[cuda12] or mlx[cuda13]"),
    ],
)
def test_cuda_kernel_says_whether_its_back_end_was_replaced_missing_or_without_a_gpu(monkeypatch, backends, words):
    monkeypatch.setattr("rmsprop_impls.variants.cuda_kernel.libmlx_backends", lambda: backends)
    assert words in availability()["cuda_kernel"]
