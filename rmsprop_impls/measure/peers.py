"""The same step of each rule in other libraries, on the CPU: the yardsticks the MLX variants are compared with.

A *peer* runs a rule (:mod:`rmsprop_impls.rules`) with stock MLX's hyper-parameters on the same parameters
and gradients, converted with numpy, updating its parameters in place as a training loop would:

- ``numpy``: the rule's own trace run with numpy ufuncs into scratch buffers (:mod:`.numpy_rule`): stock's
  math by construction, for every rule, no allocation per step;
- ``torch-foreach``, ``torch-fused`` and ``torch-per-tensor``: the ``torch.optim`` class of the rule with
  ``foreach=True``, ``fused=True`` (torch's vectorised CPU kernels, where the class has one) and neither;
- ``optax``: the rule's optax transformation under ``jax.jit`` with the parameters and state donated.

torch and optax are mapped to stock MLX's math (:func:`torch_rule`, :func:`optax_rule`); where a library
cannot compute it, the peer still runs its nearest rule and says how its math differs (``PeerStep.differs``;
the per-element work and the bytes moved are the same): torch and optax always correct Adam's and Adamax's
bias, where MLX's Adam and AdamW do not by default and its Adamax never does, and both take Adamax's eps
inside the max. Where nothing is near (Lion in torch, SGD's dampening in optax), the peer is unavailable, with
the reason. optax's Adagrad adds eps inside the sqrt: it gets ``eps**2`` there, which is stock's math within
float32 rounding wherever ``v`` is not below ``eps**2``.

numpy is a dependency of the package; jax, optax and torch come with the ``[peers]`` extra. Nothing here
imports them until a peer needs them. ``benchmarks/bench_peers.py`` (asv) and ``rmsprop-bench compare
--peers`` both build their steps here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..rules import DEFAULT_RULE, Rule, rule
from .compare import Candidate
from .numpy_rule import NumpyRuleStep
from .trees import leaves_of

#: Every peer, in the order tables list them (and asv's parameter order).
PEERS = ("numpy", "torch-foreach", "torch-fused", "torch-per-tensor", "optax")
#: What each peer is, in a sentence's words: ``cpu_kernel 2.31x numpy in place``.
PEER_LABELS = {
    "numpy": "numpy in place",
    "torch-foreach": "torch foreach",
    "torch-fused": "torch fused",
    "torch-per-tensor": "torch per-tensor",
    "optax": "optax jit",
}
#: The packages each peer imports.
PEER_PACKAGES = {
    "numpy": ("numpy",),
    "torch-foreach": ("torch",),
    "torch-fused": ("torch",),
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
#: How torch's and optax's Adam differ from stock's default: the per-element work is the same.
BIAS_CORRECTED = "bias-corrected (MLX's default is not; set bias_correction=True for the same math)"


@dataclass
class PeerStep:
    """One peer set up on one tree: ``step()`` runs one update in place and returns once it is done;
    ``parameters()`` copies out the current parameters, as numpy arrays in the tree's leaf order; ``differs``
    says how its math differs from stock's (``None``: it is stock's, up to rounding)."""

    step: Callable[[], None]
    parameters: Callable[[], list[np.ndarray]]
    differs: str | None = None


@dataclass(frozen=True)
class LibraryRule:
    """A rule in another library: its constructor's name, the arguments that give stock's math, and how it
    differs where it cannot (``None``: it does not)."""

    name: str
    arguments: dict[str, Any]
    differs: str | None = None


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


def torch_rule(optimizer: str | Rule, hyper: Mapping[str, Any], lr: float) -> LibraryRule:
    """The ``torch.optim`` class and arguments of stock's rule; ``NotImplementedError`` where torch has none."""
    r, h = rule(optimizer), dict(hyper)
    if r.name == "rmsprop":
        return LibraryRule("RMSprop", {"lr": lr, "alpha": h["alpha"], "eps": h["eps"]})
    if r.name == "sgd":
        keys = ("momentum", "dampening", "weight_decay", "nesterov")
        differs = "torch's first momentum step is g, not (1-dampening)*g" if h["dampening"] and h["momentum"] else None
        return LibraryRule("SGD", {"lr": lr, **{k: h[k] for k in keys}}, differs)
    if r.name == "adagrad":
        return LibraryRule("Adagrad", {"lr": lr, "eps": h["eps"]})
    if r.name == "adadelta":
        return LibraryRule("Adadelta", {"lr": lr, "rho": h["rho"], "eps": h["eps"]})
    if r.name in ("adam", "adamw"):
        decay = {"weight_decay": h["weight_decay"]} if r.name == "adamw" else {}
        differs = None if h["bias_correction"] else BIAS_CORRECTED
        return LibraryRule(r.title, {"lr": lr, "betas": tuple(h["betas"]), "eps": h["eps"], **decay}, differs)
    if r.name == "adamax":
        differs = "bias-corrected m, and eps inside the max (max(b2*v, |g|+eps))"
        return LibraryRule("Adamax", {"lr": lr, "betas": tuple(h["betas"]), "eps": h["eps"]}, differs)
    raise NotImplementedError(f"torch.optim has no {r.title}")


def optax_rule(optimizer: str | Rule, hyper: Mapping[str, Any], lr: float) -> LibraryRule:
    """The optax transformation and arguments of stock's rule; ``NotImplementedError`` where optax has none.

    ``name`` is an ``optax`` function, ``sgd`` built as ``chain(add_decayed_weights, sgd)`` (:func:`_optax_step`)."""
    r, h = rule(optimizer), dict(hyper)
    if r.name == "rmsprop":
        return LibraryRule("rmsprop", {"learning_rate": lr, "decay": h["alpha"], "eps": h["eps"], "eps_in_sqrt": False})
    if r.name == "sgd":
        if h["dampening"] and h["momentum"]:
            raise NotImplementedError("optax's SGD has no dampening")
        momentum = h["momentum"] if h["momentum"] > 0 else None
        arguments = {"learning_rate": lr, "momentum": momentum, "nesterov": h["nesterov"]}
        return LibraryRule("sgd", {**arguments, "weight_decay": h["weight_decay"]})
    if r.name == "adagrad":
        return LibraryRule("adagrad", {"learning_rate": lr, "initial_accumulator_value": 0.0, "eps": h["eps"] ** 2})
    if r.name == "adadelta":
        return LibraryRule("adadelta", {"learning_rate": lr, "rho": h["rho"], "eps": h["eps"]})
    if r.name in ("adam", "adamw"):
        b1, b2 = h["betas"]
        decay = {"weight_decay": h["weight_decay"]} if r.name == "adamw" else {}
        differs = None if h["bias_correction"] else BIAS_CORRECTED
        return LibraryRule(r.name, {"learning_rate": lr, "b1": b1, "b2": b2, "eps": h["eps"], **decay}, differs)
    if r.name == "adamax":
        b1, b2 = h["betas"]
        differs = "bias-corrected m, and eps inside the max (max(b2*v, |g|+eps))"
        return LibraryRule("adamax", {"learning_rate": lr, "b1": b1, "b2": b2, "eps": h["eps"]}, differs)
    if r.name == "lion":
        b1, b2 = h["betas"]
        return LibraryRule("lion", {"learning_rate": lr, "b1": b1, "b2": b2, "weight_decay": h["weight_decay"]})
    raise NotImplementedError(f"optax has no {r.title}")


@functools.cache
def torch_fused_error(class_name: str) -> str | None:
    """Why ``torch.optim.<class_name>(fused=True)`` does not step on a CPU tensor here (``None``: it does)."""
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    try:
        getattr(torch.optim, class_name)([p], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError) as e:
        return f"torch.optim.{class_name} has no fused CPU kernel here ({str(e).splitlines()[0][:80]})"
    return None


def _library_reason(peer: str, optimizer: str | Rule, hyper: Mapping[str, Any]) -> str | None:
    try:
        if peer == "optax":
            optax_rule(optimizer, hyper, 1e-3)
        elif peer.startswith("torch"):
            mapped = torch_rule(optimizer, hyper, 1e-3)
            return torch_fused_error(mapped.name) if peer == "torch-fused" else None
    except NotImplementedError as e:
        return str(e)
    return None


def peer_unavailable_reason(
    peer: str,
    dtype: mx.Dtype | str = mx.float32,
    n_leaves: int = 0,
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
) -> str | None:
    """``None`` if ``peer`` runs ``optimizer`` here on a tree of ``n_leaves`` leaves of ``dtype``, else why not;
    an unknown peer is a ``ValueError``."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; the peers are {', '.join(PEERS)}")
    if not peer_installed(peer):
        return f"{peer} {NEEDS_EXTRA}"
    if dtype in (mx.bfloat16, "bfloat16"):
        return NO_BFLOAT16
    if peer == "optax" and n_leaves > OPTAX_MAX_LEAVES:
        return f"jax.jit would compile {n_leaves:,} leaves for minutes (optax runs up to {OPTAX_MAX_LEAVES:,})"
    r = rule(optimizer)
    return _library_reason(peer, r, r.hyperparameters(**(hyper or {})))


def peer_availability(
    dtype: mx.Dtype | str = mx.float32, optimizer: str | Rule = DEFAULT_RULE, hyper: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """Each peer -> ``None`` if it runs ``optimizer`` here on ``dtype``, else why it does not."""
    return {p: peer_unavailable_reason(p, dtype, optimizer=optimizer, hyper=hyper) for p in PEERS}


def numpy_leaves(tree: Any) -> list[np.ndarray]:
    """The leaves of an MLX tree as numpy arrays (copies), in :func:`~rmsprop_impls.measure.trees.leaves_of` order."""
    return [np.array(x) for x in leaves_of(tree)]


def _numpy_peer(w: list[np.ndarray], g: list[np.ndarray], lr: float, r: Rule, hyper: dict) -> PeerStep:
    w = [x.copy() for x in w]
    dtype = w[0].dtype if w else np.float32
    runner = NumpyRuleStep(r, hyper, dtype, max((x.size for x in w), default=1))
    leaves = [{"w": wi, "g": gi, **{s: np.zeros_like(wi) for s in r.states}} for wi, gi in zip(w, g)]
    count = [0]

    def step() -> None:
        count[0] += 1
        runner.step(leaves, lr, count[0])

    return PeerStep(step, lambda: [x.copy() for x in w])


def _torch_peer(w: list[np.ndarray], g: list[np.ndarray], mapped: LibraryRule, peer: str) -> PeerStep:
    import torch

    params = [torch.from_numpy(x.copy()) for x in w]
    for p, gi in zip(params, g):
        p.grad = torch.from_numpy(gi.copy())  # its own: torch's foreach Nesterov SGD adds into the gradient
    modes = {"torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}, "torch-per-tensor": {"foreach": False}}
    optimizer = getattr(torch.optim, mapped.name)(params, **mapped.arguments, **modes[peer])
    parameters = lambda: [p.detach().numpy().copy() for p in params]  # noqa: E731
    differs = mapped.differs
    if peer == "torch-foreach" and mapped.name == "SGD" and mapped.arguments["nesterov"]:
        if not mapped.arguments["weight_decay"]:
            differs = "torch's foreach Nesterov SGD adds the momentum into the gradient, so one gradient reused drifts"
    return PeerStep(torch.no_grad()(optimizer.step), parameters, differs)


def _optax_transformation(mapped: LibraryRule):
    import optax

    arguments = dict(mapped.arguments)
    if mapped.name != "sgd":
        return getattr(optax, mapped.name)(**arguments)
    decay = arguments.pop("weight_decay")  # MLX's SGD adds weight_decay*w to the gradient, before the momentum
    return optax.chain(optax.add_decayed_weights(decay), optax.sgd(**arguments)) if decay else optax.sgd(**arguments)


def _optax_peer(w: list[np.ndarray], g: list[np.ndarray], mapped: LibraryRule) -> PeerStep:
    """Pinned to jax's CPU device, so that a jax with a GPU still compares CPU with CPU."""
    import jax
    import optax

    optimizer = _optax_transformation(mapped)
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

    return PeerStep(step, lambda: [np.array(x) for x in carry[0]], mapped.differs)


def build_peer(
    peer: str,
    w: Sequence[np.ndarray],
    g: Sequence[np.ndarray],
    lr: float = 1e-3,
    optimizer: str | Rule = DEFAULT_RULE,
    **hyper: Any,
) -> PeerStep:
    """``peer`` running ``optimizer`` (stock's hyper-parameters ``hyper``, its defaults for the others) on
    parameters ``w`` and gradients ``g`` (numpy arrays, left untouched), state at zero.

    Raises ``ValueError`` for an unknown peer, stock's errors for a bad hyper-parameter and
    ``NotImplementedError`` (with the reason) for a peer that cannot run here; nothing is stepped yet.
    """
    r = rule(optimizer)
    h = r.hyperparameters(**hyper)
    reason = peer_unavailable_reason(peer, w[0].dtype.name if w else "float32", len(w), r, h)
    if reason is not None:
        raise NotImplementedError(reason)
    w, g = list(w), list(g)
    if peer == "numpy":
        return _numpy_peer(w, g, lr, r, h)
    if peer == "optax":
        return _optax_peer(w, g, optax_rule(r, h, lr))
    return _torch_peer(w, g, torch_rule(r, h, lr), peer)


def peer_candidates(
    params: Any,
    grads: Any,
    peers: Sequence[str] | None = None,
    learning_rate: float = 1e-3,
    optimizer: str | Rule = DEFAULT_RULE,
    hyper: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """Each peer (default: every installed one) running ``optimizer`` on this MLX tree, to be timed with the
    variants (:func:`~rmsprop_impls.measure.compare.time_candidates`); peers that cannot run come with their
    reason. The tree is converted to numpy once, and each peer copies it when it is built, so every peer starts
    from the same parameters."""
    r = rule(optimizer)
    h = r.hyperparameters(**(hyper or {}))
    leaves = leaves_of(params)
    dtype = leaves[0].dtype if leaves else mx.float32
    converted: list = []

    def build(candidate: Candidate) -> Callable[[], None]:
        if not converted:
            converted.extend((numpy_leaves(params), numpy_leaves(grads)))
        peer = build_peer(candidate.name, *converted, learning_rate, r, **h)
        candidate.differs = peer.differs
        return peer.step

    candidates = []
    for name in installed_peers() if peers is None else peers:
        candidate = Candidate(name, PEER_DEVICE, None, peer_unavailable_reason(name, dtype, len(leaves), r, h))
        if candidate.reason is None:
            candidate.build = functools.partial(build, candidate)
        candidates.append(candidate)
    return candidates
