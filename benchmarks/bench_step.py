"""One RMSprop step per variant, tree and dtype."""

import os

import mlx.core as mx

import rmsprop_impls
from rmsprop_impls.trees import random_like, tree_by_name


def _grid(name, default):
    value = os.environ.get(name)
    return value.split(",") if value else default


class Step:
    params = (
        _grid("RMSPROP_BENCH_VARIANTS", rmsprop_impls.variant_names()),
        _grid("RMSPROP_BENCH_TREES", ["4x1K", "16x64K"]),
        _grid("RMSPROP_BENCH_DTYPES", ["float32"]),
    )
    param_names = ["variant", "tree", "dtype"]

    def setup(self, variant, tree, dtype):
        reason = rmsprop_impls.availability().get(variant, "not in this commit")
        if reason is not None:
            raise NotImplementedError(reason)
        self.params_ = tree_by_name(tree, dtype)
        self.grads = random_like(self.params_)
        self.opt = rmsprop_impls.create(variant, 1e-3)
        self.time_step()

    def time_step(self, *_):
        self.params_ = self.opt.apply_gradients(self.grads, self.params_)
        mx.eval(self.params_, self.opt.state)
