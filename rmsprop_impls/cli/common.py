"""Pieces every sub-command shares: the user-error type and the MLX settings it records."""

from __future__ import annotations

import argparse

import mlx.core as mx

from ..trees import DTYPES, parse_dtype, tree_by_name, tree_info


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, no traceback."""


def add_cache_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-limit-mb",
        type=int,
        default=8192,
        help="MLX allocator cache limit in MiB (default 8192). MLX's CPU default of 32 MB makes big steps "
        "mostly page faults; the value is set before timing and printed with the results.",
    )


def apply_cache_limit(megabytes: int) -> str:
    """Set MLX's allocator cache limit deliberately, and say what was set."""
    mx.set_cache_limit(megabytes * 1024 * 1024)
    return f"MLX cache limit {megabytes} MiB"


def add_tree_arguments(parser: argparse.ArgumentParser, default: str = "16x1M", several: bool = False) -> None:
    """``--tree`` (a list of trees where ``several``) and ``--dtype``."""
    parser.add_argument(
        "--tree",
        default=[default] if several else default,
        nargs="+" if several else None,
        help=f"tree{'s' if several else ''} to time: '<leaves>x<size>' like 16x1M or 16384x256, or a model like "
        f"mlp-small, transformer-base (GPT-2 small), cnn-small (default {default})",
    )
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="parameter dtype (default float32)")


def load_tree(name: str, dtype: str) -> dict:
    try:
        return tree_by_name(name, parse_dtype(dtype))
    except ValueError as e:
        raise UserError(str(e)) from None


def check_tree_name(name: str) -> None:
    """Fail on a name no tree has, without building a synthetic tree."""
    try:
        tree_info(name)
    except ValueError as e:
        raise UserError(str(e)) from None
