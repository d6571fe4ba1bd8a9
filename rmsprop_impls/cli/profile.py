"""``rmsprop-bench profile``: where each variant's step time goes on one tree, and what to fix."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlx.core as mx

from ..analysis.tables import format_table
from ..measure.bandwidth import cache_resident, describe_limits, percent_text
from ..measure.profile import MB, capture_steps, plot_profiles, profile_variants
from ..measure.roof import working_set
from ..measure.trees import leaves_of, random_like, step_bytes
from ..registry import create, variant_names
from ..rules import rule
from .common import (
    UserError,
    add_cache_limit_argument,
    add_optimizer_arguments,
    add_tree_arguments,
    apply_cache_limit,
    at_least,
    check_output_path,
    checked_hyper,
    describe_optimizer,
    device_label,
    load_tree,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="explain each variant's step: build vs eval time, memory, page faults, GB/s, and the fixes",
        description="Profile each variant running one optimizer rule (--optimizer, RMSprop by default) on one "
        "tree: graph-build vs evaluation time, first-step cost, peak and "
        "active memory, peak growth and minor page faults per step, effective GB/s against the measured "
        "bandwidth limit of the device each variant runs on; then flag a too-small allocator cache, retracing and "
        "per-leaf launch overhead.",
    )
    add_tree_arguments(p)
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="variants to profile (default: all)")
    p.add_argument(
        "--steps", type=at_least(1), default=10, help="profiled steps per variant after warm-up (default 10)"
    )
    p.add_argument("--figure", metavar="PATH", help="also save a bar chart of build and eval time per step")
    p.add_argument(
        "--metal-capture",
        metavar="PATH",
        help="then record a Metal GPU trace of each variant's --steps steps to PATH (a new .gputrace; with several "
        "variants, PATH's name plus -VARIANT), after the table, so no figure is measured under capture; Apple "
        "silicon only, run with MTL_CAPTURE_ENABLED=1",
    )
    add_optimizer_arguments(p)
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def capture_paths(path: str, variants: list[str]) -> dict[str, Path]:
    """Where each variant's trace goes: ``path`` for one variant, ``<stem>-<variant>.gputrace`` for several."""
    base = Path(path)
    if len(variants) == 1:
        return {variants[0]: base}
    return {name: base.with_name(f"{base.stem}-{name}{base.suffix}") for name in variants}


def check_metal_capture(path: str | None) -> None:
    """Fail before the long work on what would make the capture fail: no Metal, a path Metal will not write."""
    if path is None:
        return
    if not mx.metal.is_available():
        raise UserError(
            f"--metal-capture is unavailable here: it records a Metal GPU trace, and this MLX runs on "
            f"{mx.default_device()} without Metal (it needs Apple silicon)"
        )
    if Path(path).suffix != ".gputrace":
        raise UserError(f"--metal-capture {path}: Metal writes a trace only to a path ending in .gputrace")
    check_output_path(path, "--metal-capture")


def _start(path: Path):
    def start() -> None:
        if path.exists():
            raise UserError(f"--metal-capture: {path} exists, and Metal does not overwrite a trace")
        try:
            mx.metal.start_capture(str(path))
        except RuntimeError as e:
            unset = "" if os.environ.get("MTL_CAPTURE_ENABLED") == "1" else " (is MTL_CAPTURE_ENABLED=1 set?)"
            raise UserError(f"cannot start a Metal capture to {path}{unset}: {e}") from None

    return start


def record_captures(path: str, variants: list[str], params, grads, steps: int, optimizer: str, hyper: dict) -> None:
    for name, where in capture_paths(path, variants).items():
        variant = create(name, 1e-3, optimizer=optimizer, **hyper)
        capture_steps(variant, params, grads, steps, _start(where), mx.metal.stop_capture)
        print(f"Metal trace of {steps} steps of {name}: {where} (recorded after the table's measurements)")


def run(args: argparse.Namespace) -> int:
    check_output_path(args.figure, "--figure")
    check_metal_capture(args.metal_capture)
    hyper = checked_hyper(args.optimizer, args.hyper)
    setting = apply_cache_limit(args.cache_limit_mb)
    params = load_tree(args.tree, args.dtype)
    grads = random_like(params)
    profiles, unavailable, limits = profile_variants(
        params, grads, args.variants, steps=args.steps, progress=True, optimizer=args.optimizer, hyper=hyper
    )
    n_params = sum(x.size for x in leaves_of(params))
    print(f"tree {args.tree} ({n_params:,} {args.dtype} parameters, {len(leaves_of(params))} leaves); {setting}")
    print(f"{describe_optimizer(args.optimizer, hyper)}; {describe_limits(limits)}\n")
    touched = working_set(step_bytes(params, args.optimizer, hyper))
    rows = [
        [
            p.variant,
            p.device,
            f"{p.first_step_s * 1e3:.1f}",
            f"{p.build_s * 1e3:.3f}",
            f"{p.eval_s * 1e3:.3f}",
            f"{p.gbps:.2f}",
            percent_text(p.of_limit, cache_resident(limits, p.device, touched)),  # None: no limit for its device
            f"{p.peak_bytes / MB:.1f}",
            f"{p.active_bytes / MB:.1f}",
            f"{p.peak_growth_bytes / MB:.2f}",
            f"{p.faults_per_step:.0f}",
            None if p.traces_per_step is None else f"{p.traces_per_step:.2f}",
            "",
        ]
        for p in profiles
    ]
    rows += [[name, device_label(name)] + [None] * 10 + [f"unavailable: {why}"] for name, why in unavailable.items()]
    headers = ["variant", "device", "first ms", "build ms", "eval ms", "GB/s", "of limit", "peak MB", "active MB"]
    headers += ["peak growth MB", "faults/step", "traces/step", "notes"]
    print(format_table(headers, rows))
    notes = [f for p in profiles for f in p.findings]
    print("\nfindings:" if notes else "\nfindings: none of the known slow patterns")
    for note in notes:
        print(f"- {note}")
    if args.figure:
        title = f"{rule(args.optimizer).title} step on {args.tree} ({args.dtype}): graph build vs evaluation"
        try:
            plot_profiles(profiles, title, args.figure)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot save the figure to {args.figure}: {e}") from None
        print(f"\nfigure: {args.figure}")
    if args.metal_capture:
        print()
        variants = [p.variant for p in profiles]
        record_captures(args.metal_capture, variants, params, grads, args.steps, args.optimizer, hyper)
    return 0
