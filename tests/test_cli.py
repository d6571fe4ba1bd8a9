"""The console script: every command answers --help, and mistakes end in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rmsprop_impls.cli import COMMANDS
from rmsprop_impls.cli.common import parse_hyper
from rmsprop_impls.rules import RULE_NAMES


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from rmsprop_impls.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_top_level_help_lists_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: rmsprop-bench" in out.stdout and "--" in out.stdout


def test_compare_prints_an_aligned_table_and_the_fastest():
    out = cli("compare", "--tree", "4x1K", "8x3", "--repeats", "3", "--variants", "eager", "flat")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("memory-bandwidth roof") == 1 and "GB/s" in out.stdout  # measured once per run
    table = out.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:2] == ["tree", "variant"] and "vs compiled" in table[0] and "vs eager" in table[0]
    assert [row.split()[:2] for row in table[2:]] == [
        ["4x1K", "eager"],
        ["4x1K", "flat"],
        ["8x3", "eager"],
        ["8x3", "flat"],
    ]
    assert table[2].split()[2] in ("cpu", "gpu")  # the device column: eager runs on MLX's default device
    # eager vs itself, and compiled did not run: the columns before the notes ("first step 0.2 ms")
    assert table[2].split()[-5] == "1.00x" and table[2].split()[-6] == "-"
    assert "fastest:" in out.stdout and "  4x1K (4 leaves" in out.stdout and "  8x3 (8 leaves" in out.stdout
    assert out.stdout.count("(floor with no update: ") == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["compare", "--tree", "huge"], "error: unknown tree 'huge'"),
        (["compare", "--variants", "nope"], "invalid choice: 'nope'"),
        (["compare", "--tree", "4x1K", "huge"], "error: unknown tree 'huge'"),
        (["compare", "--repeats", "0"], "--repeats: needs a whole number of at least 1, not '0'"),
        (["compare", "--cache-limit-mb", "-5"], "--cache-limit-mb: needs a whole number of at least 0, not '-5'"),
        (["profile", "--steps", "x"], "--steps: needs a whole number of at least 1, not 'x'"),
        (["choose", "--time-budget", "-1"], "--time-budget: needs a number of at least 0.0, not '-1'"),
    ],
)
def test_user_mistakes_are_one_line(args, words):
    out = cli(*args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command", ["compare", "choose", "profile", "selftest", "train"])
def test_every_command_names_the_optimizers_and_a_bad_one_is_one_line(command, capsys):
    from rmsprop_impls.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in RULE_NAMES)
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--optimizer", "NAdam"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"unknown optimizer 'NAdam'; choose one of {', '.join(RULE_NAMES)}" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["compare", "--optimizer", "adamw", "--hyper", "alpha=0.9"], "--hyper for AdamW: AdamW has no hyper-param"),
        (["choose", "--tree", "4x1K", "--hyper", "eps"], "--hyper 'eps': write NAME=VALUE"),
        (["profile", "--hyper", "eps=tiny"], "--hyper 'eps=tiny': 'tiny' is not a number, a bool or a list"),
        (["train", "--model", "mlp-2048", "--optimizer", "sgd", "--hyper", "betas=0.9,0.9"], "SGD has no hyper-param"),
    ],
)
def test_a_bad_hyper_parameter_is_one_line(args, words, capsys):
    from rmsprop_impls.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_hyper_parameters_are_python_literals_and_tuples_become_stock_lists():
    assert parse_hyper(["weight_decay=0.1", "betas=0.9,0.95", "bias_correction=True", "nesterov= False"]) == {
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "bias_correction": True,
        "nesterov": False,
    }
