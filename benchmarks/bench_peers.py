"""The same RMSprop step in other libraries, on the same trees: the yardsticks for the MLX variants.

Optional (``pip install '.[peers]'``): a peer whose package is missing raises
``NotImplementedError`` in ``setup``, so asv shows it as skipped. Every peer
runs the stock formula with lr=1e-3, alpha=0.99, eps=1e-8 added outside the sqrt.
"""

from .common import dtypes, safe_import, tree_and_gradients, trees

with safe_import():
    import numpy as np
with safe_import():
    import torch
with safe_import():
    import jax
    import optax

LR, ALPHA, EPS = 1e-3, 0.99, 1e-8
PEERS = ["numpy", "torch-foreach", "torch-per-tensor", "optax"]


def numpy_leaves(tree: str, dtype: str) -> tuple[list, list]:
    from rmsprop_impls.measure.trees import leaves_of

    params, grads = tree_and_gradients(tree, dtype)
    return [np.array(x) for x in leaves_of(params)], [np.array(x) for x in leaves_of(grads)]


def numpy_step(w: list, g: list, v: list, scratch: list) -> None:
    """In place, one temporary per leaf: ``v = alpha*v + (1-alpha)*g^2``, ``w -= lr*g/(sqrt(v)+eps)``."""
    for wi, gi, vi, ti in zip(w, g, v, scratch):
        np.multiply(gi, gi, out=ti)
        ti *= 1 - ALPHA
        vi *= ALPHA
        vi += ti
        np.sqrt(vi, out=ti)
        ti += EPS
        np.divide(gi, ti, out=ti)
        ti *= LR
        wi -= ti


def torch_step(w: list, g: list, foreach: bool):
    params = [torch.from_numpy(x.copy()) for x in w]
    for p, gi in zip(params, g):
        p.grad = torch.from_numpy(gi)
    optimizer = torch.optim.RMSprop(params, lr=LR, alpha=ALPHA, eps=EPS, foreach=foreach)
    return torch.no_grad()(optimizer.step)


def optax_step(w: list, g: list):
    optimizer = optax.rmsprop(LR, decay=ALPHA, eps=EPS, eps_in_sqrt=False)
    params, grads = [jax.numpy.asarray(x) for x in w], [jax.numpy.asarray(x) for x in g]
    state = optimizer.init(params)

    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))  # params and state are updated in place
    carry = [params, state]

    def step():
        carry[:] = update(*carry, grads)
        jax.block_until_ready(carry)

    return step


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
        module = {"numpy": "np", "optax": "optax"}.get(peer, "torch")
        if module not in globals():
            raise NotImplementedError(f"{peer} needs the [peers] extra (pip install 'rmsprop-bench[peers]')")
        if dtype == "bfloat16":
            raise NotImplementedError("the peers get their trees through numpy, which has no bfloat16")
        w, g = numpy_leaves(tree, dtype)
        if peer == "numpy":
            v, scratch = [np.zeros_like(x) for x in w], [np.empty_like(x) for x in w]
            self.step = lambda: numpy_step(w, g, v, scratch)
        elif peer == "optax":
            self.step = optax_step(w, g)
        else:
            self.step = torch_step(w, g, foreach=peer == "torch-foreach")
        self.step()
        self.built_for = (peer, tree, dtype)

    def time_step(self, peer, tree, dtype):
        self.step()
