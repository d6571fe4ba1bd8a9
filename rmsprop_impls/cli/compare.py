"""``rmsprop-bench compare``: a quick, asv-free comparison of the variants on one tree."""

from __future__ import annotations

import argparse

from ..bandwidth import measure_bandwidth
from ..compare import compare_variants
from ..registry import variant_names
from ..tables import format_table
from ..trees import leaves_of, random_like
from .common import add_cache_limit_argument, add_tree_arguments, apply_cache_limit, load_tree


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="time every variant on one tree and print a table",
        description="Time every variant on one tree in this process: median step time, effective GB/s "
        "(20 bytes per float32 parameter) and the fraction of this machine's measured bandwidth limit.",
    )
    add_tree_arguments(p)
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="variants to time (default: all)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (default 10)")
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setting = apply_cache_limit(args.cache_limit_mb)
    params = load_tree(args.tree, args.dtype)
    grads = random_like(params)
    limit = measure_bandwidth()
    results = compare_variants(params, grads, args.variants, repeats=args.repeats)
    n_params = sum(x.size for x in leaves_of(params))
    base = next((r.timing.median for r in results if r.variant == "eager" and r.timing), None)
    rows = []
    for r in results:
        if r.timing is None:
            rows.append([r.variant, None, None, None, None, None, f"unavailable: {r.reason}"])
            continue
        rows.append(
            [
                r.variant,
                f"{r.timing.median * 1e3:.3f}",
                f"{r.timing.iqr * 1e3:.3f}",
                f"{r.gbps:.2f}",
                f"{100 * r.gbps / limit:.0f}%",
                f"{base / r.timing.median:.2f}x" if base else None,
                f"first step {r.timing.first_s * 1e3:.1f} ms",
            ]
        )
    print(f"tree {args.tree} ({n_params:,} {args.dtype} parameters, {len(leaves_of(params))} leaves); {setting}")
    print(f"memory-bandwidth limit (in-place triad, all cores): {limit:.1f} GB/s\n")
    print(format_table(["variant", "median ms", "IQR ms", "GB/s", "of limit", "vs eager", "notes"], rows))
    ran = [r for r in results if r.timing]
    if ran:
        best = min(ran, key=lambda r: r.timing.median)
        print(f"\nfastest: {best.variant} ({best.timing.median * 1e3:.3f} ms, {best.gbps:.2f} GB/s)")
    return 0
