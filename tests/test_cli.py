"""The console script: every command answers --help, and mistakes end in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rmsprop_impls.cli import COMMANDS


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
