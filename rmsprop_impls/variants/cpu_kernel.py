"""A C++ MLX extension: one fused, multi-tensor, threaded step over many leaves, for every rule.

The per-element update is generated from the rule's trace (``_cpu_ext/generate.py``: one kernel per
distinct trace of every rule); this module only finds the kernel for the rule at its hyper-parameters
now, and passes it the slot values, the learning rate and the rule's per-step inputs (Adam's bias
corrections, computed by stock's MLX ops). A rule setting with no generated kernel gets stock's ops.

After the first step, a step is one call into C++: it walks the gradient,
parameter and state trees there, updates every leaf, stores the new states and
advances the step counter (computed at once, so ``mx.eval`` of the new state
has nothing left to run), and returns the new parameter tree.

Leaves of 256K elements or more go through ``OptimizerStep`` graph nodes, up to
eight leaves per node (MLX's multi-output nodes cost the square of their output
count in references). Their outputs reuse the buffers of inputs nobody else
holds (MLX's donation), so a training loop that drops its old parameters
updates them in place; big buffers are first moved to start on a 2 MiB page,
and buffers that live on are moved onto 2 MiB pages.
Smaller leaves cost MLX more as graph nodes than as work, so they are updated
at once, outside the graph: under ``update(model, gradients)``, the new w over the old
one where nothing but the model holds it (``Module.update`` then puts it back where it was);
else into that leaf's w of the step before last
where the caller has dropped it, else into an allocation of its own (a leaf a caller
keeps pins its own bytes only), written with streaming stores on steps of 8 MiB or
more either way, and each new state over the old one where nothing but the optimizer state can see it
(under ``mx.compile`` they stay in the graph). Either way the work is split over a
persistent thread pool (MLX's CPU back-end has none of its own) and w, g and the states
are streamed once (only the states the rule reads and writes), with AVX2 or NEON and software
prefetch where the CPU has them, rounding exactly as stock does (``precision="stock"``) or once from
float32 (``precision="float32"``); docs/kernels/cpu.md has the contract."""

from __future__ import annotations

import operator

import mlx.core as mx
import mlx.nn as nn

from ..cpu_threads import default_threads
from ..optimizer import OptimizerBase
from ..registry import VariantUnavailableError

_UNREAD = mx.array(0.0)


class CpuKernelOptimizer(OptimizerBase):
    """Args (beyond the rule's): ``threads``, how many threads share a step (default: ``default_threads()``);
    ``precision``, ``"stock"`` (default: bit-identical to the rule's stock class in every dtype)
    or ``"float32"`` (float16 and bfloat16 computed in float32 and rounded once)."""

    name = "cpu_kernel"
    summary = "C++ extension: generated per rule, fused, threaded; 8 big leaves per node, small leaves at once"
    device = "cpu"

    def __init__(self, learning_rate, *hyper, threads: int | None = None, precision: str = "stock", **named):
        super().__init__(learning_rate, *hyper, **named)
        if precision not in ("stock", "float32"):
            raise ValueError(f'precision must be "stock" or "float32", not {precision!r}')
        if threads is None:
            threads = default_threads()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, not {threads!r}")
        reason = self.unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(self.name, reason)
        self.threads = threads
        self.precision = precision
        self._bind()

    def _bind(self) -> None:
        from ..kernels import _cpu_ext

        self._ext = _cpu_ext
        # (the settings it was looked up for, the kernel or None, its TreeStep or None, the step inputs for
        # settings that compute none, else None): _looked_up().
        self._kernel_at: tuple = (None, None, None, None)
        self._settings = operator.attrgetter(*self.rule.defaults, "threads", "precision")
        # The small leaves' new w of the last two steps: a step writes into those of the step before
        # last, once the caller has dropped them, instead of making new arrays (TreeStep).
        self._spare_w: tuple[list, list] = ([], [])

    def __getstate__(self) -> dict:
        """What a copy (``copy.deepcopy``) takes: all but the extension, which does not copy, and the
        spares, which only save allocations."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_ext", "_spare_w", "_kernel_at", "_settings")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind()

    @classmethod
    def unavailable_reason(cls):
        """Why the C++ extension does not load (it is built on first use, so this may build it)."""
        where = "the C++ extension rmsprop_impls.kernels._cpu_ext does not load"
        try:
            from ..kernels import _cpu_ext
        except ImportError as e:
            how = "it builds on first use with CMake and a C++ compiler, unless RMSPROP_BENCH_NO_EXTENSION=1"
            return f"{where} ({e}); {how}"
        try:
            _cpu_ext.load()
        except ImportError as e:
            return f"{where} ({e})"
        return None

    def _kernel(self):
        """The generated kernel for the rule at its hyper-parameters now (a program may change them), or None;
        looked up again only when one changed (a list, such as ``betas``, compares by value)."""
        return self._looked_up()[1]

    def _tree_step(self):
        """The whole step in C++ for the settings now (``_ext.TreeStep``), or None where no kernel runs them."""
        return self._looked_up()[2]

    def _looked_up(self) -> tuple:
        now = self._settings(self)
        if now != self._kernel_at[0]:
            kernel = self._ext.kernel_for(self.rule, self.hyper)
            tree_step = None
            if kernel is not None:
                tree_step = self._ext.TreeStep(kernel.index, kernel.slots, self.rule.states, *now[-2:])
            unread = None if self.rule.uses_step(self.hyper) else [_UNREAD] * len(self.rule.step_inputs)
            self._kernel_at = (tuple(list(x) if isinstance(x, list) else x for x in now), kernel, tree_step, unread)
        return self._kernel_at

    def update(self, model: nn.Module, gradients: dict) -> None:
        """Stock's ``model.update(self.apply_gradients(gradients, model))``, where the step knows that
        ``Module.update`` puts every new w where the old one was: a small leaf's w that nothing but the
        model holds is written over, which saves a pass over other memory (docs/kernels/cpu.md). A model
        whose class has its own ``update`` gets stock's call."""
        if not isinstance(model, nn.Module) or type(model).update is not nn.Module.update:
            return super().update(model, gradients)
        model.update(self._apply_gradients(gradients, model, rebinds=True))

    def apply_gradients(self, gradients, parameters):
        """The whole step in one call into C++, the tree walk included, once the state exists: on
        16384 small leaves the Python walk and the lists cost more than the update. Trees the C++
        walk does not take (and the first step) go through the Python walk, which names any error.
        Either way the state changes only once the whole step has been computed."""
        return self._apply_gradients(gradients, parameters, rebinds=False)

    def _apply_gradients(self, gradients, parameters, rebinds: bool):
        """``apply_gradients``; with ``rebinds``, ``parameters`` is the model, which ``Module.update``
        gives the new w's in the old ones' places."""
        _, _, tree_step, unread = self._looked_up() if self._initialized else (None,) * 4
        if tree_step is not None:
            if self._schedulers or unread is None:
                scheduled, scalars = self._scheduled()
                lr, values = scalars.lr, self._step_values(scalars)
            else:  # most steps: nothing to compute first (_scheduled() took 0.6 us of a 4 us one-leaf step)
                scheduled, lr, values = None, self.state["learning_rate"], unread
            older, newer = self._spare_w
            stepped = tree_step(gradients, parameters, self.state, lr, values, older, rebinds)
            if stepped is not None:
                new_parameters, spares = stepped
                if scheduled:
                    self.state.update(scheduled)
                self._spare_w = (newer, spares)
                return new_parameters
        return super().apply_gradients(gradients, parameters)

    def _step_values(self, scalars) -> list:
        """The rule's per-step inputs in its order; one this setting does not compute (Adam without bias
        correction) is a zero the kernel never reads."""
        return [scalars.values.get(name, _UNREAD) for name in self.rule.step_inputs]

    def step_leaves(self, w, g, states, scalars):
        if self._kernel() is None:  # no generated kernel for this setting: stock's ops on every leaf
            return self.stock_leaf_by_leaf(w, g, states, scalars)
        return super().step_leaves(w, g, states, scalars)

    def update_leaves(self, w, g, s, scalars):
        kernel = self._kernel()
        values = self._step_values(scalars)
        states = [s[name] for name in self.rule.states]
        new_w, new_states = self._ext.optimizer_update(
            kernel.index, kernel.slots, w, g, states, scalars.lr, values, self.threads, self.precision
        )
        written = self.rule.trace(self.hyper).state_out
        return new_w, {name: x for name, x in zip(self.rule.states, new_states) if name in written}


VARIANT = CpuKernelOptimizer
