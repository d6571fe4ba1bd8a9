"""``rmsprop-bench selftest``: the first command on new hardware; its Markdown goes into a bug report as is."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..analysis.tables import markdown_table
from ..measure.bandwidth import percent_text
from ..measure.selftest import DRIFT_MARGIN, SPEED_TREE, STEPS, SelftestResult, VariantReport, run_selftest
from ..registry import variant_names
from ..rules import RULE_NAMES, rule
from .common import (
    UserError,
    add_cache_limit_argument,
    apply_cache_limit,
    at_least,
    check_output_path,
    check_tree_name,
    optimizer_name,
)

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "selftest",
        help="check every variant against the float64 reference and the stock class, and time it: run this first",
        description="Run every variant that works here, running one optimizer rule (--optimizer, RMSprop by "
        "default), against the float64 reference and the rule's stock class (mlx.optimizers.RMSprop, AdamW, ...) "
        "in float32, float16 and bfloat16 (nested trees with odd sizes, a 0-d leaf, a schedule with non-default "
        "hyper-parameters, large gradients, 100 steps), count its largest error in ulps of stock and relative to "
        "float64, "
        "and time it against the bandwidth limit of its device. A variant fails where it differs from stock (any "
        "bit, where it promises stock's bits) or drifts from float64 further than stock itself does here; stock's "
        "own drift is reported, not judged. Writes the results as JSON and a Markdown summary to paste into a bug "
        "report; exits 1 when any variant fails.",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        default="selftest.json",
        help="where to write the results (default selftest.json); the Markdown summary goes beside it as .md",
    )
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="variants to check (default: all)")
    p.add_argument("--steps", type=at_least(1), default=STEPS, help=f"steps per trajectory (default {STEPS})")
    p.add_argument(
        "--speed-tree",
        default=SPEED_TREE,
        help=f"tree for the speed check (default {SPEED_TREE}); 'none' skips the speed check",
    )
    p.add_argument(
        "--optimizer",
        type=optimizer_name,
        default="rmsprop",
        metavar="NAME",
        help="the mlx.optimizers rule to check, any case: " + ", ".join(RULE_NAMES) + " (default rmsprop); each "
        "case runs it with stock's defaults, the schedule case with its last configuration (its branches: "
        "momentum, bias correction)",
    )
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_path(args.json, "--json")
    speed_tree = None if args.speed_tree.lower() == "none" else args.speed_tree
    if speed_tree:
        check_tree_name(speed_tree)
    setting = apply_cache_limit(args.cache_limit_mb)
    result = run_selftest(args.variants, steps=args.steps, speed_tree=speed_tree, optimizer=args.optimizer)
    json_path = Path(args.json)
    md_path = json_path.with_suffix(".md")
    summary = markdown_summary(result, setting)
    try:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        md_path.write_text(summary + "\n")
    except OSError as e:
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from None
    print(summary)
    print(f"\nwrote {json_path} and {md_path}: attach both to a bug report")
    return 0 if result.passed else 1


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if math.isfinite(value) else str(value)


def _per_dtype(report: VariantReport, attribute: str, fmt: str) -> str:
    dtypes = dict.fromkeys(c.dtype for c in report.checks)
    return " / ".join(_number(report.worst(attribute, d), fmt) for d in dtypes) or "-"


def _bit_identical(report: VariantReport) -> str:
    dtypes = list(dict.fromkeys(c.dtype for c in report.checks))
    if not dtypes:
        return "-"
    differ = {d: report.worst("differing_vs_stock", d) for d in dtypes}
    if not any(differ.values()):
        text = "yes"
    else:
        text = (
            "no: " + ", ".join(f"{100 * share:.2g}% of {_SHORT[d]}" for d, share in differ.items() if share) + " differ"
        )
    promised = report.stock_exact.startswith("promised")
    return f"{text} (promised)" if promised else text


def _result_text(report: VariantReport) -> str:
    return "pass" if report.passed else "**FAIL**"


def _stock_summary(result: SelftestResult) -> str:
    """Stock's own drift from float64, and where it is outside the agreement tests' bound: reported, not judged."""
    drift = ", ".join(
        f"{s['case']} {_SHORT[s['dtype']]} {_number(s['rel_w_vs_reference'], '.1e')} / "
        f"{_number(s['rel_state_vs_reference'], '.1e')}"
        for s in result.stock
    )
    title = rule(result.optimizer).title
    text = f"Stock {title} against float64 (largest relative error of w / state; reported, not judged): {drift}."
    outside = [s for s in result.stock if not s["within_tolerance"]]
    if outside:
        where = ", ".join(
            f"{s['case']} {_SHORT[s['dtype']]} (w {_number(s['rel_w_vs_reference'], '.3g')} of "
            f"{s['w_tolerance']:.3g}, state {_number(s['rel_state_vs_reference'], '.3g')} of "
            f"{s['state_tolerance']:.3g})"
            for s in outside
        )
        text += (
            f" Stock itself is outside the agreement tests' bound `c*sqrt(steps)` in {where}: that is this "
            "machine's and this MLX's rounding, and each variant is judged against stock's own drift instead."
        )
    return text


def markdown_summary(result: SelftestResult, setting: str = "") -> str:
    """The summary a user pastes into a bug report: the machine, then one row per variant, then what went wrong."""
    info = result.platform
    failures = [
        (v.variant, f)
        for v in result.variants
        for f in ([v.error] if v.error else []) + [x for c in v.checks for x in c.failures]
    ]
    verdict = "PASSED" if result.passed else f"FAILED ({len(failures)} disagreement{'s' * (len(failures) != 1)})"
    cores = f"{info['cpu_cores']} cores" + (
        " (" + ", ".join(f"{n} {k}" for k, n in info["core_types"].items()) + ")" if info["core_types"] else ""
    )
    cpu_limit = info["limits"]["cpu"]
    limits = {"cpu limit (roof: best of several kernels, all cores)": cpu_limit, "gpu limit": info["limits"]["gpu"]}
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    dtypes = " / ".join(_SHORT[d] for d in ("float32", "float16", "bfloat16"))
    speed = next((v.speed["tree"] for v in result.variants if v.speed), None)
    machine = [
        ["platform", f"{info['platform']} ({info['machine']}), Python {info['python']}"],
        ["CPU", f"{info['cpu']}, {cores}"],
        ["GPU", info["gpu"] or "none"],
        ["MLX", f"{info['mlx']} ({packages})"],
        [
            "devices",
            f"default {info['default_device']}; " + "; ".join(f"{d} {t}" for d, t in limits.items()),
        ],
        [
            "checks",
            f"{len(result.cases)} trees ({', '.join(c.name for c in result.cases)}) x {dtypes} x {result.steps} "
            f"steps of {rule(result.optimizer).title} against the float64 reference and "
            f"mlx.optimizers.{rule(result.optimizer).title}" + (f"; speed on {speed} float32" if speed else ""),
        ],
        ["wall time", f"{result.wall_s:.0f} s" + (f"; {setting}" if setting else "")],
    ]
    rows = []
    for v in result.variants:
        if v.unavailable:
            continue
        fraction = v.speed["fraction_of_limit"] if v.speed else None
        rows.append(
            [
                v.variant,
                v.device,
                _result_text(v),
                _per_dtype(v, "ulps_vs_stock", "g"),
                _bit_identical(v),
                _per_dtype(v, "rel_w_vs_reference", ".1e"),
                _number(v.speed["gbps"], ".2f") if v.speed else "-",
                percent_text(fraction, v.speed.get("cache_resident", False)) if fraction is not None else "-",
            ]
        )
    headers = ["variant", "device", "result", f"max ulps vs stock ({dtypes})", "bit-identical with stock"]
    headers += [f"max rel. error of w vs float64 ({dtypes})", "GB/s", "of limit"]
    sections = [
        f"## rmsprop-bench selftest ({rule(result.optimizer).title}): {verdict}",
        markdown_table(["", ""], machine),
        markdown_table(headers, rows),
        _stock_summary(result),
        "Errors are `|x - x_ref| / (1 + |x_ref|)` after the last step; ulps of the dtype are `|x - y| / "
        "ulp(max(|x|, |y|, 1))`, the same scale, over w and the state arrays. Judged, per tree and dtype, against "
        "stock on the same data: a variant marked \"(promised)\" (precision='stock') must give stock's bits "
        "exactly, any other must be no further from stock in ulps than float64 is plus the margin `c*sqrt(steps)` "
        "in ulps at 1 (times the float64 trajectory's largest step where that exceeds 1; `c` = 1e-6 for float32, "
        "1e-3 for float16, 1e-2 for bfloat16); and every variant's w and state must be no further from float64 "
        f"than stock's plus {DRIFT_MARGIN:g} times that. Stock's own drift is not judged.",
    ]
    unavailable = [v for v in result.variants if v.unavailable]
    if unavailable:
        lines = [f"- {v.variant} ({v.device or 'device unknown'}): {v.unavailable}" for v in unavailable]
        sections.append("### Unavailable here\n\n" + "\n".join(lines))
    if failures:
        sections.append("### Disagreements\n\n" + "\n".join(f"- {name}: {f}" for name, f in failures))
    return "\n\n".join(sections)
