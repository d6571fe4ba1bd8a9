"""The whole-tree step under one ``mx.compile``.

State goes in and out as arrays, and the learning rate is an array input, so a
schedule never retraces. A new tree signature (leaf count, shapes, dtypes)
does: ``mx.compile`` keys its cache on the inputs' shapes and dtypes, and so
do new hyper-parameter values, which the trace holds as constants. On the CPU
the compiled kernels are built with ``g++`` and cached under ``$TMPDIR/mlx``.
"""

from __future__ import annotations

import shutil

import mlx.core as mx

from ..optimizer import OptimizerBase
from .eager import update_each_leaf


class CompiledOptimizer(OptimizerBase):
    name = "compiled"
    summary = "whole-tree step under mx.compile"
    device = "default"

    def __init__(self, learning_rate, *hyper, **named):
        super().__init__(learning_rate, *hyper, **named)
        self._steps: dict[tuple, object] = {}
        #: How often mx.compile traced the step: once per tree signature, more is a retrace.
        self.traces = 0

    @classmethod
    def unavailable_reason(cls):
        if mx.default_device() == mx.cpu and shutil.which("g++") is None:
            return (
                "needs g++ on PATH: MLX builds its CPU kernels with it (without, mx.compile silently runs uncompiled)"
            )
        return None

    def _compiled_for(self, hyper: dict) -> object:
        key = repr(sorted(hyper.items()))
        if key not in self._steps:

            def whole_tree_step(w, g, s, lr, values):
                self.traces += 1  # Python runs here only while mx.compile traces
                return update_each_leaf(self.rule, hyper, w, g, s, lr, values)

            self._steps[key] = mx.compile(whole_tree_step)
        return self._steps[key]

    def update_leaves(self, w, g, s, scalars):
        return self._compiled_for(self.hyper)(w, g, s, scalars.lr, scalars.values)


VARIANT = CompiledOptimizer
