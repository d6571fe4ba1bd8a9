"""Time every variant running one rule on one tree, in one process, so the figures compare."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..registry import availability, create, variant_device
from ..rules import DEFAULT_RULE, Rule, rule
from .timing import StepTiming, time_steps
from .trees import step_bytes


@dataclass
class VariantResult:
    variant: str
    timing: StepTiming | None  # None where the variant cannot run here
    reason: str | None = None  # why it cannot
    gbps: float | None = None
    device: str | None = None  # "cpu" or "gpu": where it runs, whose limit its GB/s is a fraction of
    differs: str | None = None  # a peer's: how its math differs from stock's, where it does


def compare_variants(
    params: Any,
    grads: Any,
    variants: list[str] | None = None,
    repeats: int = 10,
    learning_rate: float = 1e-3,
    progress: bool = True,
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
) -> list[VariantResult]:
    """Median step time and effective GB/s of each variant running ``optimizer`` (stock's hyper-parameters
    ``hyper``), unavailable ones with their reason."""
    r = rule(optimizer)
    h = r.hyperparameters(**(hyper or {}))
    reasons = availability()
    variants = variants or list(reasons)
    nbytes = step_bytes(params, r, h)
    results = []
    for name in tqdm(variants, desc="timing variants", unit="variant", disable=not progress, leave=False):
        if reasons.get(name) is not None:
            results.append(VariantResult(name, None, reasons[name], device=variant_device(name)))
            continue
        timing = time_steps(create(name, learning_rate, optimizer=r, **h), params, grads, repeats=repeats)
        results.append(VariantResult(name, timing, gbps=nbytes / timing.median / 1e9, device=variant_device(name)))
    return results
