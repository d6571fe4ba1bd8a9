"""``rmsprop-bench train``: what each optimizer and variant costs inside a whole training step of a model."""

from __future__ import annotations

import argparse
import math

from tqdm import tqdm

from ..analysis.tables import format_table
from ..measure.training import DEFAULT_RULES, STEP_KINDS, TrainingResult, measure_training, optimizer_variants
from ..measure.training_models import model_from_file, training_model, training_model_names
from .common import (
    UserError,
    add_cache_limit_argument,
    add_optimizer_arguments,
    apply_cache_limit,
    at_least,
    checked_hyper,
)

HEADERS = ["step", "rule", "variant", "step ms", "IQR ms", "alone ms", "in step ms", "share", "vs stock", "peak MiB"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="time whole training steps (forward, backward, update) of a model per optimizer and variant",
        description="Train a model built with random weights (or loaded from a parameters file) for a few steps "
        "with each optimizer rule and variant, interleaved in this process: once with the step compiled as "
        "mlx-lm's trainer compiles it (mx.compile over the model's, the optimizer's and MLX's random state), once "
        "uncompiled; the same batch and loss for every candidate. Per candidate: the whole step's median and IQR; "
        "'alone', the same optimizer's step alone on the model's trainable parameters (as 'compare' times it); "
        "'in step', the whole step less the forward and backward pass alone in the same mode (what the update "
        "really costs there) and its share of the step; the step's speed-up over stock (the same rule and mode); "
        "and the step's peak memory (weights and optimizer state, plus what the step allocates). Every rule runs "
        "with its stock class and each of this project's variants.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        choices=training_model_names(),
        help="a built-in model: mlp-2048 (4x Linear(2048, 2048), batch 8, MSE), mlx-lm's Llama at llama-tiny "
        "(156K parameters), -10m, -30m, -100m (next-token loss on random tokens), or llama-30m-lora (mlx-lm's "
        "LoRA, a frozen base); the Llama models need mlx-lm (pip install 'rmsprop-bench[train]')",
    )
    source.add_argument(
        "--params",
        metavar="FILE",
        help="a .safetensors or .npz file of weights: a chain of linear layers (layers.N.weight, as nn.Sequential "
        "saves it; batch 8, MSE) or an mlx-lm Llama (model.embed_tokens.weight, ...; heads of 64)",
    )
    add_optimizer_arguments(p, several=True, default=list(DEFAULT_RULES), aliases=("--rules",))
    p.add_argument(
        "--variants",
        nargs="+",
        choices=optimizer_variants("rmsprop"),
        help="variants to time (default: stock and every variant); 'stock' is the rule's own MLX class",
    )
    p.add_argument("--step", nargs="+", choices=list(STEP_KINDS), default=list(STEP_KINDS), help="step kinds")
    p.add_argument(
        "--time-budget", type=at_least(0.0, float), default=20.0,
        help="seconds of timed rounds, split over the step kinds (default 20); at least 3 rounds run",
    )  # fmt: skip
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    try:
        return model_from_file(args.params) if args.params else training_model(args.model)
    except (ValueError, RuntimeError) as e:  # a bad file; mlx-lm missing, too old or not for this MLX
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    rules = list(dict.fromkeys(args.optimizer))
    hyper = {r: checked_hyper(r, args.hyper) for r in rules}  # --hyper applies to every rule named
    setting = apply_cache_limit(args.cache_limit_mb)
    model = _load(args)
    with tqdm(desc="training steps", unit="step", leave=False) as bar:

        def stepped(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        result = measure_training(
            model, rules, args.variants, tuple(args.step), args.time_budget, on_step=stepped, hyper=hyper
        )
    d = result.description
    print(
        f"{model.name}: {d['parameters']:,} parameters, {d['trainable']:,} trainable in {d['trainable_leaves']} "
        f"leaves; batch {d['batch']}; {setting}\n"
    )
    print(training_table(result))
    return 0


def _ms(seconds: float) -> str | None:
    return None if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def training_table(result: TrainingResult) -> str:
    """The rows of ``result`` aligned, the forward-and-backward time per mode under them, and the notes."""
    rows, notes = [], []
    for r in result.rows:
        if math.isnan(r.step_s):  # skipped in every step kind: said once
            notes.append(f"{r.rule} {r.variant}: {r.note}")
            continue
        if r.note:
            notes.append(f"{r.step_kind} {r.rule} {r.variant}: {r.note}")
        rows.append(
            [r.step_kind, r.rule, r.variant, _ms(r.step_s), f"{_ms(r.q1_s)}-{_ms(r.q3_s)}", _ms(r.alone_s),
             _ms(r.in_step_s), f"{100 * r.share:.0f}%", None if math.isnan(r.speedup) else f"{r.speedup:.2f}x",
             f"{r.peak_bytes / 2**20:.1f}"]
        )  # fmt: skip
    lines = [format_table(HEADERS, rows), ""]
    lines += [f"forward and backward alone, {kind}: {_ms(s)} ms" for kind, s in result.grad_only_s.items()]
    return "\n".join(lines + ([""] + sorted(set(notes)) if notes else []))
