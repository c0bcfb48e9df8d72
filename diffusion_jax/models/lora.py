"""Low-rank adaptation (LoRA, Hu et al. 2021) of any of our models, on its parameter tree.

A frozen weight W0 of a linear layer gets a trainable change of rank r (Eq. 3):

    h = W0 x + (alpha / r) B A x,     A: r x d_in ("down"),  B: d_out x r ("up", zero at first)

In our layout a Dense kernel is [d_in, d_out], so the adapted kernel is
W0 + (alpha / r) down @ up with down [d_in, r] and up [r, d_out]. A convolution's kernel
[kh, kw, d_in, d_out] gets down [kh, kw, d_in, r] (a convolution to r channels) and up
[r, d_out] (a 1x1 convolution), as PEFT's Conv2d LoRA: those two convolutions in a row are
the one convolution of the merged kernel, exactly (stride and padding are the base layer's).

    lora = init_lora(rng, unet_params, targets=UNET_ATTENTION, rank=4, alpha=4)
    eps = unet.apply({"params": merge(unet_params, lora)}, x, t, text)   # trainable: lora

An adapter is a tree of its own that mirrors the modules it adapts
(``{"down_blocks_0": {... {"to_q": {"down": ..., "up": ...}}}}``), so the optimizer holds it
alone: the base weights are an argument the loss is never differentiated by, frozen and
shareable between adapters. `merge` adds the weighted changes of any number of adapters
(Ryu's and PEFT's multi-adapter inference, sum_k w_k (alpha_k / r_k) down_k up_k) and
`unmerge` takes them out again. The change is added to the kernel inside the program rather
than as a second branch beside the layer: the same function of x, with one d_in x d_out
product per adapted layer per call (small beside the activations' work at SD's sizes).

Modules are named by their path in our tree joined with "." (diffusers' names with "_"
before list indices: ``down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_out_0``).
A target matches a module whose name ends with it at a "." boundary, as PEFT's
``target_modules``; only modules with a 2-D kernel (or, with ``convolutions=True``, a 4-D one)
are adapted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

# diffusers' DreamBooth-LoRA targets (train_dreambooth_lora.py): the attention projections
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
INITS = ("gaussian", "kaiming")


@struct.dataclass
class LoRA:
    """Adapters of one model: `weights` mirrors the adapted modules, each {"down", "up"};
    every module's change is scaled by alpha / rank (per module, a kohya file's alphas are
    folded into its "up")."""

    weights: dict
    alpha: float = struct.field(pytree_node=False)
    rank: int = struct.field(pytree_node=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> list[tuple[str, ...]]:
        """The paths of the adapted modules, sorted."""
        return sorted({path[:-1] for path in traverse_util.flatten_dict(self.weights)})

    def num_parameters(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.weights))


def module_name(path: Sequence[str]) -> str:
    """A module's name: its path in our tree joined with "." (module docstring)."""
    return ".".join(path)


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def target_modules(
    params, targets: Sequence[str], *, convolutions: bool = False
) -> list[tuple[str, ...]]:
    """Paths of the modules of `params` a LoRA on `targets` adapts (module docstring); a
    ValueError naming the targets when none matches."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a sequence of module names, got the string {targets!r}")
    ranks = (2, 4) if convolutions else (2,)
    found = [
        path[:-1]
        for path, leaf in traverse_util.flatten_dict(params).items()
        if path[-1] == "kernel"
        and len(leaf.shape) in ranks
        and _matches(module_name(path[:-1]), targets)
    ]
    if not found:
        kinds = "linear or convolution" if convolutions else "linear"
        examples = [module_name(p[:-1]) for p in list(traverse_util.flatten_dict(params))[:3]]
        raise ValueError(
            f"LoRA targets {list(targets)} match no {kinds} layer of the model; module names "
            f"look like {examples}"
        )
    return sorted(found)


def init_lora(
    rng,
    params,
    *,
    targets: Sequence[str],
    rank: int,
    alpha: float | None = None,
    convolutions: bool = False,
    init: str = "gaussian",
) -> LoRA:
    """A fresh LoRA of `rank` on the `targets` of `params`: up = 0, so that the adapted model
    starts as the base model, and down ~ N(0, 1 / rank^2) as diffusers' training scripts
    (PEFT's ``init_lora_weights="gaussian"``) or, with ``init="kaiming"``, PEFT's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a = sqrt 5); alpha defaults to
    the rank (scale 1, diffusers' default)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if init not in INITS:
        raise ValueError(f"LoRA init={init!r} is unknown; allowed: {list(INITS)}")
    flat_params = traverse_util.flatten_dict(params)
    modules = target_modules(params, targets, convolutions=convolutions)
    flat = {}
    for path, key in zip(modules, jax.random.split(rng, len(modules))):
        kernel = flat_params[(*path, "kernel")]
        *down_shape, d_out = kernel.shape
        flat[(*path, "down")] = _init_down(key, (*down_shape, rank), init)
        flat[(*path, "up")] = jnp.zeros((rank, d_out), jnp.float32)
    return LoRA(traverse_util.unflatten_dict(flat), float(rank if alpha is None else alpha), rank)


def _init_down(key, shape: tuple[int, ...], init: str) -> jax.Array:
    """down [..., d_in, r] drawn as `init_lora`'s docstring says."""
    *fan, rank = shape
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / rank
    bound = 1.0 / np.sqrt(np.prod(fan))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """The change down @ up of one kernel, [d_in, d_out] or [kh, kw, d_in, d_out] (unscaled)."""
    return jnp.einsum("...ir,ro->...io", down, up)


def _as_weighted(adapters) -> list[tuple[LoRA, float]]:
    if isinstance(adapters, LoRA):
        return [(adapters, 1.0)]
    return [(a, 1.0) if isinstance(a, LoRA) else (a[0], float(a[1])) for a in adapters]


def _add(params, adapters, sign: float):
    flat = dict(traverse_util.flatten_dict(params))
    for lora, weight in _as_weighted(adapters):
        weights = traverse_util.flatten_dict(lora.weights)
        for path in lora.modules():
            key = (*path, "kernel")
            if key not in flat:
                raise ValueError(f"LoRA module {module_name(path)} is not a layer of the model")
            kernel = flat[key]
            change = delta(weights[(*path, "down")], weights[(*path, "up")])
            if change.shape != kernel.shape:
                raise ValueError(
                    f"LoRA module {module_name(path)} changes a kernel of shape "
                    f"{change.shape}, the model's is {kernel.shape}"
                )
            scale = sign * weight * lora.scale
            flat[key] = (kernel + scale * change.astype(jnp.float32)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params, adapters) -> dict:
    """`params` with the change of each adapter added: W0 + sum_k w_k (alpha_k / r_k) down_k up_k.
    `adapters` is a LoRA, or a sequence of LoRAs and (LoRA, weight) pairs (weight 1 by default).
    Differentiable in the adapters: training calls it inside the loss."""
    return _add(params, adapters, 1.0)


def unmerge(params, adapters) -> dict:
    """The inverse of `merge`: the adapters' weighted changes subtracted (to float rounding)."""
    return _add(params, adapters, -1.0)
