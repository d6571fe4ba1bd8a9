"""One optimizer step per variant, tree, dtype and rule: its time, effective bandwidth, peak memory and first step."""

import mlx.core as mx

from rmsprop_impls.measure import timing
from rmsprop_impls.measure.timing import run_step

from .common import (
    apply_settings,
    bytes_moved,
    check_in_subset,
    dtypes,
    fraction_in_same_rounds,
    limit_at,
    make_optimizer,
    measure_limit,
    optimizers,
    tree_and_gradients,
    trees,
    variant_device,
    variants,
)


class Step:
    """The steady state of a training loop: each step feeds its output back in.

    asv re-runs ``setup`` before every sample; the optimizer is built (and its
    first step taken: init, compile, kernel build) only once per process, so
    ``compiled`` does not retrace for each sample.
    """

    params = (variants(), trees(), dtypes(), optimizers())
    param_names = ["variant", "tree", "dtype", "optimizer"]
    setup_cache = staticmethod(measure_limit)
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, limit, variant, tree, dtype, optimizer):
        if getattr(self, "built_for", None) == (variant, tree, dtype, optimizer):
            return
        apply_settings()
        check_in_subset(optimizer, tree)
        self.params_, grads = tree_and_gradients(tree, dtype)
        self.optimizer, self.grads = make_optimizer(variant, grads, optimizer)
        self.params_ = run_step(self.optimizer, self.params_, self.grads)
        self.built_for = (variant, tree, dtype, optimizer)

    def step(self) -> None:
        """One step. Rebound before eval, as in a training loop, so the old parameters can be donated (see
        timing.time_steps)."""
        self.params_ = self.optimizer.apply_gradients(self.grads, self.params_)
        mx.eval(self.params_, self.optimizer.state)

    def time_step(self, limit, variant, tree, dtype, optimizer):
        self.step()

    def track_gbps(self, limit, variant, tree, dtype, optimizer):
        steps = timing.time_steps(self.optimizer, self.params_, self.grads, repeats=5, warmup=0)
        return bytes_moved(self.params_, optimizer) / steps.median / 1e9

    track_gbps.unit = "GB/s"

    def track_fraction_of_limit(self, limits, variant, tree, dtype, optimizer):
        """Of the roof of the device the variant runs on, at the step's working set; NaN where that device has none.
        On the CPU the roof's kernels are timed in the same rounds as the step, where this commit can
        (:func:`~benchmarks.common.fraction_in_same_rounds`); elsewhere the run's roof is the limit."""
        device, nbytes = variant_device(variant), bytes_moved(self.params_, optimizer)
        together = fraction_in_same_rounds(limits, device, self.step, nbytes, optimizer)
        if together is not None:
            return together
        limit = limit_at(limits, device, nbytes, optimizer)
        return self.track_gbps(limits, variant, tree, dtype, optimizer) / limit if limit else float("nan")

    track_fraction_of_limit.unit = "fraction"

    def track_peak_memory(self, limit, variant, tree, dtype, optimizer):
        mx.reset_peak_memory()
        run_step(self.optimizer, self.params_, self.grads)
        return mx.get_peak_memory()

    track_peak_memory.unit = "bytes"


class FirstStep:
    """The first step of a fresh optimizer: state init, tracing, ``mx.compile`` and kernel builds.

    asv re-runs ``setup`` before each sample, so every sample is a first step.
    Kernels that ``mx.compile`` built with g++ stay cached under ``$TMPDIR/mlx``
    across samples and runs; ``rmsprop-bench run`` records which ``TMPDIR``.
    """

    params = (variants(), trees(), dtypes(), optimizers())
    param_names = ["variant", "tree", "dtype", "optimizer"]
    number = 1
    rounds = 1
    repeat = (1, 5, 10.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, variant, tree, dtype, optimizer):
        apply_settings()
        check_in_subset(optimizer, tree)
        self.params_, grads = tree_and_gradients(tree, dtype)
        self.optimizer, self.grads = make_optimizer(variant, grads, optimizer)

    def time_first_step(self, variant, tree, dtype, optimizer):
        run_step(self.optimizer, self.params_, self.grads)
