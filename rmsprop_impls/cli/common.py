"""Pieces every sub-command shares: the user-error type and the MLX settings it records."""

from __future__ import annotations

import argparse
import ast
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..measure import mlx_settings
from ..measure.mlx_settings import CPU_CACHE_LIMIT_MB
from ..measure.trees import DTYPES, parse_dtype, tree_by_name, tree_from_file, tree_info
from ..registry import VariantUnavailableError, variant_device
from ..rules import DEFAULT_RULE, RULE_NAMES, rule

if TYPE_CHECKING:
    import pandas as pd


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, no traceback."""


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` (int or float) not below ``minimum``, else a one-line usage error."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"needs {noun} of at least {minimum}, not {text!r}")
        return value

    return parse


def add_cache_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-limit-mb",
        type=at_least(0),
        default=None,
        help=f"MLX allocator cache limit in MiB (default: {CPU_CACHE_LIMIT_MB} where the default device is the CPU, "
        "whose own default of 32 MB makes big steps mostly page faults; MLX's own, most of RAM, on a GPU). "
        "What is in force is printed with the results.",
    )


def apply_cache_limit(megabytes: int | None) -> str:
    """Set MLX's allocator cache limit deliberately (``None``: per device), and say what is in force."""
    return mlx_settings.apply_cache_limit(megabytes)


def add_tree_arguments(
    parser: argparse.ArgumentParser,
    default: str | None = "16x1M",
    dtype_default: str | None = "float32",
    several: bool = False,
) -> None:
    """``--tree`` (a list of trees where ``several``) and ``--dtype``; a ``None`` default makes the option optional."""
    parser.add_argument(
        "--tree",
        default=[default] if several and default else default,
        nargs="+" if several else None,
        help=f"tree{'s' if several else ''} to time: '<leaves>x<size>' like 16x1M or 16384x256, or a model like "
        "mlp-small, transformer-base (GPT-2 small), cnn-small" + (f" (default {default})" if default else ""),
    )
    parser.add_argument(
        "--dtype",
        default=dtype_default,
        choices=list(DTYPES),
        help=f"parameter dtype (default {dtype_default or 'float32, or the dtypes of a parameters file'})",
    )


def load_tree(name: str, dtype: str) -> dict:
    try:
        return tree_by_name(name, parse_dtype(dtype))
    except ValueError as e:
        raise UserError(str(e)) from None


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results",
        nargs="+",
        default=[".asv/results"],
        help="asv results directories to read: one, or several machines' (each may hold several, as downloaded CI "
        "artifacts do; default .asv/results, where asv.conf.json puts them)",
    )


def load_results(results_dir: str | list[str]) -> pd.DataFrame:
    """The tidy results table, with unreadable files reported as warnings and a bad directory as a user error."""
    from ..analysis.results import (  # pandas and asv: only for the commands that read results
        ResultsError,
        load_asv_results,
    )

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = load_asv_results(results_dir)
    except ResultsError as e:
        raise UserError(str(e)) from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return df


def check_output_path(path: str | None, option: str) -> None:
    """Fail before the long work, not after it, when an output file cannot be written where asked."""
    if path and path != "-" and not Path(path).resolve().parent.is_dir():
        raise UserError(f"{option} {path}: its directory does not exist")


def load_params_file(path: str) -> dict:
    """A parameter tree from a ``.safetensors`` or ``.npz`` file; a bad file is a one-line user error."""
    try:
        return tree_from_file(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_tree_name(name: str) -> None:
    """Fail on a name no tree has, without building a synthetic tree."""
    try:
        tree_info(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def device_label(variant: str) -> str | None:
    """Where ``variant`` runs (``"cpu"``/``"gpu"``), for a table; ``None`` where its module does not even import."""
    try:
        return variant_device(variant)
    except VariantUnavailableError:
        return None


def optimizer_name(text: str) -> str:
    """An argparse type: a rule's name, any case (``AdamW``), else a one-line usage error listing the names."""
    key = text.lower()
    if key not in RULE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown optimizer {text!r}; choose one of {', '.join(RULE_NAMES)}")
    return key


def add_optimizer_arguments(
    parser: argparse.ArgumentParser, several: bool = False, default: Any = DEFAULT_RULE, aliases: tuple = ()
) -> None:
    """``--optimizer`` (several names where ``several``; ``aliases`` its older spellings) and ``--hyper
    NAME=VALUE ...`` (stock's names)."""
    parser.add_argument(
        "--optimizer",
        *aliases,
        dest="optimizer",
        type=optimizer_name,
        nargs="+" if several else None,
        default=default,
        metavar="NAME",
        help=f"the mlx.optimizers rule{'s' if several else ''} to run, by name, any case: {', '.join(RULE_NAMES)} "
        f"(default {' '.join(default) if isinstance(default, (list, tuple)) else default})",
    )
    parser.add_argument(
        "--hyper",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="the rule's hyper-parameters by stock's names, checked as stock checks them, e.g. weight_decay=0.1 "
        "betas=0.9,0.95 bias_correction=True (the others keep stock's defaults; the learning rate is 1e-3)",
    )


def parse_hyper(pairs: list[str]) -> dict[str, Any]:
    """``["weight_decay=0.1", "betas=0.9,0.95"]`` -> ``{"weight_decay": 0.1, "betas": [0.9, 0.95]}``: Python
    literals, a tuple given with commas as the list stock's defaults are; a malformed pair is a user error."""
    hyper: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--hyper {pair!r}: write NAME=VALUE, e.g. weight_decay=0.1")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--hyper {pair!r}: {text!r} is not a number, a bool or a list of numbers") from None
        hyper[name.strip()] = list(value) if isinstance(value, tuple) else value
    return hyper


def checked_hyper(optimizer: str, pairs: list[str]) -> dict[str, Any]:
    """``--hyper``'s values for ``optimizer``, with stock's defaults for the rest; stock's error as a user error."""
    try:
        return rule(optimizer).hyperparameters(**parse_hyper(pairs))
    except (TypeError, ValueError) as e:
        raise UserError(f"--hyper for {rule(optimizer).title}: {e}") from None


def describe_optimizer(optimizer: str, hyper: dict[str, Any]) -> str:
    """``AdamW (betas=[0.9, 0.999], eps=1e-08, weight_decay=0.01, bias_correction=False)``, for the header line."""
    return f"{rule(optimizer).title} (" + ", ".join(f"{k}={v}" for k, v in hyper.items()) + ")"
