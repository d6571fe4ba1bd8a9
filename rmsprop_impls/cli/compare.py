"""``rmsprop-bench compare``: a quick, asv-free comparison of the variants running one rule on one or more
trees, and with ``--peers`` of the same step in numpy, optax and torch (``measure.peers``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
from contextlib import AbstractContextManager

import mlx.core as mx
from tqdm import tqdm

from ..analysis.tables import format_table
from ..cpu_threads import short_openmp_spin
from ..measure.bandwidth import cache_resident, describe_limits, limit_at, limit_for, measure_limits, percent_text
from ..measure.caches import MIB
from ..measure.compare import VariantResult, time_candidates, variant_candidates
from ..measure.peers import NEEDS_EXTRA, OPTAX_MAX_LEAVES, PEER_LABELS, PEERS, installed_peers, peer_candidates
from ..measure.roof import Probe, cpu_roof_probes, working_set
from ..measure.timing import CALLS, time_floor
from ..measure.trees import leaves_of, random_like, step_bytes
from ..registry import variant_names
from .common import (
    add_cache_limit_argument,
    add_optimizer_arguments,
    add_tree_arguments,
    apply_cache_limit,
    at_least,
    check_tree_name,
    checked_hyper,
    describe_optimizer,
    load_tree,
)

#: The variants every other one is compared with, when they ran.
BASELINES = ("compiled", "eager")
HEADERS = ["tree", "variant", "device", "median ms", "IQR ms", "us/leaf", "GB/s", "roof GB/s", "of limit"]
HEADERS += [f"vs {b}" for b in BASELINES] + ["notes"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="time every variant on one or more trees and print a table",
        description="Time every variant running one optimizer rule (--optimizer, RMSprop by default) on each tree "
        "in this process: median step time, time per leaf, effective GB/s (the bytes the rule reads and writes: 20 "
        "per float32 parameter for RMSprop, 28 for Adam and AdamW), the roof of the device it runs on at the tree's "
        "working set (w, g and the rule's state) and the fraction of that roof (marked cache-resident where the "
        "working set fits in the last-level cache), and the speed-up over the compiled and eager variants. Each "
        "device's roof is first measured as the best of several kernels over working sets from about an L2 to 16 "
        "times the last-level cache; then, per tree, the CPU roof's best kernels at the tree's working set are "
        "timed round-robin with the variants and the peers, one call each per round, so that every ratio and every "
        "fraction of the roof compares the same moments of a machine whose speed drifts (trees too big for all the "
        "candidates to fit in half the memory are timed in groups, each with its own roof). Under the table, the "
        "roof's kernels per tree, the fastest variant per tree and the tree's floor: the tree walk, rebuild and "
        "mx.eval that every step pays, timed with no update. "
        "With --peers, the same step in other libraries is timed in the same rounds, on the same tree, and a line "
        "per tree gives how many times faster the fastest MLX variant (and cpu_kernel) is than each peer; torch's "
        "OpenMP threads are set to spin only briefly after a parallel region (GOMP_SPINCOUNT=10000, KMP_BLOCKTIME=1, "
        "each unless set), so that they do not take the cores of the step after theirs.",
    )
    add_tree_arguments(p, several=True)
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="variants to time (default: all)")
    p.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        metavar="PEER",
        help="also time peers: a peer is the same rule's step written in another library, run on the CPU on the "
        "same parameters and gradients (converted with numpy), as a yardstick for the MLX variants: numpy (the "
        "rule's own trace, in place, no allocation per step), optax (under jax.jit with donated buffers; trees of "
        f"up to {OPTAX_MAX_LEAVES} leaves), torch-foreach, torch-fused (where the torch.optim class has a fused CPU "
        "kernel) and torch-per-tensor. numpy comes with this package, the others with the [peers] extra. With no "
        "names, every peer installed here. None runs on bfloat16 (numpy has no bfloat16); a peer whose math "
        "differs from stock's (torch's and optax's Adam always correct the bias) says so in its notes",
    )
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed steps per variant (default 10)")
    p.add_argument(
        "--call",
        choices=CALLS,
        default="apply_gradients",
        help="how each MLX variant is stepped: params = opt.apply_gradients(grads, params) (the default), or "
        "opt.update(model, grads) on the tree in an nn.Module with mx.eval(model.parameters(), opt.state), as "
        "mlx-examples' and mlx-lm's loops step (there cpu_kernel writes a small leaf's new w over the old one, "
        "as torch's optimizers write theirs); the peers step their own way either way",
    )
    add_optimizer_arguments(p)
    add_cache_limit_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setting = apply_cache_limit(args.cache_limit_mb)
    names = list(dict.fromkeys(args.tree))
    for name in names:  # a bad name fails before any timing; each tree is built just before it is timed
        check_tree_name(name)
    hyper = checked_hyper(args.optimizer, args.hyper)
    openmp = short_openmp_spin()  # before the roof's torch kernel loads torch
    limits = measure_limits()
    peers = None if args.peers is None else args.peers or installed_peers()
    rows, fastest, ratios, roofs = [], [], [], []
    for name in tqdm(names, desc="trees", unit="tree", leave=False):
        params = load_tree(name, args.dtype)
        leaves = leaves_of(params)
        grads = random_like(params)
        mx.eval(params, grads)
        touched = working_set(step_bytes(params, args.optimizer, hyper))
        candidates = variant_candidates(
            params, grads, args.variants, optimizer=args.optimizer, hyper=hyper, call=args.call
        )
        n_variants = len(candidates)
        if peers is not None:
            candidates += peer_candidates(
                params, grads, list(dict.fromkeys(peers)), optimizer=args.optimizer, hyper=hyper
            )
        probes = functools.partial(_probes, limits, touched)
        timed, probe_rates = time_candidates(candidates, params, args.repeats, probes, args.optimizer, hyper)
        results, peer_results = timed[:n_variants], timed[n_variants:]
        rows += [_row(name, r, len(leaves), limits, touched, results, probe_rates) for r in results]
        if peers is not None:
            rows += [
                _row(name, r, len(leaves), limits, touched, results, probe_rates, f"{r.variant} (peer)")
                for r in peer_results
            ]
            ratios.append(_ratio_line(name, results, peer_results))
        roofs.append(_roof_line(name, touched, probe_rates))
        ran = [r for r in results if r.timing]
        if ran:
            best = min(ran, key=lambda r: r.timing.median)
            n_params = sum(x.size for x in leaves)
            floor = time_floor(params, grads, repeats=args.repeats).median
            per_leaf = 1e6 / max(len(leaves), 1)
            fastest.append(
                f"{name} ({len(leaves):,} leaves, {n_params:,} {args.dtype} parameters): {best.variant}, "
                f"{best.timing.median * 1e3:.3f} ms, {best.gbps:.2f} GB/s, {best.timing.median * per_leaf:.1f} us/leaf "
                f"(floor with no update: {floor * per_leaf:.1f} us/leaf)"
            )
        del params, grads, leaves, results
        mx.clear_cache()
    policy = " ".join(f"{k}={v}" for k, v in openmp.items()) if openmp else "their default spin (torch loaded first)"
    print(f"{describe_optimizer(args.optimizer, hyper)}, lr 1e-3; {describe_limits(limits)}; {setting}")
    print(f"every step, peer and roof kernel of a tree timed round-robin; torch's OpenMP threads: {policy}")
    print(f"each MLX step: {CALLS[args.call]}, then mx.eval of the parameters and the state\n")
    print(format_table(HEADERS, rows))
    if any(roofs):
        print("\nthe CPU's roof (its best kernels at each tree's working set, timed in the same rounds as the steps):")
        print("\n".join(f"  {line}" for line in roofs if line))
    if fastest:
        print("\nfastest:\n" + "\n".join(f"  {line}" for line in fastest))
    if peers is not None:
        missing = [p for p in PEERS if p not in installed_peers()] if not args.peers else []
        if missing:
            ratios.append(f"not installed: {', '.join(missing)}: {NEEDS_EXTRA}")
        print("\nvs peers (a peer's median step time over the MLX variant's; above 1x the MLX variant is faster):")
        print("\n".join(f"  {line}" for line in ratios))
    return 0


def _ratio_line(tree: str, results: list[VariantResult], peer_results: list[VariantResult]) -> str:
    """``16x1M: cpu_kernel 2.31x numpy in place, 1.42x optax jit``: the fastest variant, and cpu_kernel when it
    ran and is not the fastest."""
    ran, peers_ran = [r for r in results if r.timing], [p for p in peer_results if p.timing]
    if not ran or not peers_ran:
        return f"{tree}: no {'MLX variant' if not ran else 'peer'} ran"
    best = min(ran, key=lambda r: r.timing.median)
    shown = [best] + [r for r in ran if r.variant == "cpu_kernel" and r is not best]
    clauses = [
        f"{r.variant} "
        + ", ".join(f"{p.timing.median / r.timing.median:.2f}x {PEER_LABELS[p.variant]}" for p in peers_ran)
        for r in shown
    ]
    return f"{tree}: " + "; ".join(clauses)


def _probes(limits: dict, touched: float) -> AbstractContextManager[list[Probe]]:
    """The CPU roof's kernels at this working set, where its roof names them (one measured here, not given)."""
    roof = limit_for(limits, "cpu")
    return cpu_roof_probes(roof, touched) if roof else contextlib.nullcontext([])


def _roof_line(tree: str, touched: float, probe_rates: list[dict[str, float]]) -> str | None:
    """``16x1M (384 MiB): c step pattern 52.1 GB/s, numpy triad 50.3 GB/s``, a clause per round-robin group."""
    groups = [", ".join(f"{k} {gbps:.1f} GB/s" for k, gbps in rates.items()) for rates in probe_rates if rates]
    if not groups:
        return None
    named = [f"group {i + 1}: {g}" for i, g in enumerate(groups)] if len(groups) > 1 else groups
    size = f"{touched / MIB:,.1f} MiB" if touched >= MIB else f"{touched / 1024:,.0f} KiB"
    return f"{tree} ({size}): " + "; ".join(named)


def _row(
    tree: str,
    r: VariantResult,
    n_leaves: int,
    limits: dict,
    touched: float,
    results: list[VariantResult],
    probe_rates: list[dict[str, float]],
    label: str | None = None,
) -> list:
    """One table row; ``touched`` is the tree's working set in bytes, ``results`` the MLX variants' on this tree
    (the baselines), ``probe_rates`` the roof's kernels' GB/s in each round-robin group; ``label`` names a peer's
    row. A CPU row's roof is the best of its group's roof kernels, measured in the same rounds; a GPU row's, or
    one with no kernels timed, the roof measured at the start."""
    label = label or r.variant
    if r.timing is None:
        return [tree, label, r.device] + [None] * (len(HEADERS) - 4) + [f"unavailable: {r.reason}"]
    same_rounds = probe_rates[r.group] if r.device == "cpu" and r.group < len(probe_rates) else {}
    roof = max(same_rounds.values()) if same_rounds else limit_at(limits, r.device, touched)
    resident = cache_resident(limits, r.device, touched)
    base = {b.variant: b.timing.median for b in results if b.variant in BASELINES and b.timing}
    speedups = [f"{base[b] / r.timing.median:.2f}x" if b in base else None for b in BASELINES]
    return [
        tree,
        label,
        r.device,
        f"{r.timing.median * 1e3:.3f}",
        f"{r.timing.iqr * 1e3:.3f}",
        f"{r.timing.median / max(n_leaves, 1) * 1e6:.1f}",
        f"{r.gbps:.2f}",
        f"{roof:.1f}" if roof else None,
        percent_text(r.gbps / roof if roof else None, resident),
        *speedups,
        f"first step {r.timing.first_s * 1e3:.1f} ms" + (f"; math differs: {r.differs}" if r.differs else ""),
    ]
