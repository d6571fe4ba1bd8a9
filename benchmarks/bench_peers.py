"""The same RMSprop step in other libraries, on the same trees: the yardsticks for the MLX variants.

The steps are the package's (``rmsprop_impls.measure.peers``), so ``rmsprop-bench compare --peers``
times the same code. A peer whose package is missing (``pip install '.[peers]'``), a bfloat16 tree,
or a commit from before that module raises ``NotImplementedError`` in ``setup``, so asv shows it as
skipped. Every peer runs the stock formula with lr=1e-3, alpha=0.99, eps=1e-8 added outside the sqrt.
"""

from .common import dtypes, safe_import, tree_and_gradients, trees

with safe_import():
    from rmsprop_impls.measure.peers import build_peer, numpy_leaves

#: The asv grid's peer axis, written out so that it stays the same for every commit asv runs.
PEERS = ["numpy", "torch-foreach", "torch-per-tensor", "optax"]


class PeerStep:
    params = (PEERS, trees(), dtypes())
    param_names = ["peer", "tree", "dtype"]
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, peer, tree, dtype):
        if getattr(self, "built_for", None) == (peer, tree, dtype):
            return
        if "build_peer" not in globals():
            raise NotImplementedError("this commit has no rmsprop_impls.measure.peers")
        if dtype == "bfloat16":  # before building the tree: numpy cannot hold it
            raise NotImplementedError("the peers get their trees through numpy, which has no bfloat16")
        params, grads = tree_and_gradients(tree, dtype)
        self.step = build_peer(peer, numpy_leaves(params), numpy_leaves(grads)).step
        self.step()
        self.built_for = (peer, tree, dtype)

    def time_step(self, peer, tree, dtype):
        self.step()
