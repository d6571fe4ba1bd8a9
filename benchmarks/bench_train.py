"""Whole training steps (forward, backward, update) per model, step kind, optimizer rule and variant.

The step is the package's (``rmsprop_impls.measure.training``): compiled as mlx-lm's trainer compiles
it, or not, on models built with random weights. The ``rule`` and ``variant`` axes go through one
factory (``training.make_optimizer``): stock MLX for every rule, the project's variants for the rules it
has them for; any other pair, a variant that cannot run here, a model that needs mlx-lm where it is
missing, or a commit from before that module raises ``NotImplementedError`` in ``setup``, so asv shows
it as skipped.

The default subset (what ``rmsprop-bench run`` runs) is ``llama-tiny``, mlx-lm's Llama at 156K
parameters, both step kinds, RMSprop and AdamW, stock and ``cpu_kernel``; ``RMSPROP_BENCH_GRID=full``
adds the bigger models, every rule of ``mlx.optimizers`` and every variant, and
``RMSPROP_BENCH_TRAIN_MODELS``, ``RMSPROP_BENCH_TRAIN_RULES`` and ``RMSPROP_BENCH_TRAIN_VARIANTS``
(comma lists) replace one axis each. Every benchmark process imports
mlx-lm (and with it transformers, about 2 s), so the default subset is kept to a few processes.
"""

import functools

from .common import DEFAULT_OPTIMIZERS, FULL_OPTIMIZERS, apply_settings, grid_axis, safe_import

with safe_import():
    from rmsprop_impls.measure import training
    from rmsprop_impls.measure.training_models import training_model

#: Written out, so that the grid stays the same for every commit asv runs.
FULL_MODELS = ["llama-tiny", "mlp-2048", "llama-10m", "llama-30m", "llama-30m-lora", "llama-100m"]
DEFAULT_MODELS = ["llama-tiny"]
STEP_KINDS = ["compiled", "uncompiled"]
VARIANTS = ["stock", "eager", "compiled", "flat", "cpu_stream", "cpu_kernel", "metal_kernel", "cuda_kernel"]
DEFAULT_VARIANTS = ["stock", "cpu_kernel"]


def models() -> list[str]:
    return grid_axis("RMSPROP_BENCH_TRAIN_MODELS", DEFAULT_MODELS, FULL_MODELS)


def rules() -> list[str]:
    return grid_axis("RMSPROP_BENCH_TRAIN_RULES", DEFAULT_OPTIMIZERS, FULL_OPTIMIZERS)


def variants() -> list[str]:
    return grid_axis("RMSPROP_BENCH_TRAIN_VARIANTS", DEFAULT_VARIANTS, VARIANTS)


@functools.lru_cache(maxsize=1)
def built_model(name: str):
    """The model with its random weights, built once per benchmark process."""
    if "training" not in globals():
        raise NotImplementedError("this commit has no rmsprop_impls.measure.training")
    try:
        return training_model(name)
    except (ValueError, RuntimeError) as e:  # an unknown name; mlx-lm missing, too old or not for this MLX
        raise NotImplementedError(str(e)) from None


def check_pair(rule: str, variant: str) -> None:
    try:
        reason = training.skip_reason(rule, variant)
    except ValueError as e:  # a commit whose factory does not know the rule
        raise NotImplementedError(str(e)) from None
    if reason is not None:
        raise NotImplementedError(reason)


def built_loop(name: str, step_kind: str, rule: str | None, variant: str | None):
    """A loop that has taken its first step (``rule`` ``None``: forward and backward only)."""
    apply_settings()
    model = built_model(name)
    optimizer = None
    if rule is not None:
        check_pair(rule, variant)
        optimizer = training.make_optimizer(rule, variant)
    loop = training.training_loop(model, optimizer, step_kind == "compiled")
    loop.step()
    return loop


class TrainStep:
    """The steady state of a training loop: each step feeds its output back in, on the same batch."""

    params = (models(), STEP_KINDS, rules(), variants())
    param_names = ["model", "step", "rule", "variant"]
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, model, step, rule, variant):
        if getattr(self, "built_for", None) != (model, step, rule, variant):
            self.loop = built_loop(model, step, rule, variant)
            self.built_for = (model, step, rule, variant)

    def time_step(self, model, step, rule, variant):
        self.loop.step()

    def track_peak_memory(self, model, step, rule, variant):
        return training.step_peak_bytes(self.loop)

    track_peak_memory.unit = "bytes"


class UpdateAlone:
    """The same optimizer's step alone, uncompiled, on the model's trainable parameters and real gradients:
    what the optimizer-step suite would time on this tree."""

    params = (models(), rules(), variants())
    param_names = ["model", "rule", "variant"]
    timeout = 600

    def setup(self, model, rule, variant):
        apply_settings()
        check_pair(rule, variant)
        self.model = built_model(model)

    def track_seconds(self, model, rule, variant):
        return training.time_update_alone(self.model, rule, variant).median

    track_seconds.unit = "seconds"


class GradientStep:
    """Forward and backward alone, in the same modes: what a training step costs without its update."""

    params = (models(), STEP_KINDS)
    param_names = ["model", "step"]
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, model, step):
        if getattr(self, "built_for", None) != (model, step):
            self.loop = built_loop(model, step, None, None)
            self.built_for = (model, step)

    def time_step(self, model, step):
        self.loop.step()
