"""The same step of each optimizer rule in other libraries, on the same trees: the yardsticks for the MLX variants.

The steps are the package's (``rmsprop_impls.measure.peers``), so ``rmsprop-bench compare --peers``
times the same code. A peer whose package is missing (``pip install '.[peers]'``), a rule the peer's library
does not have (Lion in torch), a bfloat16 tree, or a commit from before that module (or, for a rule other than
RMSprop, from before the peers took one) raises ``NotImplementedError`` in ``setup``, so asv shows it as
skipped. Every peer runs stock's default hyper-parameters with lr=1e-3.
"""

import inspect

from .common import dtypes, grid_axis, safe_import, tree_and_gradients, trees

with safe_import():
    from rmsprop_impls.measure.peers import PEERS as COMMIT_PEERS
    from rmsprop_impls.measure.peers import build_peer, numpy_leaves

#: The asv grid's peer and rule axes, written out so that they stay the same for every commit asv runs.
PEERS = ["numpy", "torch-foreach", "torch-fused", "torch-per-tensor", "optax"]
OPTIMIZERS = ["rmsprop", "sgd", "adagrad", "adadelta", "adam", "adamw", "adamax", "lion"]
#: The rules timed by default (``RMSPROP_BENCH_PEER_OPTIMIZERS=adam,lion`` or ``RMSPROP_BENCH_GRID=full``: others).
DEFAULT_OPTIMIZERS = ["rmsprop", "adamw"]


def optimizers() -> list[str]:
    return grid_axis("RMSPROP_BENCH_PEER_OPTIMIZERS", DEFAULT_OPTIMIZERS, OPTIMIZERS)


class PeerStep:
    params = (PEERS, optimizers(), trees(), dtypes())
    param_names = ["peer", "optimizer", "tree", "dtype"]
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, peer, optimizer, tree, dtype):
        if getattr(self, "built_for", None) == (peer, optimizer, tree, dtype):
            return
        if "build_peer" not in globals():
            raise NotImplementedError("this commit has no rmsprop_impls.measure.peers")
        if peer not in COMMIT_PEERS:
            raise NotImplementedError(f"this commit has no {peer} peer")
        if "optimizer" not in inspect.signature(build_peer).parameters:
            if optimizer != "rmsprop":
                raise NotImplementedError("this commit's peers run RMSprop only")
            rule = {}
        else:
            rule = {"optimizer": optimizer}
        if dtype == "bfloat16":  # before building the tree: numpy cannot hold it
            raise NotImplementedError("the peers get their trees through numpy, which has no bfloat16")
        params, grads = tree_and_gradients(tree, dtype)
        self.step = build_peer(peer, numpy_leaves(params), numpy_leaves(grads), **rule).step
        self.step()
        self.built_for = (peer, optimizer, tree, dtype)

    def time_step(self, peer, optimizer, tree, dtype):
        self.step()
