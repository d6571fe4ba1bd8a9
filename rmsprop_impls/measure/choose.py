"""Pick the fastest variant for one parameter tree, on this machine, by measuring it.

Each available candidate runs real steps on the user's tree (random
gradients of the same shapes and dtypes), interleaved round-robin after a
warm-up, until the time budget is spent. Variants are ranked by median step
time; those within measurement noise of the fastest are *tied* with it, and
among the tied the simplest wins, because it is the one with the least that
can go wrong (no compiler, no extension, no packing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from tqdm import tqdm

from ..registry import create, partition_available, variant_device, variant_names
from ..rules import DEFAULT_RULE, rule
from .timing import StepTiming, time_interleaved
from .trees import leaves_of, parse_dtype, random_like, step_bytes

#: Simplest first: plain MLX ops, then a stream, a compiler, packing, and compiled extensions or kernels.
SIMPLICITY = ["eager", "cpu_stream", "compiled", "flat", "cpu_kernel", "metal_kernel", "cuda_kernel"]

#: Medians closer than this fraction of the fastest are tied even when both spreads are tighter.
MIN_NOISE = 0.05


@dataclass
class RankedVariant:
    """One candidate's measurement; times in seconds per step."""

    variant: str
    median_s: float
    q1_s: float
    q3_s: float
    first_s: float
    samples: int
    gbps: float
    slowdown: float  # median / the fastest median
    tied: bool  # within noise of the fastest
    device: str = ""  # "cpu" or "gpu": where it ran


@dataclass
class Choice:
    """Candidates fastest first, the winner and why, and the variants that could not run here."""

    rows: list[RankedVariant]
    winner: str
    why: str
    unavailable: dict[str, str] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=dict)
    optimizer: str = DEFAULT_RULE  # the rule every candidate ran
    hyper: dict[str, Any] = field(default_factory=dict)  # its hyper-parameters, stock's defaults filled in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def simplicity(name: str) -> int:
    """Position in :data:`SIMPLICITY`; variants it does not name come last."""
    return SIMPLICITY.index(name) if name in SIMPLICITY else len(SIMPLICITY)


def is_tied(fastest: StepTiming, other: StepTiming) -> bool:
    """Within noise: the medians differ by at most the larger IQR of the two, or 5% of the fastest median."""
    noise = max(fastest.iqr, other.iqr, MIN_NOISE * fastest.median)
    return other.median - fastest.median <= noise


def rank(timings: dict[str, StepTiming], nbytes: int) -> tuple[list[RankedVariant], str, str]:
    """Rows fastest first, the winner (the simplest of those tied with the fastest) and why it won."""
    order = sorted(timings, key=lambda name: timings[name].median)
    best = timings[order[0]]
    rows = [
        RankedVariant(
            variant=name,
            median_s=t.median,
            q1_s=t.q1,
            q3_s=t.q3,
            first_s=t.first_s,
            samples=len(t.samples),
            gbps=nbytes / t.median / 1e9,
            slowdown=t.median / best.median,
            tied=is_tied(best, t),
            device=variant_device(name),
        )
        for name, t in ((name, timings[name]) for name in order)
    ]
    tied = [r.variant for r in rows if r.tied]
    winner = min(tied, key=simplicity)
    if len(tied) == 1:
        why = "fastest"
    elif winner == order[0]:
        why = f"fastest, and the simplest of those tied within noise ({', '.join(tied)})"
    else:
        why = f"within noise of the fastest ({order[0]}) and simpler ({', '.join(tied)} are tied)"
    return rows, winner, why


def runnable_candidates(candidates: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The candidates (default: every variant) that run here, and why the others do not; raises if none runs."""
    runnable, unavailable = partition_available(variant_names() if candidates is None else list(candidates))
    if not runnable:
        raise ValueError("no candidate variant runs here: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    return runnable, unavailable


def parameters_of(params_or_model: Any, dtype: mx.Dtype | str | None = None) -> Any:
    """The tree to time: a model's trainable parameters or the tree itself, cast to ``dtype`` if given."""
    params = params_or_model.trainable_parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    if dtype is not None:
        dtype = parse_dtype(dtype)
        params = tree_map(lambda x: x.astype(dtype), params)
    return params


def describe_tree(params: Any) -> dict[str, Any]:
    leaves = leaves_of(params)
    dtypes = sorted({str(x.dtype).removeprefix("mlx.core.") for x in leaves})
    return {"leaves": len(leaves), "parameters": sum(x.size for x in leaves), "dtypes": dtypes}


def choose(
    params_or_model: Any,
    candidates: list[str] | None = None,
    dtype: mx.Dtype | str | None = None,
    time_budget_s: float = 10.0,
    min_rounds: int = 3,
    learning_rate: float = 1e-3,
    progress: bool = False,
    optimizer: str = DEFAULT_RULE,
    **hyper: Any,
) -> Choice:
    """Time each candidate running ``optimizer`` on this tree and return the ranking and the winner:
    ``choose(model, optimizer="adamw", weight_decay=0.1)``.

    Args:
        params_or_model: an ``mlx.nn.Module`` (its trainable parameters are used) or a parameter tree.
        optimizer: the rule every candidate runs (``rmsprop_impls.rules.RULE_NAMES``), with ``hyper`` its
            hyper-parameters by stock's names (stock's defaults and checks).
        candidates: variant names (default: every variant); those that cannot run here are
            listed in ``Choice.unavailable`` with the reason.
        dtype: cast the parameters to this dtype first (default: keep theirs).
        time_budget_s: seconds of timed rounds after the warm-up (each candidate's first step and
            one more untimed round); at least ``min_rounds`` rounds run whatever the budget.

    While measuring, each candidate holds its own copy of the parameters and state (a
    gigabyte per candidate for a 124M-parameter float32 model).

    Ties: a candidate is tied with the fastest when their medians differ by at most the larger of
    the two interquartile ranges, or by 5% of the fastest median, whichever is larger. The winner is
    the simplest tied candidate in the order of :data:`SIMPLICITY`.
    """
    the_rule = rule(optimizer)
    hyper = the_rule.hyperparameters(**hyper)
    params = parameters_of(params_or_model, dtype)
    runnable, unavailable = runnable_candidates(candidates)
    grads = random_like(params)
    optimizers = {name: create(name, learning_rate, optimizer=the_rule, **hyper) for name in runnable}
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} of the time budget"
    with tqdm(total=time_budget_s, desc="measuring", bar_format=bar_format, disable=not progress, leave=False) as bar:
        timings = time_interleaved(
            optimizers,
            params,
            grads,
            time_budget_s,
            min_rounds=min_rounds,
            on_step=lambda name, s: bar.update(min(s, max(bar.total - bar.n, 0))),
        )
    rows, winner, why = rank(timings, step_bytes(params, the_rule, hyper))
    return Choice(rows, winner, why, unavailable, describe_tree(params), the_rule.name, hyper)
