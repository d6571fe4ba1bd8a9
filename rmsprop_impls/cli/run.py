"""``rmsprop-bench run``: the asv suite on the current commit, the dashboard, and the fastest variant per tree."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..analysis.dashboard import DashboardError, build_dashboard
from ..analysis.suite import KeptResults, RunSettings, find_project, git_head, read_conf, run_benchmarks, write_run_conf
from ..analysis.tables import format_table
from ..measure.bandwidth import describe_limits, percent_text
from ..registry import unavailable_reason
from ..rules import RULE_NAMES, UnknownRuleError, rule
from .common import UserError, add_cache_limit_argument, load_results

if TYPE_CHECKING:
    import pandas as pd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the asv suite on this commit, publish the dashboard, print the fastest variant per tree",
        description="Run the asv benchmark suite for the current commit with this Python (asv's 'existing' "
        "environment), publish the dashboard (asv publish) and print, per optimizer and tree, the fastest variant "
        "with its median step time, GB/s and fraction of the measured bandwidth limit. The default subset times "
        "RMSprop and AdamW; --optimizer picks others, --full every rule. Ctrl-C keeps all earlier results.",
    )
    p.add_argument(
        "--full", action="store_true", help="the whole grid (every tree, dtype and optimizer) instead of the subset"
    )
    p.add_argument(
        "--optimizer",
        action="append",
        metavar="NAME",
        help="time these optimizer rules only (repeatable or a comma list, e.g. --optimizer adam,lion; one of "
        f"{', '.join(RULE_NAMES)}); default: the subset's rmsprop and adamw, every rule with --full",
    )
    p.add_argument("--quick", action="store_true", help="one sample per benchmark (asv run --quick)")
    p.add_argument("-b", "--bench", action="append", metavar="REGEX", help="only benchmarks matching REGEX (asv -b)")
    p.add_argument("--project", type=Path, help="the checkout to benchmark (default: the one this package runs from)")
    p.add_argument("--machine", help="asv machine name (default: this host's name)")
    p.add_argument(
        "--mlx",
        nargs="+",
        metavar="RELEASE",
        help="benchmark the committed HEAD under each of these MLX releases, one asv virtualenv each (e.g. --mlx "
        "0.31.2 0.32.4), instead of with this Python; the report compares the releases",
    )
    p.add_argument(
        "--compile-dir",
        type=Path,
        help="TMPDIR for the benchmarks, where mx.compile caches its g++ kernels (default: .asv/tmp in the project)",
    )
    p.add_argument("--verbose", action="store_true", help="echo asv's output")
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    project = find_project(args.project)
    compile_dir = args.compile_dir or project / ".asv" / "tmp"
    settings = RunSettings(
        args.full,
        args.quick,
        args.bench,
        args.cache_limit_mb,
        compile_dir.resolve(),
        args.machine,
        args.mlx,
        optimizer_names(args.optimizer),
    )
    where = "in asv virtualenvs (uncommitted changes are not measured)" if args.mlx else f"with {sys.executable}"
    print(f"benchmarking {project} at {git_head(project)[:8]} {where}")
    print(f"settings: {settings.describe()}", flush=True)
    if not args.mlx:
        # The C++ extension builds on first use: here, once, rather than inside a benchmark under asv's timeout.
        reason = unavailable_reason("cpu_kernel")
        print(f"cpu_kernel: {'ready' if reason is None else f'skipped ({reason})'}", flush=True)
    log: list[str] = []

    def on_line(line: str) -> None:
        log.append(line)
        if args.verbose:
            print(line, end="", file=sys.stderr)

    results_dir = project / read_conf(project).get("results_dir", "results")
    earlier = KeptResults(results_dir)
    start = time.perf_counter()
    try:
        status = run_benchmarks(project, settings, sys.executable, on_line)
    except KeyboardInterrupt:
        earlier.restore()
        print("interrupted: results saved by earlier runs are intact; this run saved nothing", file=sys.stderr)
        raise
    if status != 0 and not any("failed" in line for line in log):
        raise UserError(f"asv run exited with status {status}: {''.join(log[-5:]).strip()}")
    print(f"\nasv run took {time.perf_counter() - start:.0f} s")
    failed = [line.strip() for line in log if line.rstrip().endswith("failed")]
    if failed:
        print(f"{len(failed)} benchmark(s) failed (see asv's output with --verbose):", *failed, sep="\n  ")
    results = load_results(str(results_dir))
    this_run = results[results["commit"] == git_head(project)]
    if this_run.empty:
        raise UserError(f"asv saved no results for this commit under {results_dir}")
    print(summary(this_run))
    if args.mlx:
        print(release_summary(this_run))
    from ..analysis.report import write_report  # matplotlib: only once there are results to draw

    print()
    print(f"report:    {write_report(results, project / 'report', source=str(results_dir))}")
    print(f"dashboard: {publish_dashboard(project)}")
    return 0


def optimizer_names(given: list[str] | None) -> list[str] | None:
    """The rules ``--optimizer`` names (each a name or a comma list), as the suites spell them; ``None``: none given."""
    if not given:
        return None
    try:
        return list(dict.fromkeys(rule(name.strip()).name for names in given for name in names.split(",") if name))
    except UnknownRuleError as e:
        raise UserError(f"--optimizer: {e}") from None


def publish_dashboard(project: Path) -> str:
    """Publish the self-contained dashboard; where its JavaScript cannot be fetched, say so and keep asv's page."""
    try:
        html = build_dashboard(write_run_conf(project))
    except DashboardError as e:
        return f"not made self-contained ({e}); asv's own page is in {project / '.asv' / 'html'}"
    return f"{html / 'index.html'} (offline-safe); 'rmsprop-bench dashboard' serves it on http://127.0.0.1:8080/"


def summary(results: pd.DataFrame) -> str:
    """Each device's bandwidth limit and, per optimizer, tree and dtype, the fastest variant of the newest run in
    ``results``."""
    from ..analysis.report import winners
    from ..analysis.results import FRACTION_BENCHMARK, device_limits, latest

    limits = device_limits(latest(results))
    rows = [
        [
            r.optimizer,
            r.tree,
            r.dtype,
            r.variant,
            r.device,
            f"{r.median * 1e3:.3f}",
            None if math.isnan(r.gbps) else f"{r.gbps:.2f}",
            percent_text(r.fraction_of_limit, r.cache_resident),
        ]
        for r in winners(results).itertuples()
    ]
    head = f"\n{describe_limits(limits)}\n" if limits["cpu"] else "\n"
    if (results["benchmark"] == FRACTION_BENCHMARK).any():
        head += "of limit, on the CPU: of the roof's kernels at the step's working set, timed in the same rounds\n"
    headers = ["optimizer", "tree", "dtype", "fastest", "device", "median ms", "GB/s", "of limit"]
    return head + format_table(headers, rows)


def release_summary(results: pd.DataFrame) -> str:
    """Per optimizer, tree and variant, the median step time under each MLX release and the newest over the oldest."""
    from ..analysis.tracking import by_release, releases_in

    table = by_release(results)
    if table.empty:
        return "\nno two MLX releases have results for this commit (see the failures above)"
    releases = releases_in(table)
    rows = [
        [r["machine"], r["optimizer"], r["tree"], r["dtype"], r["variant"], *(f"{r[m] * 1e3:.3f}" for m in releases),
         f"{r['ratio']:.2f}x"]
        for _, r in table.iterrows()
    ]  # fmt: skip
    headers = ["machine", "optimizer", "tree", "dtype", "variant", *(f"MLX {m} ms" for m in releases), "newest/oldest"]
    return "\nstep time per MLX release:\n" + format_table(headers, rows)
