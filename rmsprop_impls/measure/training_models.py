"""The models a whole training step is timed on: built with random weights, nothing downloaded.

* ``mlp-2048``: ``nn.Sequential`` of 4 ``nn.Linear(2048, 2048)`` (16.8M parameters), batch 8, float32,
  MSE loss: the reference model of issue 23. It needs nothing but MLX.
* ``llama-*``: mlx-lm's own Llama decoder (``mlx_lm.models.llama.Model(ModelArgs(...))``) at sizes that
  train on a 2-core machine, with mlx-lm's own next-token loss (``mlx_lm.tuner.trainer.default_loss``)
  on random tokens. ``llama-tiny`` is the size the tests and the default subset use.
* ``llama-30m-lora`` (and ``llama-tiny-lora`` for the tests): a decoder fine-tuned the way mlx-lm's LoRA
  does it: the base frozen and every linear layer wrapped by ``mlx_lm.tuner.utils.linear_to_lora_layers``,
  so the optimizer sees many small trainable leaves and the per-leaf cost of a step dominates.

mlx-lm is optional (``pip install 'rmsprop-bench[train]'``); :func:`mlx_lm_missing` says why it cannot be
used where it cannot, and everything else runs without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .trees import tree_from_file

#: The oldest mlx-lm this was run with (with MLX 0.30.1; 0.32.x needs MLX 0.31 or newer to import).
MIN_MLX_LM = (0, 30, 7)
INSTALL_HINT = "pip install 'rmsprop-bench[train]'"


@dataclass(frozen=True)
class LlamaSize:
    """A Llama decoder's shape and the batch it trains on (``seq`` tokens predicted per row)."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int


LLAMA_SIZES: dict[str, LlamaSize] = {
    "llama-tiny": LlamaSize(hidden=64, layers=2, ffn=172, heads=4, kv_heads=2, vocab=1024, batch=2, seq=32),
    "llama-10m": LlamaSize(hidden=256, layers=8, ffn=704, heads=8, kv_heads=4, vocab=16384, batch=4, seq=64),
    "llama-30m": LlamaSize(hidden=512, layers=8, ffn=1408, heads=8, kv_heads=4, vocab=16384, batch=4, seq=64),
    "llama-100m": LlamaSize(hidden=768, layers=12, ffn=2048, heads=12, kv_heads=4, vocab=32000, batch=2, seq=64),
}
#: LoRA fine-tunes: the base decoder, and mlx-lm's LoRA settings (every linear of every layer).
LORA_MODELS: dict[str, tuple[str, dict]] = {
    "llama-tiny-lora": ("llama-tiny", {"rank": 8, "scale": 20.0, "dropout": 0.0}),
    "llama-30m-lora": ("llama-30m", {"rank": 8, "scale": 20.0, "dropout": 0.0}),
}
MLP_MODELS = {"mlp-2048": (2048, 4, 8)}  # width, layers, batch


def training_model_names() -> list[str]:
    return [*MLP_MODELS, *LLAMA_SIZES, *LORA_MODELS]


def needs_mlx_lm(name: str) -> bool:
    return name in LLAMA_SIZES or name in LORA_MODELS


def mlx_lm_missing() -> str | None:
    """``None`` where mlx-lm's Llama, LoRA and loss import here, else why not (missing, too old, wrong MLX)."""
    try:
        installed = version("mlx-lm")
    except PackageNotFoundError:
        return f"mlx-lm is not installed ({INSTALL_HINT})"
    if tuple(int(p) for p in installed.split(".")[:3] if p.isdigit()) < MIN_MLX_LM:
        oldest = ".".join(map(str, MIN_MLX_LM))
        return f"mlx-lm {installed} is older than {oldest}, the oldest this was run with ({INSTALL_HINT})"
    try:
        for module in ("mlx_lm.models.llama", "mlx_lm.tuner.utils", "mlx_lm.tuner.trainer"):
            importlib.import_module(module)
    except Exception as e:  # an mlx-lm built for another MLX fails on a missing name, not only an ImportError
        return f"mlx-lm {installed} does not import with MLX {mx.__version__}: {type(e).__name__}: {e}"
    return None


@dataclass
class TrainingModel:
    """A model, the loss ``loss(model, *batch)`` its step minimises, and one fixed batch.

    ``build`` makes a fresh module of the same architecture (and freezing), for each loop that trains
    a copy: :func:`copy_model` gives it this model's weights.
    """

    name: str
    module: nn.Module
    loss: Callable[..., Any]
    batch: tuple[mx.array, ...]
    build: Callable[[], nn.Module]

    def describe(self) -> dict[str, Any]:
        trainable = [x for _, x in tree_flatten(self.module.trainable_parameters())]
        total = sum(x.size for _, x in tree_flatten(self.module.parameters()))
        return {
            "parameters": total,
            "trainable": sum(x.size for x in trainable),
            "trainable_leaves": len(trainable),
            "batch": "x".join(str(n) for n in self.batch[0].shape),
        }


def copy_model(model: TrainingModel) -> nn.Module:
    """A fresh module with ``model``'s weights (the same arrays: MLX updates make new ones) and freezing."""
    module = model.build()
    module.update(model.module.parameters())
    return module


def _mse(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.mse_loss(model(x), y)


def mlp_model(name: str, seed: int = 0) -> TrainingModel:
    width, layers, batch = MLP_MODELS[name]

    def build() -> nn.Module:
        return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    return _seeded(name, build, _mse, lambda key: tuple(mx.random.normal((batch, width), key=k) for k in key), seed)


def llama_model(name: str, seed: int = 0) -> TrainingModel:
    """mlx-lm's Llama at size ``name`` (or a LoRA fine-tune of one), trained on random tokens."""
    reason = mlx_lm_missing()
    if reason is not None:
        raise RuntimeError(reason)
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    base, lora = LORA_MODELS.get(name, (name, None))
    size = LLAMA_SIZES[base]
    args = llama.ModelArgs(
        model_type="llama", hidden_size=size.hidden, num_hidden_layers=size.layers, intermediate_size=size.ffn,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, rms_norm_eps=1e-5,
        vocab_size=size.vocab, tie_word_embeddings=True,
    )  # fmt: skip

    def build() -> nn.Module:
        module = llama.Model(args)
        if lora is not None:
            module.freeze()
            linear_to_lora_layers(module, size.layers, dict(lora))
        return module

    def tokens(key: mx.array) -> tuple[mx.array, mx.array]:
        batch = mx.random.randint(0, size.vocab, (size.batch, size.seq + 1), key=key[0])
        lengths = mx.array([[0, size.seq]] * size.batch)  # every token counts in default_loss's mask
        return batch, lengths

    return _seeded(name, build, default_loss, tokens, seed)


def _seeded(name: str, build: Callable[[], nn.Module], loss, make_batch, seed: int) -> TrainingModel:
    """Build under ``mx.random.seed(seed)`` (so every run starts from the same weights) and evaluate it."""
    mx.random.seed(seed)
    module = build()
    batch = make_batch(mx.random.split(mx.random.key(seed + 1), 2))
    mx.eval(module.parameters(), batch)
    return TrainingModel(name, module, loss, batch, build)


def training_model(name: str, seed: int = 0) -> TrainingModel:
    """A training model by name (:func:`training_model_names`); ``RuntimeError`` where mlx-lm is needed and missing."""
    if name in MLP_MODELS:
        return mlp_model(name, seed)
    if needs_mlx_lm(name):
        return llama_model(name, seed)
    raise ValueError(f"unknown training model '{name}'; choose one of {', '.join(training_model_names())}")


def model_from_file(path: str, seed: int = 0) -> TrainingModel:
    """A training model whose weights come from a ``.safetensors`` or ``.npz`` file (``mx.load``).

    Two layouts are understood, because a training step needs the forward pass and not only the tree:
    a chain of linear layers (``layers.N.weight`` and ``layers.N.bias``, as ``nn.Sequential`` saves them),
    trained like ``mlp-2048`` with batch 8, and an mlx-lm Llama (``model.embed_tokens.weight``,
    ``model.layers.N.self_attn.q_proj.weight``, ...), whose shape is read from the weights (heads of 64).
    """
    tree = tree_from_file(path)
    flat = dict(tree_flatten(tree))
    if "model.embed_tokens.weight" in flat:
        return _llama_from_weights(path, flat, seed)
    if "layers" in tree and all(isinstance(layer, dict) and "weight" in layer for layer in tree["layers"]):
        return _linear_chain_from_weights(path, tree, seed)
    raise ValueError(
        f"{path}: neither a chain of linear layers (layers.N.weight) nor an mlx-lm Llama (model.embed_tokens.weight)"
    )


def _linear_chain_from_weights(path: str, tree: dict, seed: int) -> TrainingModel:
    shapes = [layer["weight"].shape for layer in tree["layers"]]
    if any(len(s) != 2 for s in shapes) or any(a[0] != b[1] for a, b in zip(shapes, shapes[1:])):
        raise ValueError(f"{path}: its layers' weights do not chain ({shapes})")
    biases = ["bias" in layer for layer in tree["layers"]]

    def build() -> nn.Module:
        return nn.Sequential(*(nn.Linear(s[1], s[0], bias=b) for s, b in zip(shapes, biases)))

    def batch(key: mx.array) -> tuple[mx.array, mx.array]:
        return mx.random.normal((8, shapes[0][1]), key=key[0]), mx.random.normal((8, shapes[-1][0]), key=key[1])

    return _with_weights(_seeded(path, build, _mse, batch, seed), tree)


def _llama_from_weights(path: str, flat: dict, seed: int) -> TrainingModel:
    reason = mlx_lm_missing()
    if reason is not None:
        raise RuntimeError(f"{path} is an mlx-lm Llama, but {reason}")
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss

    vocab, hidden = flat["model.embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in flat if k.startswith("model.layers."))
    heads = max(hidden // 64, 1)
    kv = flat["model.layers.0.self_attn.k_proj.weight"].shape[0] // (hidden // heads)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=flat["model.layers.0.mlp.gate_proj.weight"].shape[0], num_attention_heads=heads,
        num_key_value_heads=kv, rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings="lm_head.weight" not in flat,
    )  # fmt: skip

    def tokens(key: mx.array) -> tuple[mx.array, mx.array]:
        return mx.random.randint(0, vocab, (4, 65), key=key[0]), mx.array([[0, 64]] * 4)

    return _with_weights(_seeded(path, lambda: llama.Model(args), default_loss, tokens, seed), tree_unflatten(flat))


def _with_weights(model: TrainingModel, weights: dict) -> TrainingModel:
    """``model`` with the file's weights in place of its random ones; a mismatch is a one-line ``ValueError``."""
    try:
        model.module.update(weights, strict=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{model.name}: its weights do not fit the model read from it: {e}") from None
    mx.eval(model.module.parameters())
    return model
