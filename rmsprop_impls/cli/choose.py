"""``rmsprop-bench choose``: which variant is fastest for this model, on this machine."""

from __future__ import annotations

import argparse
import json
import sys

from ..analysis.tables import format_table
from ..measure.choice_cache import cache_dir, clear_choices
from ..measure.choose import Choice, choose
from ..measure.training import winner_saving
from ..measure.training_models import TrainingModel, model_from_file, training_model, training_model_names
from ..measure.trees import MODELS, model_tree, parse_dtype
from ..registry import variant_names
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
    load_params_file,
    load_tree,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "choose",
        help="measure every variant on your model or parameters file and name the fastest",
        description="Time every variant that runs here on one tree (a built-in model, a named tree or a "
        "parameters file), each running the same optimizer rule (--optimizer, RMSprop by default), with warm-up "
        "and interleaved rounds, and name the winner: the simplest of the variants within measurement noise of "
        "the fastest.",
    )
    p.add_argument("--model", choices=list(MODELS), help="a built-in mlx.nn model")
    p.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="its size (default small)")
    p.add_argument(
        "--params", metavar="FILE", help="a .safetensors or .npz file of parameters (mx.save_safetensors, mx.savez)"
    )
    p.add_argument(
        "--train-model",
        choices=training_model_names(),
        metavar="NAME",
        help="a model that trains (as in 'rmsprop-bench train': " + ", ".join(training_model_names()) + "): "
        "choose on its trainable parameters, then time its whole training step, compiled and not, with the "
        "rule's stock class and with the winner, and say what the winner saves per step. A --params file of a "
        "linear chain or an mlx-lm Llama gets the same",
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
    add_optimizer_arguments(p)
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[str, dict, TrainingModel | None]:
    """The tree to choose on, its name, and the model to time a training step of, where there is one."""
    sources = [s for s in (args.model, args.tree, args.params, args.train_model) if s]
    if len(sources) != 1:
        raise UserError("give exactly one of --model NAME, --tree NAME, --params FILE or --train-model NAME")
    if args.train_model:
        model = _training_model(args)
        return args.train_model, model.module.trainable_parameters(), model
    if args.params:
        return args.params, load_params_file(args.params), _training_model(args)
    if args.model:
        tree = model_tree(args.model, args.size, parse_dtype(args.dtype or "float32"))
        return f"{args.model}-{args.size}", tree, None
    return args.tree, load_tree(args.tree, args.dtype or "float32"), None


def _training_model(args: argparse.Namespace) -> TrainingModel | None:
    """The model whose training step the winner is timed in: ``--train-model``'s, or a ``--params`` file's
    where its layout has a forward pass here (else ``None``)."""
    try:
        return training_model(args.train_model) if args.train_model else model_from_file(args.params)
    except (ValueError, RuntimeError) as e:
        if args.train_model:
            raise UserError(str(e)) from None
        return None


def _saving_lines(winner: str, saving: dict[str, dict[str, float]], optimizer: str) -> str:
    lines = [f"per training step, {winner} instead of stock optim.{rule(optimizer).title}:"]
    for kind, s in saving.items():
        verb = "saves" if s["saved_s"] >= 0 else "costs"
        lines.append(
            f"  {kind:<10}  {verb} {abs(s['saved_s']) * 1e3:.2f} ms of {s['stock_s'] * 1e3:.2f} ms "
            f"({100 * s['saved_s'] / s['stock_s']:+.1f}%; {s['stock_s'] / s['winner_s']:.2f}x)"
        )
    return "\n".join(lines)


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
    hyper = checked_hyper(args.optimizer, args.hyper)
    name, params, model = _load(args)
    setting = apply_cache_limit(args.cache_limit_mb)
    try:
        # A parameters file keeps its dtypes unless --dtype says otherwise; named trees are made in theirs.
        cast = args.dtype if args.params else None
        choice = choose(params, args.variants, cast, args.time_budget, progress=True, optimizer=args.optimizer, **hyper)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = sys.stderr if args.json == "-" else sys.stdout
    tree = choice.tree
    dtypes = ", ".join(tree["dtypes"])
    print(
        f"{name}: {tree['parameters']:,} parameters in {tree['leaves']} leaves ({dtypes}); "
        f"{describe_optimizer(args.optimizer, hyper)}; {setting}\n",
        file=out,
    )
    print(_table(choice), file=out)
    print(f"\nwinner: {choice.winner} ({choice.why})", file=out)
    saving = None
    if model is not None:
        saving = winner_saving(model, choice.winner, args.time_budget, args.optimizer, hyper)
        print("\n" + _saving_lines(choice.winner, saving, args.optimizer), file=out)
    elif args.params:
        print("\n(no training step timed: the file is neither a linear chain nor an mlx-lm Llama)", file=out)
    if args.json:
        _write_json({"tree_name": name, "setting": setting, **choice.to_dict(), "training_step": saving}, args.json)
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
