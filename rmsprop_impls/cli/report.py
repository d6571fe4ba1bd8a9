"""``rmsprop-bench report``: the figures as PNG and a one-page Markdown summary of the asv results."""

from __future__ import annotations

import argparse

from ..analysis.report import write_report
from .common import add_results_argument, load_results


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write the figures (PNG) and a one-page summary of the asv results",
        description="Read asv's results directory and write every figure as PNG plus summary.md: the fastest "
        "variant per optimizer and tree, the optimizers compared, the bandwidth limit and the regressions asv's step "
        "detection finds. No Jupyter needed.",
    )
    add_results_argument(p)
    p.add_argument("--out", default="report", help="directory to write into (default report/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    df = load_results(args.results)
    summary = write_report(df, args.out, source=", ".join(args.results))
    print(f"wrote {summary} and {len(list(summary.parent.glob('*.png')))} figures in {summary.parent}/")
    return 0
