"""Building blocks shared by the denoisers: time embeddings, attention, resampling.

Parameters are created in float32 (Flax's default ``param_dtype``); ``dtype`` is the
computation dtype, so ``jnp.bfloat16`` gives mixed precision with float32 master weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TIME_EMBEDDINGS = ("sinusoidal", "fourier")

# Ho et al.'s TF code initialises every layer with variance_scaling(1, "fan_avg", "uniform").
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros_init()


def sinusoidal_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Transformer position encoding of ``t`` (Vaswani et al. 2017, Sec. 3.5).

    As DDPM's ``get_timestep_embedding`` (Ho et al. 2020, Appendix B): frequencies
    ``w_k = max_period^(-k / (half - 1))`` for k < half = dim / 2, output
    ``[sin(t w_k), cos(t w_k)]``. ``t`` may be fractional: it is not rounded.
    """
    if dim % 2 != 0 or dim < 4:
        raise ValueError(f"sinusoidal embedding dim={dim} must be even and at least 4")
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, dim]


def fourier_embedding(t: jax.Array, dim: int, *, scale: float) -> jax.Array:
    """Random Fourier features of a continuous ``t`` (Tancik et al. 2020; NCSN++ of Song et al.
    2021): ``[sin(2 pi t w), cos(2 pi t w)]`` with ``w ~ N(0, scale^2)``.

    The frequencies are drawn once from a fixed seed and are constants, not parameters, so an
    optimizer (weight decay included) never moves them and the parameter pytree holds only
    trainable weights. They come from NumPy's legacy generator, whose stream is frozen: JAX's
    keys would give other values under `JAX_DEFAULT_PRNG_IMPL=rbg` or another
    `jax_threefry_partitionable`, so a checkpoint would compute another function there.
    """
    if dim % 2 != 0:
        raise ValueError(f"fourier embedding dim={dim} must be even")
    normal = np.random.RandomState(0).standard_normal(dim // 2)
    freqs = jnp.asarray(normal * scale, jnp.float32)
    angles = 2.0 * np.pi * t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, dim/2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, dim]


class TimeEmbedding(nn.Module):
    """Embedding of t followed by a two-layer MLP (Ho et al. 2020, Appendix B).

    ``kind`` is "sinusoidal" (discrete or rescaled t) or "fourier" (continuous t).
    """

    base_dim: int
    out_dim: int
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0
    dtype: Dtype = jnp.float32
    kernel_init: Any = default_init

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        if self.kind == "sinusoidal":
            features = sinusoidal_embedding(t, self.base_dim)
        elif self.kind == "fourier":
            features = fourier_embedding(t, self.base_dim, scale=self.fourier_scale)
        else:
            raise ValueError(f"time_embedding={self.kind!r}; allowed: {TIME_EMBEDDINGS}")
        dense = lambda name: nn.Dense(
            self.out_dim, dtype=self.dtype, kernel_init=self.kernel_init, name=name
        )
        hidden = nn.silu(dense("dense_0")(features))
        return dense("dense_1")(hidden)  # [B, out_dim]


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of [B, H, W, C] by broadcasting (no gather)."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)  # [B, 2H, 2W, C]


def downsample_avg(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 of [B, H, W, C]."""
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # [B, H/2, W/2, C]


def check_label(label: jax.Array | None, num_classes: int) -> None:
    """A label needs a class-conditional model and vice versa (null label = num_classes)."""
    if label is not None and num_classes == 0:
        raise ValueError(
            "a class label was passed but model.num_classes=0 (unconditional model); "
            "set model.num_classes > 0 for class conditioning"
        )
    if label is None and num_classes > 0:
        raise ValueError(
            f"model.num_classes={num_classes} needs a label; pass label=num_classes "
            f"({num_classes}) for the unconditional (null) class"
        )
