"""The same RMSprop step in other libraries, on the CPU: the yardsticks the MLX variants are compared with.

A *peer* runs the stock formula (``v = alpha*v + (1-alpha)*g^2``, ``w -= lr*g/(sqrt(v)+eps)``, eps outside
the sqrt) on the same parameters and gradients, converted with numpy, updating its parameters in place as
a training loop would:

- ``numpy``: numpy in place, one temporary per leaf, no allocation per step;
- ``optax``: ``optax.rmsprop(eps_in_sqrt=False)`` under ``jax.jit`` with the parameters and state donated;
- ``torch-foreach`` and ``torch-per-tensor``: ``torch.optim.RMSprop`` with ``foreach`` on and off.

numpy is a dependency of the package; jax, optax and torch come with the ``[peers]`` extra. Nothing here
imports them until a peer needs them. ``benchmarks/bench_peers.py`` (asv) and ``rmsprop-bench compare
--peers`` both build their steps here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .compare import VariantResult
from .timing import time_calls
from .trees import leaves_of, step_bytes

#: Every peer, in the order tables list them (and asv's parameter order).
PEERS = ("numpy", "torch-foreach", "torch-per-tensor", "optax")
#: What each peer is, in a sentence's words: ``cpu_kernel 2.31x numpy in place``.
PEER_LABELS = {
    "numpy": "numpy in place",
    "torch-foreach": "torch foreach",
    "torch-per-tensor": "torch per-tensor",
    "optax": "optax jit",
}
#: The packages each peer imports.
PEER_PACKAGES = {
    "numpy": ("numpy",),
    "torch-foreach": ("torch",),
    "torch-per-tensor": ("torch",),
    "optax": ("jax", "optax"),
}
#: Why a peer whose package is missing cannot run.
NEEDS_EXTRA = "needs the [peers] extra (pip install 'rmsprop-bench[peers]')"
#: Why no peer runs on bfloat16: their trees come through numpy.
NO_BFLOAT16 = "the peers get their trees through numpy, which has no bfloat16"
#: Every peer runs on the CPU: its GB/s is a fraction of the CPU's limit.
PEER_DEVICE = "cpu"
#: ``jax.jit`` traces and compiles the update leaf by leaf: on the project's 2-core machine its first step took
#: 1.4 s for 256 leaves, 5 s for 1024 and 11 s for 2048, so optax skips trees with more leaves than this
#: (16384x256 would compile for minutes before its first step).
OPTAX_MAX_LEAVES = 4096


@dataclass
class PeerStep:
    """One peer set up on one tree: ``step()`` runs one update in place and returns once it is done;
    ``parameters()`` copies out the current parameters, as numpy arrays in the tree's leaf order."""

    step: Callable[[], None]
    parameters: Callable[[], list[np.ndarray]]


@functools.cache
def _import_error(package: str) -> str | None:
    try:
        importlib.import_module(package)
    except ImportError as e:
        return str(e)
    return None


def peer_installed(peer: str) -> bool:
    """Whether ``peer``'s packages import here (importing them: torch and jax take a second or two)."""
    return not any(_import_error(m) for m in PEER_PACKAGES[peer])


def installed_peers() -> list[str]:
    """The peers whose packages import here, in :data:`PEERS` order (numpy always)."""
    return [p for p in PEERS if peer_installed(p)]


def peer_unavailable_reason(peer: str, dtype: mx.Dtype | str = mx.float32, n_leaves: int = 0) -> str | None:
    """``None`` if ``peer`` runs here on a tree of ``n_leaves`` leaves of ``dtype``, else why not; an unknown
    name is a ``ValueError``."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; the peers are {', '.join(PEERS)}")
    if not peer_installed(peer):
        return f"{peer} {NEEDS_EXTRA}"
    if dtype in (mx.bfloat16, "bfloat16"):
        return NO_BFLOAT16
    if peer == "optax" and n_leaves > OPTAX_MAX_LEAVES:
        return f"jax.jit would compile {n_leaves:,} leaves for minutes (optax runs up to {OPTAX_MAX_LEAVES:,})"
    return None


def peer_availability(dtype: mx.Dtype | str = mx.float32) -> dict[str, str | None]:
    """Each peer -> ``None`` if it runs here on ``dtype``, else why it does not."""
    return {p: peer_unavailable_reason(p, dtype) for p in PEERS}


def numpy_leaves(tree: Any) -> list[np.ndarray]:
    """The leaves of an MLX tree as numpy arrays (copies), in :func:`~rmsprop_impls.measure.trees.leaves_of` order."""
    return [np.array(x) for x in leaves_of(tree)]


def numpy_step(
    w: list[np.ndarray],
    g: list[np.ndarray],
    v: list[np.ndarray],
    scratch: list[np.ndarray],
    lr: float = 1e-3,
    alpha: float = 0.99,
    eps: float = 1e-8,
) -> None:
    """In place, with one temporary per leaf (``scratch``, like ``w``): ``v = alpha*v + (1-alpha)*g^2``,
    ``w -= lr*g/(sqrt(v)+eps)``. No array is allocated, so it is numpy at its fastest."""
    for wi, gi, vi, ti in zip(w, g, v, scratch):
        np.multiply(gi, gi, out=ti)
        ti *= 1 - alpha
        vi *= alpha
        vi += ti
        np.sqrt(vi, out=ti)
        ti += eps
        np.divide(gi, ti, out=ti)
        ti *= lr
        wi -= ti


def _numpy_peer(w: list[np.ndarray], g: list[np.ndarray], lr: float, alpha: float, eps: float) -> PeerStep:
    w = [x.copy() for x in w]
    v, scratch = [np.zeros_like(x) for x in w], [np.empty_like(x) for x in w]
    return PeerStep(lambda: numpy_step(w, g, v, scratch, lr, alpha, eps), lambda: [x.copy() for x in w])


def _torch_peer(
    w: list[np.ndarray], g: list[np.ndarray], lr: float, alpha: float, eps: float, foreach: bool
) -> PeerStep:
    import torch

    params = [torch.from_numpy(x.copy()) for x in w]
    for p, gi in zip(params, g):
        p.grad = torch.from_numpy(gi)
    optimizer = torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, foreach=foreach)
    return PeerStep(torch.no_grad()(optimizer.step), lambda: [p.detach().numpy().copy() for p in params])


def _optax_peer(w: list[np.ndarray], g: list[np.ndarray], lr: float, alpha: float, eps: float) -> PeerStep:
    """Pinned to jax's CPU device, so that a jax with a GPU still compares CPU with CPU."""
    import jax
    import optax

    optimizer = optax.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False)
    cpu = jax.devices("cpu")[0]
    params, grads = jax.device_put(list(w), cpu), jax.device_put(list(g), cpu)

    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))  # params and state are updated in place
    carry = [params, optimizer.init(params)]

    def step() -> None:
        carry[:] = update(*carry, grads)
        jax.block_until_ready(carry)

    return PeerStep(step, lambda: [np.array(x) for x in carry[0]])


def build_peer(
    peer: str,
    w: Sequence[np.ndarray],
    g: Sequence[np.ndarray],
    lr: float = 1e-3,
    alpha: float = 0.99,
    eps: float = 1e-8,
) -> PeerStep:
    """``peer`` set up on parameters ``w`` and gradients ``g`` (numpy arrays, left untouched), state at zero.

    Raises ``ValueError`` for an unknown peer and ``NotImplementedError`` (with the reason) for one that
    cannot run here; nothing is timed or stepped yet.
    """
    reason = peer_unavailable_reason(peer, w[0].dtype.name if w else "float32", len(w))
    if reason is not None:
        raise NotImplementedError(reason)
    w, g = list(w), list(g)
    if peer == "numpy":
        return _numpy_peer(w, g, lr, alpha, eps)
    if peer == "optax":
        return _optax_peer(w, g, lr, alpha, eps)
    return _torch_peer(w, g, lr, alpha, eps, foreach=peer == "torch-foreach")


def compare_peers(
    params: Any,
    grads: Any,
    peers: Sequence[str] | None = None,
    repeats: int = 10,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> list[VariantResult]:
    """Median step time and effective GB/s of each peer on this MLX tree, as
    :func:`~rmsprop_impls.measure.compare.compare_variants` gives them for the variants (``variant`` is the
    peer's name, ``device`` ``"cpu"``); peers that cannot run come with their reason.

    ``peers=None`` takes every installed peer. The tree is converted once and each peer copies the
    parameters, so every peer starts from the same ones.
    """
    peers = list(installed_peers() if peers is None else peers)
    leaves = leaves_of(params)
    dtype = leaves[0].dtype if leaves else mx.float32
    reasons = {p: peer_unavailable_reason(p, dtype, len(leaves)) for p in peers}
    nbytes = step_bytes(params)
    w = g = None
    results = []
    for name in tqdm(peers, desc="timing peers", unit="peer", disable=not progress, leave=False):
        if reasons[name] is not None:
            results.append(VariantResult(name, None, reasons[name], device=PEER_DEVICE))
            continue
        if w is None:
            w, g = numpy_leaves(params), numpy_leaves(grads)
        peer = build_peer(name, w, g, lr=learning_rate)
        timing = time_calls(peer.step, repeats=repeats)
        del peer
        results.append(VariantResult(name, timing, gbps=nbytes / timing.median / 1e9, device=PEER_DEVICE))
    return results
