"""Parameter trees for tests, benchmarks and the CLI, by name.

Two kinds:

* synthetic: ``"<leaves>x<leaf size>"`` such as ``"16x1M"`` or ``"16384x256"``
  (``K`` = 1024, ``M`` = 1024**2), optionally nested;
* realistic: the trainable parameters of real ``mlx.nn`` models, ``"<model>-<size>"``
  such as ``"mlp-small"`` or ``"transformer-base"`` (GPT-2 small: 124M in 148 leaves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..rules import rule

DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_SUFFIX = {"": 1, "K": 1024, "M": 1024**2}


def parse_dtype(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def synthetic_tree(n_leaves: int, leaf_size: int, dtype: mx.Dtype = mx.float32, depth: int = 1, seed: int = 0) -> dict:
    """``n_leaves`` 1-D leaves of ``leaf_size`` elements, nested up to ``depth`` dicts deep.

    Leaves are spread over nested dicts of at most 16 children per level,
    which is how model trees look to the optimizer.
    """
    if n_leaves < 0 or leaf_size < 1 or depth < 1:
        raise ValueError(f"need n_leaves >= 0, leaf_size >= 1, depth >= 1; got {n_leaves}, {leaf_size}, {depth}")
    key = mx.random.key(seed)
    leaves = (
        [mx.random.normal((leaf_size,), key=k).astype(dtype) for k in mx.random.split(key, n_leaves)]
        if (n_leaves)
        else []
    )
    return _nest([(f"p{i}", x) for i, x in enumerate(leaves)], depth)


def _nest(items: list[tuple[str, mx.array]], depth: int) -> dict:
    if depth == 1 or len(items) <= 16:
        return dict(items)
    chunk = -(-len(items) // 16)
    return {f"g{j}": _nest(items[i : i + chunk], depth - 1) for j, i in enumerate(range(0, len(items), chunk))}


class MLP(nn.Module):
    def __init__(self, width: int, n_layers: int, n_in: int = 784, n_out: int = 10):
        super().__init__()
        sizes = [n_in] + [width] * n_layers + [n_out]
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


class GPT2Block(nn.Module):
    """A GPT-2 block: fused qkv projection, output projection and a 4x MLP."""

    def __init__(self, d: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)


class GPT2(nn.Module):
    def __init__(self, d: int, n_layers: int, vocab: int, context: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = [GPT2Block(d) for _ in range(n_layers)]
        self.ln_f = nn.LayerNorm(d)


class CNN(nn.Module):
    def __init__(self, channels: int, n_blocks: int, n_classes: int = 1000):
        super().__init__()
        chans = [3] + [channels * 2**i for i in range(n_blocks)]
        self.convs = [nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:])]
        self.norms = [nn.BatchNorm(c) for c in chans[1:]]
        self.head = nn.Linear(chans[-1], n_classes)


#: model -> size -> constructor. "transformer-base" is GPT-2 small.
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {
        "tiny": lambda: MLP(64, 2),
        "small": lambda: MLP(1024, 4),
        "base": lambda: MLP(4096, 6),
    },
    "transformer": {
        "tiny": lambda: GPT2(64, 2, 1000, 128),
        "small": lambda: GPT2(256, 4, 8192, 512),
        "base": lambda: GPT2(768, 12, 50257, 1024),
    },
    "cnn": {
        "tiny": lambda: CNN(8, 2, 10),
        "small": lambda: CNN(64, 4),
        "base": lambda: CNN(64, 6),
    },
}


def build_model(model: str, size: str = "small") -> nn.Module:
    """A freshly initialised ``mlx.nn`` model by name and size."""
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}'; choose one of {', '.join(MODELS)}")
    if size not in MODELS[model]:
        raise ValueError(f"unknown size '{size}' for {model}; choose one of {', '.join(MODELS[model])}")
    return MODELS[model][size]()


def model_tree(model: str, size: str = "small", dtype: mx.Dtype = mx.float32) -> dict:
    """The trainable parameters of a real ``mlx.nn`` model, cast to ``dtype``."""
    params = build_model(model, size).trainable_parameters()
    return tree_map(lambda x: x.astype(dtype), params)


_SYNTHETIC = re.compile(r"^(\d+)([KM]?)x(\d+)([KM]?)$")


@dataclass(frozen=True)
class TreeInfo:
    name: str
    n_leaves: int
    n_params: int


def tree_by_name(name: str, dtype: mx.Dtype | str = mx.float32, seed: int = 0) -> dict:
    """A tree from its name: ``"16x1M"`` (synthetic) or ``"mlp-small"`` (real model)."""
    dtype = parse_dtype(dtype)
    m = _SYNTHETIC.match(name)
    if m:
        n_leaves = int(m[1]) * _SUFFIX[m[2]]
        return synthetic_tree(n_leaves, int(m[3]) * _SUFFIX[m[4]], dtype, depth=2, seed=seed)
    model, _, size = name.partition("-")
    if model in MODELS and size in MODELS[model]:
        return model_tree(model, size, dtype)
    raise ValueError(
        f"unknown tree '{name}': use '<leaves>x<size>' (e.g. 16x1M, 16384x256) or one of "
        + ", ".join(f"{m}-{s}" for m in MODELS for s in MODELS[m])
    )


#: What ``tree_from_file`` reads: the formats of ``mx.save_safetensors`` and ``mx.savez``.
PARAMETER_FILES = (".safetensors", ".npz")


def tree_from_file(path: str | Path) -> dict:
    """The parameter tree saved in a ``.safetensors`` or ``.npz`` file, nested by its dotted keys.

    ``"layers.0.w"`` becomes ``{"layers": [{"w": ...}]}``, as ``mlx.utils.tree_unflatten`` reads it.
    Raises ``ValueError`` with one line for a missing, unreadable, empty or non-floating file.
    """
    path = Path(path)
    if path.suffix not in PARAMETER_FILES:
        kinds = " or ".join(PARAMETER_FILES)
        raise ValueError(f"{path}: expected a {kinds} file, not '{path.suffix or 'no extension'}'")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        arrays = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {path.suffix} file ({e})") from None
    if not arrays:
        raise ValueError(f"{path}: holds no arrays")
    for key, x in arrays.items():
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"{path}: '{key}' is {x.dtype}, but RMSprop updates floating-point parameters only")
    return tree_unflatten(sorted(arrays.items()))


def tree_info(name: str) -> TreeInfo:
    """Leaf and parameter counts of a named tree, without allocating a big one."""
    m = _SYNTHETIC.match(name)
    if m:
        n_leaves = int(m[1]) * _SUFFIX[m[2]]
        return TreeInfo(name, n_leaves, n_leaves * int(m[3]) * _SUFFIX[m[4]])
    leaves = leaves_of(tree_by_name(name))
    return TreeInfo(name, len(leaves), sum(x.size for x in leaves))


def leaves_of(tree: Any) -> list[mx.array]:
    return [x for _, x in tree_flatten(tree)]


def random_like(tree: Any, seed: int = 1) -> Any:
    """Normal noise shaped and typed like ``tree``: stand-in gradients."""
    leaves = leaves_of(tree)
    keys = iter(mx.random.split(mx.random.key(seed), max(len(leaves), 1)))
    return tree_map(lambda x: mx.random.normal(x.shape, key=next(keys)).astype(x.dtype), tree)


def step_bytes(tree: Any, optimizer: Any = "rmsprop", hyper: dict | None = None) -> int:
    """Bytes one step of ``optimizer`` (a rule or its name) moves over ``tree``: the arrays it reads and writes,
    per element (RMSprop reads w, g and v and writes w and v: 5; Adam 7)."""
    r = rule(optimizer)
    streams = r.bytes_per_element(r.hyperparameters(**(hyper or {})), itemsize=1)
    return streams * sum(x.nbytes for x in leaves_of(tree))
