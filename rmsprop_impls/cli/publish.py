"""``rmsprop-bench publish``: several machines' asv results merged into one report and one dashboard."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.results import ResultsError
from ..analysis.suite import find_project, read_conf
from .common import UserError, load_results
from .run import publish_dashboard


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="merge asv results of several machines, write the report over all of them and publish the dashboard",
        description="Copy each machine's asv results from RESULTS (results directories, or directories holding "
        "several, such as downloaded CI artifacts) into the project's results directory, write the report over "
        "every machine and MLX release (report/summary.md, the figures) and publish the dashboard (asv publish, "
        "made offline-safe), which shows every machine. CI's publish job runs this.",
    )
    p.add_argument("results", nargs="*", type=Path, metavar="RESULTS", help="results directories to merge in")
    p.add_argument("--project", type=Path, help="the checkout (default: the one this package runs from)")
    p.add_argument("--out", type=Path, help="directory for the report (default: report/ in the project)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.report import write_report
    from ..analysis.tracking import merge_results

    project = find_project(args.project)
    results_dir = project / read_conf(project).get("results_dir", "results")
    try:
        machines = merge_results(args.results, results_dir) if args.results else None
    except ResultsError as e:
        raise UserError(str(e)) from None
    if machines is not None:
        print(f"merged into {results_dir}: {', '.join(machines)}")
    df = load_results(str(results_dir))
    print(f"report:    {write_report(df, args.out or project / 'report', source=str(results_dir))}")
    print(f"dashboard: {publish_dashboard(project)}")
    return 0
