"""``rmsprop-bench choose``: which variant is fastest for this model, on this machine."""

from __future__ import annotations

import argparse
import json
import sys

from ..analysis.tables import format_table
from ..measure.choice_cache import cache_dir, clear_choices
from ..measure.choose import Choice, choose
from ..measure.trees import MODELS, model_tree, parse_dtype
from ..registry import variant_names
from .common import (
    UserError,
    add_cache_limit_argument,
    add_tree_arguments,
    apply_cache_limit,
    at_least,
    check_output_path,
    device_label,
    load_params_file,
    load_tree,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "choose",
        help="measure every variant on your model or parameters file and name the fastest",
        description="Time every variant that runs here on one tree (a built-in model, a named tree or a "
        "parameters file), with warm-up and interleaved rounds, and name the winner: the simplest of the "
        "variants within measurement noise of the fastest.",
    )
    p.add_argument("--model", choices=list(MODELS), help="a built-in mlx.nn model")
    p.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="its size (default small)")
    p.add_argument(
        "--params", metavar="FILE", help="a .safetensors or .npz file of parameters (mx.save_safetensors, mx.savez)"
    )
    add_tree_arguments(p, default=None, dtype_default=None)
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="candidates (default: all)")
    p.add_argument(
        "--time-budget", type=at_least(0.0, float), default=10.0, help="seconds of timed rounds (default 10)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH ('-' for stdout)")
    p.add_argument(
        "--clear-cache",
        action="store_true",
        help="forget the choices the auto optimizer remembered (alone: clear and exit)",
    )
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[str, dict]:
    sources = [s for s in (args.model, args.tree, args.params) if s]
    if len(sources) != 1:
        raise UserError("give exactly one of --model NAME, --tree NAME or --params FILE")
    if args.params:
        return args.params, load_params_file(args.params)
    if args.model:
        return f"{args.model}-{args.size}", model_tree(args.model, args.size, parse_dtype(args.dtype or "float32"))
    return args.tree, load_tree(args.tree, args.dtype or "float32")


def _table(choice: Choice) -> str:
    rows = []
    for r in choice.rows:
        note = "winner" if r.variant == choice.winner else ("tied" if r.tied else "")
        rows.append(
            [
                r.variant,
                r.device,
                f"{r.median_s * 1e3:.3f}",
                f"{r.q1_s * 1e3:.3f}-{r.q3_s * 1e3:.3f}",
                f"{r.first_s * 1e3:.1f}",
                r.samples,
                f"{r.gbps:.2f}",
                f"{r.slowdown:.2f}x",
                note,
            ]
        )
    for name, why in choice.unavailable.items():
        rows.append([name, device_label(name)] + [None] * 6 + [f"unavailable: {why}"])
    headers = ["variant", "device", "median ms", "IQR ms", "first ms", "steps", "GB/s", "vs fastest", "notes"]
    return format_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    if args.clear_cache:
        print(f"forgot {clear_choices()} remembered auto choice(s) in {cache_dir()}", file=sys.stderr)
        if not (args.model or args.tree or args.params):
            return 0
    if args.time_budget < 0:
        raise UserError("--time-budget must be >= 0 seconds")
    check_output_path(args.json, "--json")
    name, params = _load(args)
    setting = apply_cache_limit(args.cache_limit_mb)
    try:
        # A parameters file keeps its dtypes unless --dtype says otherwise; named trees are made in theirs.
        cast = args.dtype if args.params else None
        choice = choose(params, args.variants, dtype=cast, time_budget_s=args.time_budget, progress=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = sys.stderr if args.json == "-" else sys.stdout
    tree = choice.tree
    dtypes = ", ".join(tree["dtypes"])
    print(f"{name}: {tree['parameters']:,} parameters in {tree['leaves']} leaves ({dtypes}); {setting}\n", file=out)
    print(_table(choice), file=out)
    print(f"\nwinner: {choice.winner} ({choice.why})", file=out)
    if args.json:
        _write_json({"tree_name": name, "setting": setting, **choice.to_dict()}, args.json)
    return 0


def _write_json(result: dict, path: str) -> None:
    text = json.dumps(result, indent=2)
    if path == "-":
        print(text)
        return
    try:
        with open(path, "w") as f:
            f.write(text + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
