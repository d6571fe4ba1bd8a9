"""The whole-tree step under one ``mx.compile``.

State goes in and out as arrays, and the learning rate is an array input, so a
schedule never retraces. A new tree signature (leaf count, shapes, dtypes)
does: ``mx.compile`` keys its cache on the inputs' shapes and dtypes. On the
CPU the compiled kernels are built with ``g++`` and cached under
``$TMPDIR/mlx``.
"""

from __future__ import annotations

import shutil

import mlx.core as mx

from ..formula import rmsprop_update
from ..optimizer import RMSpropBase


class CompiledRMSprop(RMSpropBase):
    name = "compiled"
    summary = "whole-tree step under mx.compile"
    device = "default"

    def __init__(self, learning_rate, alpha=0.99, eps=1e-8):
        super().__init__(learning_rate, alpha, eps)
        self._step = mx.compile(self._whole_tree_step)
        #: How often mx.compile traced the step: once per tree signature, more is a retrace.
        self.traces = 0

    @classmethod
    def unavailable_reason(cls):
        if mx.default_device() == mx.cpu and shutil.which("g++") is None:
            return (
                "needs g++ on PATH: MLX builds its CPU kernels with it (without, mx.compile silently runs uncompiled)"
            )
        return None

    def _whole_tree_step(self, w, g, v, lr):
        self.traces += 1  # Python runs here only while mx.compile traces
        pairs = [rmsprop_update(wi, gi, vi, lr, self.alpha, self.eps) for wi, gi, vi in zip(w, g, v)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def update_leaves(self, w, g, v, lr):
        return self._step(w, g, v, lr)


VARIANT = CompiledRMSprop
