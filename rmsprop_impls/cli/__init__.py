"""``rmsprop-bench``: run the suite, compare and choose variants, report, serve the dashboard.

Each sub-command lives in its own module here and registers itself through
``add_parser(subparsers)``; mistakes a user can make end in one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import UnknownVariantError, VariantUnavailableError
from ..tree_paths import TreeMismatchError
from .common import UserError

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ["selftest", "run", "compare", "choose", "train", "profile", "report", "publish", "dashboard"]

_USER_ERRORS = (UserError, UnknownVariantError, VariantUnavailableError, TreeMismatchError, FileNotFoundError)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line; the usage is one ``--help`` away."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="rmsprop-bench",
        description="Benchmark MLX RMSprop implementations: which is fastest here, and did a change make it slower?",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except _USER_ERRORS as e:
        if os.environ.get("RMSPROP_BENCH_DEBUG"):
            raise
        print(f"rmsprop-bench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rmsprop-bench {args.command}: interrupted", file=sys.stderr)
        return 130
