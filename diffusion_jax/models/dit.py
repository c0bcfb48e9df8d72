"""Diffusion Transformer, DiT (Peebles & Xie 2023), with adaLN-Zero conditioning.

The input [B, H, W, C] (pixels, or latents with any channel count) is cut into p x p
patches, linearly embedded and given fixed 2-D sine-cosine position embeddings; ``depth``
transformer blocks are modulated by the sum of the time and class embeddings (adaLN-Zero,
Sec. 3.2); a final adaptive LayerNorm and linear layer map each token back to a p x p x out
patch. The time embedding is DDPM's sinusoidal one (sin before cos, frequencies
``10000^(-k/(half-1))``), a harmless variant of DiT's (cos before sin, ``/half``).
Label dropout for classifier-free guidance is done by the loss, not here: the label table
has ``num_classes + 1`` rows, the last one the "null" class.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.attention import attention
from diffusion_jax.models.layers import Dtype, TimeEmbedding, check_label, zeros_init

# Table 1 of Peebles & Xie 2023: name -> (depth, hidden_size, num_heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCH_SIZES = (2, 4, 8)
FREQUENCY_EMBEDDING_DIM = 256

xavier_init = nn.initializers.xavier_uniform()
# The patch embedding initialised as the linear map it is (DiT's and MAE's
# xavier_uniform_(w.view([D, -1]))): fan-in C p^2, fan-out D. Flax's xavier_uniform on the
# 4-D kernel would also count the p^2 taps in the fan-out: p = 2 halves the scale.
patch_embed_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)
embedding_init = nn.initializers.normal(stddev=0.02)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding [grid^2, hidden] (as MAE and DiT use): half
    the channels encode the row, half the column, each ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = 10000^(-k / (D/4))``."""
    if hidden_size % 4 != 0:
        raise ValueError(f"model.hidden_size={hidden_size} must be divisible by 4")
    quarter = hidden_size // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1)[:, None] * omega[None, :]  # [L, D/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [L, D/2]

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)  # [L, D]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Adaptive LayerNorm modulation ``x * (1 + scale) + shift`` (Sec. 3.2), per example."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    # No affine parameters: adaLN supplies the scale and shift.
    return nn.LayerNorm(1e-6, dtype=dtype, use_bias=False, use_scale=False, name=name)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the six modulation vectors come from a
    zero-initialised linear map of the conditioning, so every block starts as the identity."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        batch, length, width = x.shape  # [B, L, D]
        dense = lambda features, name, init=xavier_init: nn.Dense(
            features, dtype=self.dtype, kernel_init=init, name=name
        )
        modulation = dense(6 * width, "adaLN_modulation", zeros_init)(nn.silu(cond))  # [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            modulation, 6, axis=-1
        )
        h = modulate(_layer_norm(self.dtype, "norm_0")(x), shift_msa, scale_msa)
        qkv = dense(3 * width, "qkv")(h).reshape(batch, length, 3, self.num_heads, -1)
        h = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(batch, length, width)
        x = x + gate_msa[:, None, :] * dense(width, "proj")(h)
        h = modulate(_layer_norm(self.dtype, "norm_1")(x), shift_mlp, scale_mlp)
        h = nn.gelu(dense(int(width * self.mlp_ratio), "mlp_0")(h), approximate=True)
        return x + gate_mlp[:, None, :] * dense(width, "mlp_1")(h)  # [B, L, D]


class DiT(nn.Module):
    """DiT denoiser: ``(x [B, H, W, C], t [B], label [B] | None) -> [B, H, W, out_channels]``."""

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    out_channels: int
    mlp_ratio: float = 4.0
    num_classes: int = 0
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    def _condition(self, t: jax.Array, label: jax.Array | None) -> jax.Array:
        cond = TimeEmbedding(
            FREQUENCY_EMBEDDING_DIM,
            self.hidden_size,
            kind=self.time_embedding,
            fourier_scale=self.fourier_scale,
            dtype=self.dtype,
            kernel_init=embedding_init,
            name="time_embed",
        )(t)  # [B, D]
        if self.num_classes > 0:
            table = nn.Embed(
                self.num_classes + 1,
                self.hidden_size,
                dtype=self.dtype,
                embedding_init=embedding_init,
                name="label_embed",
            )
            cond = cond + table(label)
        return cond

    def _unpatchify(self, tokens: jax.Array, grid: int) -> jax.Array:
        p, channels = self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, channels)  # [B, h, w, p, p, C]
        x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
        return x.reshape(tokens.shape[0], grid * p, grid * p, channels)  # [B, H, W, C]

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, label: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        del train  # DiT has no dropout; label dropout lives in the loss.
        check_label(label, self.num_classes)
        p = self.patch_size
        h = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=patch_embed_init,
            name="patch_embed",
        )(x.astype(self.dtype))  # [B, H/p, W/p, D]
        grid = h.shape[1]
        h = h.reshape(h.shape[0], grid * grid, self.hidden_size)  # [B, L, D]
        h = h + jnp.asarray(sincos_pos_embed_2d(self.hidden_size, grid), self.dtype)[None]
        cond = self._condition(t, label)  # [B, D]
        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            h = block_cls(
                self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, name=f"block_{i}"
            )(h, cond)
        shift, scale = jnp.split(
            nn.Dense(
                2 * self.hidden_size,
                dtype=self.dtype,
                kernel_init=zeros_init,
                name="final_adaLN_modulation",
            )(nn.silu(cond)),
            2,
            axis=-1,
        )
        h = modulate(_layer_norm(self.dtype, "final_norm")(h), shift, scale)
        tokens = nn.Dense(
            p * p * self.out_channels, dtype=self.dtype, kernel_init=zeros_init, name="final_linear"
        )(h)  # [B, L, p*p*out]
        return self._unpatchify(tokens, grid).astype(jnp.float32)
