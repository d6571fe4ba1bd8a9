"""Times ``cpu_kernel`` and ``compiled`` for every rule on the same trees, interleaved in one process.

For each tree and rule, the rule's ``cpu_kernel`` steps alternately (``time_interleaved``) with RMSprop's
``cpu_kernel``, the yardstick of the same moment, then with the rule's ``compiled``: two alternating pairs,
so that each side follows the other equally often. Printed per row: the
median step, the time per leaf, GB/s (the bytes the rule moves: AdamW 28 per float32 parameter), the
fraction of the CPU's roof at the rule's working set (the roof's best kernels there, timed in the same
rounds: ``rmsprop_impls.measure.roof.cpu_roof_probes``; the best one's median call in either pair's rounds), the
per-leaf cost over RMSprop's ``cpu_kernel`` and the step over ``compiled``'s: every rule in one table, which
``compare --optimizer`` gives one rule at a time. ``--split`` adds, for trees of small leaves only (where
``cpu_kernel`` computes in the call), the call and the ``mx.eval`` after it apart: that eval is MLX's
walk over the arrays the step hands back, which a rule with more state pays for more of. ``--call update``
times every step as mlx-examples' and mlx-lm's loops make it, ``opt.update(model, grads)`` on the tree in an
``nn.Module`` and ``mx.eval(model.parameters(), opt.state)``, where ``cpu_kernel`` writes a small leaf's new w
over the old one; the default is ``params = opt.apply_gradients(grads, params)``::

    python scripts/rule_kernels_bench.py --tree 1x1K 16x1M 256x64K 1024x16K 4096x4K 16384x256 transformer-base
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from rmsprop_impls import create
from rmsprop_impls.kernels import _cpu_ext
from rmsprop_impls.measure.roof import cpu_roof_probes, measure_cpu_roof
from rmsprop_impls.measure.roof_cache import best_so_far
from rmsprop_impls.measure.timing import CALLS, as_model, time_interleaved
from rmsprop_impls.measure.trees import leaves_of, random_like, step_bytes, tree_by_name
from rmsprop_impls.rules import RULE_NAMES, rule


def working_set(name: str, tree) -> int:
    """The bytes of the arrays a step touches: w, g and the states the rule's trace reads."""
    r = rule(name)
    touched = r.trace(r.defaults).used_inputs() & {"w", "g", *r.states}
    return len(touched) * sum(x.nbytes for x in leaves_of(tree))


def yardstick(other: str, name: str):
    """RMSprop's ``cpu_kernel``, or the rule's ``compiled``."""
    return create("cpu_kernel", 1e-3) if other == "rmsprop" else create("compiled", 1e-3, optimizer=name)


def call_and_eval(name: str, params, grads, rounds: int, call: str) -> dict[str, tuple[float, float]]:
    """Median seconds of the call and of the ``mx.eval`` after it, for the rule's ``cpu_kernel`` and for
    RMSprop's, stepped round-robin."""
    optimizers = {"rule": create("cpu_kernel", 1e-3, optimizer=name), "rmsprop": create("cpu_kernel", 1e-3)}
    current = dict.fromkeys(optimizers, params)
    models = {side: as_model(params) for side in optimizers} if call == "update" else {}
    seconds: dict[str, tuple[list, list]] = {side: ([], []) for side in optimizers}
    for round_ in range(rounds + 2):  # the first two: the state made, the spares in place
        for side, opt in optimizers.items():
            start = time.perf_counter()
            if call == "update":
                opt.update(models[side], grads)
                called = time.perf_counter()
                mx.eval(models[side].parameters(), opt.state)
            else:
                current[side] = opt.apply_gradients(grads, current[side])
                called = time.perf_counter()
                mx.eval(current[side], opt.state)
            if round_ >= 2:
                seconds[side][0].append(called - start)
                seconds[side][1].append(time.perf_counter() - called)
    return {side: (statistics.median(c), statistics.median(e)) for side, (c, e) in seconds.items()}


def print_split(tree_names: list[str], rules: list[str], rounds: int, call: str) -> None:
    print("\n| tree | rule | call per leaf | mx.eval per leaf | call / RMSprop's | mx.eval / RMSprop's |")
    print("|---|---|---|---|---|---|")
    for tree_name in tree_names:
        params = tree_by_name(tree_name)
        leaves = leaves_of(params)
        if max(x.size for x in leaves) >= _cpu_ext.EAGER_MAX_ELEMENTS:
            print(f"| {tree_name} | (has big leaves: their update runs in mx.eval, so no split) | | | | |")
            continue
        grads = random_like(params)
        for name in rules:
            t = call_and_eval(name, params, grads, rounds, call)
            (called, ev), (called_r, ev_r) = t["rule"], t["rmsprop"]
            print(
                f"| {tree_name} | {name} | {called / len(leaves) * 1e6:.2f} us | {ev / len(leaves) * 1e6:.2f} us | "
                f"{called / called_r:.2f} | {ev / ev_r:.2f} |",
                flush=True,
            )
        del params, grads
        mx.clear_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", nargs="+", default=["16x1M"])
    parser.add_argument("--rules", nargs="+", default=list(RULE_NAMES), choices=RULE_NAMES)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed rounds per tree and rule")
    parser.add_argument("--split", action="store_true", help="also time the call and mx.eval apart (small leaves)")
    parser.add_argument(
        "--call",
        choices=CALLS,
        default="apply_gradients",
        help="apply_gradients: params = opt.apply_gradients(grads, params) (the default); "
        "update: opt.update(model, grads) on the tree in an nn.Module, as mlx-examples' loops step",
    )
    args = parser.parse_args()
    print(f"Each step: {CALLS[args.call]}\n")
    roof = best_so_far(measure_cpu_roof())
    print("| tree | rule | cpu_kernel step | per leaf | GB/s | of roof | per leaf / RMSprop's | step / compiled's |")
    print("|---|---|---|---|---|---|---|---|")
    for tree_name in args.tree:
        params = tree_by_name(tree_name)
        grads = random_like(params)
        n_leaves = len(leaves_of(params))
        for name in args.rules:
            kernel, ratio, limit = [], {}, 0.0
            for other in ("rmsprop", "compiled"):
                pair = {"kernel": create("cpu_kernel", 1e-3, optimizer=name), other: yardstick(other, name)}
                with cpu_roof_probes(roof, working_set(name, params)) as probes:
                    also = {p.kernel: p.run for p in probes}
                    timings = time_interleaved(pair, params, grads, args.budget / 2, also=also, call=args.call)
                    rates = [p.gbps(timings[p.kernel]) for p in probes]
                limit = max([limit, *rates]) or roof.at(working_set(name, params))
                kernel += timings["kernel"].samples
                ratio[other] = statistics.median(timings["kernel"].samples) / statistics.median(timings[other].samples)
                del pair, timings
            median = {"kernel": statistics.median(kernel)}
            gbps = step_bytes(params, name) / median["kernel"] / 1e9
            per_leaf = median["kernel"] / n_leaves
            print(
                f"| {tree_name} | {name} | {median['kernel'] * 1e3:.3f} ms | {per_leaf * 1e6:.2f} us | {gbps:.1f} | "
                f"{gbps / limit:.0%} | {ratio['rmsprop']:.2f} | {ratio['compiled']:.2f} |",
                flush=True,
            )
        del params, grads
        mx.clear_cache()
    if args.split:
        print_split(args.tree, args.rules, rounds=max(10, round(20 * args.budget)), call=args.call)


if __name__ == "__main__":
    main()
