"""A residual MLP denoiser for low-dimensional toy data (x of shape [B, data_dim]).

The same recipe as the image networks at toy scale: an embedding of t (sinusoidal for
discrete t, random Fourier features for continuous t) passed through a two-layer MLP and
added in every residual block, optional class conditioning with a "null" class, and a
zero-initialised output layer so the network outputs 0 at initialisation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import Dtype, TimeEmbedding, check_label, default_init, zeros_init


class ResidualMLPBlock(nn.Module):
    """``h + Dense(SiLU(Dense(LayerNorm(h)) + Dense(emb)))``: pre-norm residual MLP block."""

    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(
            self.hidden_size, dtype=self.dtype, kernel_init=default_init, name=name
        )
        r = nn.LayerNorm(dtype=self.dtype, name="norm")(h)  # [B, hidden]
        r = nn.silu(dense("dense_0")(r) + dense("emb")(nn.silu(emb)))
        return h + dense("dense_1")(r)


class MLPDenoiser(nn.Module):
    """MLP denoiser: ``(x [B, data_dim], t [B], label [B] | None) -> [B, out_channels]``."""

    out_channels: int
    hidden_size: int = 256
    num_layers: int = 4
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    num_classes: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, label: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        del train  # no dropout in the toy network
        check_label(label, self.num_classes)
        emb = TimeEmbedding(
            self.hidden_size,
            self.hidden_size,
            kind=self.time_embedding,
            fourier_scale=self.fourier_scale,
            dtype=self.dtype,
            name="time_embed",
        )(t)  # [B, hidden]
        if self.num_classes > 0:
            emb = emb + nn.Embed(
                self.num_classes + 1, self.hidden_size, dtype=self.dtype, name="label_embed"
            )(label)
        h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=default_init, name="input")(
            x.astype(self.dtype)
        )  # [B, hidden]
        for i in range(self.num_layers):
            h = ResidualMLPBlock(self.hidden_size, self.dtype, name=f"block_{i}")(h, emb)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype, name="norm_out")(h))
        out = nn.Dense(self.out_channels, dtype=self.dtype, kernel_init=zeros_init, name="output")(
            h
        )
        return out.astype(jnp.float32)  # [B, out_channels]
