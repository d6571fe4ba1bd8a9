"""``auto``: measure the variants on the first real steps, then keep running the fastest.

Every variant keeps the stock state layout, so handing ``w`` and ``v`` from
one variant to the next is exact: the measuring steps are real training steps
and the trajectory is the one any single variant would follow. The steps go
round-robin over the candidates: one round of first steps (compiles, kernel
builds), one untimed warm-up round, then ``trial_rounds`` timed rounds. The
winner is picked as :func:`rmsprop_impls.choose.rank` picks it (the simplest
of those within noise of the fastest) and remembered in the user cache
(:mod:`rmsprop_impls.choice_cache`), so a later run of the same rule and
hyper-parameters on the same tree, MLX, device and machine starts with it and
measures nothing. Once chosen, the
winner runs every later step, whatever tree comes (each variant takes any
tree); a new tree signature is measured only by a new optimizer. It runs the whole
step (``apply_gradients``, ``update``) on this optimizer's state and hyper-parameters,
so that a variant's own fast path runs: ``cpu_kernel``'s step in one call into C++
took 8.86 ms on 256x64K where its leaves handed over from this optimizer's walk took 61.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn

from ..optimizer import OptimizerBase
from ..registry import create
from .choice_cache import choice_key, load_choice, save_choice
from .choose import rank, runnable_candidates
from .timing import StepTiming
from .trees import step_bytes


class AutoOptimizer(OptimizerBase):
    """Args (beyond the rule's): ``candidates`` (default: every variant that runs here),
    ``trial_rounds`` timed steps per candidate, and ``use_cache`` to read and write the
    remembered choice.

    After the switch, ``chosen`` names the variant that runs the steps and ``choice``
    holds its ranking (``from_cache`` says whether it was measured in this run).
    """

    name = "auto"
    summary = "measures the variants on the first real steps, then runs the fastest"

    def __init__(
        self,
        learning_rate,
        *hyper,
        candidates: list[str] | None = None,
        trial_rounds: int = 5,
        use_cache: bool = True,
        **named,
    ):
        super().__init__(learning_rate, *hyper, **named)
        if isinstance(trial_rounds, bool) or not isinstance(trial_rounds, int) or trial_rounds < 1:
            raise ValueError(f"trial_rounds must be a positive int, not {trial_rounds!r}")
        runnable, self.unavailable = runnable_candidates(candidates)
        hyperparameters = self.hyper
        self._variants = {
            name: create(name, learning_rate, optimizer=self.rule, **hyperparameters) for name in runnable
        }
        self.trial_rounds = trial_rounds
        self.use_cache = use_cache
        self.chosen: str | None = None
        self.choice: dict | None = None
        self.measured_steps = 0
        self._key: dict | None = None
        self._timings: dict[str, StepTiming] = {}

    @property
    def candidates(self) -> list[str]:
        return list(self._variants)

    def apply_gradients(self, gradients, parameters):
        """Once chosen, the chosen variant's whole step (its own walk and fast path); until then this
        optimizer's walk, with the candidates' updates in turn."""
        if self.chosen is None or not self._initialized:
            return super().apply_gradients(gradients, parameters)
        return self._winner_now().apply_gradients(gradients, parameters)

    def update(self, model: nn.Module, gradients: dict) -> None:
        """As :meth:`apply_gradients`, through the chosen variant's ``update`` (``cpu_kernel`` writes a
        model's small leaves over there)."""
        if self.chosen is None or not self._initialized:
            return super().update(model, gradients)
        return self._winner_now().update(model, gradients)

    def _winner_now(self) -> OptimizerBase:
        """The chosen variant on this optimizer's state (the same dict, so a program that reads or replaces
        ``opt.state`` sees every step) and with its hyper-parameters as they are now."""
        variant = self._variants[self.chosen]
        if variant._state is not self._state:
            variant._state = self._state
        variant._initialized = True
        for key in self.rule.defaults:
            setattr(variant, key, getattr(self, key))
        return variant

    def step_leaves(self, w, g, states, scalars):
        """The chosen variant's whole step once chosen (its own leaf rules included); until then the
        candidates' steps in turn, each timed."""
        if self.chosen is None and self._key is None:
            self._key = choice_key(w, self.candidates, self.rule.name, self.hyper)
            self._adopt_remembered()
        if self.chosen is not None:
            return self._variants[self.chosen].step_leaves(w, g, states, scalars)
        return self._measured_step(w, g, states, scalars)

    def _adopt_remembered(self) -> None:
        record = load_choice(self._key) if self.use_cache else None
        if record is not None and record["variant"] in self._variants:
            self.chosen = record["variant"]
            self.choice = {**record, "from_cache": True}

    def _measured_step(self, w, g, states, scalars):
        names = self.candidates
        name = names[self.measured_steps % len(names)]
        mx.eval(w, g, states, scalars.lr, scalars.values)  # the backward pass that made g is not the optimizer's time
        start = time.perf_counter()
        variant = self._variants[name]
        # Leaves this candidate does not take get stock's ops, as they would under it alone.
        new_w, new_s = variant.step_leaves(w, g, states, scalars)
        mx.eval(new_w, new_s)
        seconds = time.perf_counter() - start
        if self.measured_steps < len(names):
            self._timings[name] = StepTiming(first_s=seconds)
        elif self.measured_steps >= 2 * len(names):  # after the first-step and the warm-up rounds
            self._timings[name].samples.append(seconds)
        self.measured_steps += 1
        if self.measured_steps == (2 + self.trial_rounds) * len(names):
            self._decide(step_bytes(w, self.rule, self.hyper))
        return new_w, new_s

    def _decide(self, nbytes: int) -> None:
        rows, winner, why = rank(self._timings, nbytes)
        details = {"why": why, "rows": [asdict(r) for r in rows], "measured_steps": self.measured_steps}
        self.chosen = winner
        self.choice = {"variant": winner, **details, "from_cache": False}
        if self.use_cache:
            save_choice(self._key, winner, details)


VARIANT = AutoOptimizer
