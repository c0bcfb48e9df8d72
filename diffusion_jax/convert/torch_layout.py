"""PyTorch state dicts in the parameter trees of our modules that are named after them.

Our ports of diffusers and transformers modules (the autoencoder, the text encoder, the
conditional U-Net) name their submodules as PyTorch does, with list indices joined by "_":
``decoder.up_blocks.0.resnets.1.conv1.weight`` is ``decoder/up_blocks_0/resnets_1/conv1/
kernel``, but for names PyTorch spells so itself (``time_embedding.linear_1``). So one rule
converts them all, driven by our model's own tree:

    params = params_from_state_dict(state_dict, jax.eval_shape(init, rng), source=path)

Layouts: a PyTorch convolution is [out, in, kh, kw], ours [kh, kw, in, out]; a linear layer
[out, in], ours [in, out] (a 1x1 convolution stored for a linear layer is squeezed); norms'
``weight`` is our ``scale``. Every missing, unused or misshapen weight is reported at once,
by its PyTorch name with the expected and the found shape, and nothing is returned then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
# PyTorch module names that themselves end in "_<digits>" (diffusers' TimestepEmbedding)
_LITERAL_NAMES = {"linear_1", "linear_2"}


def torch_name(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of our parameter at `path` (module docstring)."""
    *modules, leaf = path
    parts = []
    for module in modules:
        match = None if module in _LITERAL_NAMES else _INDEXED.match(module)
        parts.extend(match.groups() if match else (module,))
    parts.append(_LEAF_NAMES.get(leaf, leaf))
    return ".".join(parts)


def _to_flax_layout(value: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    """`value` (PyTorch layout) in our layout for a leaf named `leaf` of `shape`."""
    if leaf == "kernel" and value.ndim == 4 and len(shape) == 4:
        return value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    if leaf == "kernel" and len(shape) == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):  # a 1x1 conv for a linear layer
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else value  # [out, in] -> [in, out]
    return value


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], expected, *, source: str, dtype=np.float32
) -> dict:
    """Our parameter tree of the shapes in `expected` (arrays or `jax.ShapeDtypeStruct`s)
    from `state_dict` (PyTorch names and layouts, NumPy arrays), cast to `dtype`.

    Raises a ValueError naming `source` and every weight that is missing, unused by our
    model, or of another shape (PyTorch name, expected and found shape in PyTorch layout).
    """
    flat_expected = traverse_util.flatten_dict(expected)
    flat, problems, used = {}, [], set()
    for path, leaf in flat_expected.items():
        name = torch_name(path)
        if name not in state_dict:
            problems.append(f"missing {name} (expected shape {tuple(leaf.shape)})")
            continue
        used.add(name)
        found = np.asarray(state_dict[name])
        value = _to_flax_layout(found, path[-1], tuple(leaf.shape))
        if value.shape != tuple(leaf.shape):
            problems.append(
                f"{name} has shape {found.shape}, expected {torch_shape(path[-1], leaf.shape)}"
            )
            continue
        flat[path] = value.astype(dtype)
    unused = sorted(set(state_dict) - used)
    problems.extend(f"unexpected {name} (shape {np.shape(state_dict[name])})" for name in unused)
    if problems:
        listed = "; ".join(problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{source} does not fit the model: {listed}{more}")
    return traverse_util.unflatten_dict(flat)


def torch_shape(leaf: str, shape) -> tuple[int, ...]:
    """The PyTorch-layout shape of one of our leaves, for error messages."""
    shape = tuple(shape)
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def state_dict_from_params(params) -> dict[str, np.ndarray]:
    """The PyTorch state dict (names and layouts) of our parameter tree: the inverse of
    `params_from_state_dict`, for exporting our weights to diffusers or transformers."""
    state_dict = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel" and value.ndim == 2:
            value = value.T
        state_dict[torch_name(path)] = np.ascontiguousarray(value)
    return state_dict
