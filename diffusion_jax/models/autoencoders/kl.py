"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1; the
"first stage" of Stable Diffusion), layer for layer as diffusers' `AutoencoderKL`.

    model = AutoencoderKL(config)
    moments = model.apply({"params": params}, x, method=model.encode)  # x in [-1, 1] NHWC
    z = DiagonalGaussian.from_moments(moments).sample(rng)
    x_hat = model.apply({"params": params}, z, method=model.decode)

Encoder: 3x3 conv_in; per level a down block of ResNet blocks (GroupNorm, SiLU, 3x3 conv,
twice) and, but at the last level, a stride-2 3x3 convolution padded at the bottom and right;
a middle block ResNet-self-attention-ResNet; GroupNorm, SiLU and a 3x3 conv_out to
2 x latent_channels moments, then the 1x1 quant_conv. Decoder: the 1x1 post_quant_conv, 3x3
conv_in, the middle block, per level (lowest resolution first) layers_per_block + 1 ResNet
blocks and a nearest 2x upsampling with a 3x3 conv, GroupNorm, SiLU, 3x3 conv_out. Every
GroupNorm has eps 1e-6 and PyTorch's two-pass variance. Module names are diffusers'
parameter names with the list indices joined by "_" (``encoder.down_blocks.0.resnets.1.
conv1`` is ``encoder/down_blocks_0/resnets_1/conv1``), so that `convert.diffusers_vae` maps
its weights one to one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import attention
from diffusion_jax.models.autoencoders.config import AutoencoderConfig
from diffusion_jax.models.autoencoders.posterior import DiagonalGaussian
from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.layers import Dtype, upsample_nearest
from diffusion_jax.models.linear import Conv, Dense

NORM_EPS = 1e-6


def _conv(features: int, kernel: int, dtype: Dtype, name: str, *, strides: int = 1, padding=None):
    padding = kernel // 2 if padding is None else padding
    return Conv(features, (kernel, kernel), (strides, strides), padding, dtype=dtype, name=name)


def _norm(groups: int, dtype: Dtype, name: str) -> GroupNorm:
    """GroupNorm with eps 1e-6 and PyTorch's two-pass variance (`group_norm._statistics`)."""
    return GroupNorm(groups, NORM_EPS, dtype=dtype, centered=True, name=name)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip path when the
    width changes (diffusers' `ResnetBlock2D` without time embedding)."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_norm(self.groups, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_norm(self.groups, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """x + attention of the H x W positions of GN(x) over themselves, one head as wide as the
    channels (diffusers' mid-block `Attention`, with biased to_q, to_k, to_v, and to_out_0)."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _norm(self.groups, self.dtype, "group_norm")(x)
        h = h.reshape(batch, height * width, 1, channels)  # [B, HW, 1 head, C]
        dense = lambda name: Dense(channels, dtype=self.dtype, name=name)
        q, k, v = (dense(f"to_{part}")(h) for part in "qkv")
        h = dense("to_out_0")(attention(q, k, v))
        return x + h.reshape(x.shape)


class MidBlock(nn.Module):
    """ResNet block, self-attention (unless ``add_attention`` is False), ResNet block."""

    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution padded by one pixel at the bottom and right only (diffusers'
    `Downsample2D` with padding=0): [B, H, W, C] -> [B, H/2, W/2, C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", strides=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling and a 3x3 convolution: [B, H, W, C] -> [B, 2H, 2W, C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], 3, self.dtype, "conv")(upsample_nearest(x))


class ResnetStack(nn.Module):
    """``num_layers`` ResNet blocks, then an optional resampling: diffusers'
    `DownEncoderBlock2D` (``resample="down"``) and `UpDecoderBlock2D` (``"up"``)."""

    out_channels: int
    num_layers: int
    resample: str | None
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsamplers_0")(x)
        return x


def _output_head(x: jax.Array, features: int, groups: int, dtype: Dtype) -> jax.Array:
    """GroupNorm, SiLU and the 3x3 conv_out (called inside a compact module)."""
    x = nn.silu(_norm(groups, dtype, "conv_norm_out")(x))
    return _conv(features, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 latent_channels]."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config, groups = self.config, self.config.norm_num_groups
        x = _conv(config.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        last = len(config.block_out_channels) - 1
        for level, channels in enumerate(config.block_out_channels):
            resample = "down" if level != last else None
            x = ResnetStack(channels, config.layers_per_block, resample, groups, self.dtype,
                            name=f"down_blocks_{level}")(x)  # fmt: skip
        x = MidBlock(groups, config.mid_block_add_attention, self.dtype, name="mid_block")(x)
        return _output_head(x, 2 * config.latent_channels, groups, self.dtype)


class Decoder(nn.Module):
    """Latent z [B, h, w, latent_channels] -> image [B, f h, f w, out_channels]."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        config, groups = self.config, self.config.norm_num_groups
        reversed_channels = config.block_out_channels[::-1]
        x = _conv(reversed_channels[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(groups, config.mid_block_add_attention, self.dtype, name="mid_block")(x)
        last = len(reversed_channels) - 1
        for level, channels in enumerate(reversed_channels):
            resample = "up" if level != last else None
            x = ResnetStack(channels, config.layers_per_block + 1, resample, groups, self.dtype,
                            name=f"up_blocks_{level}")(x)  # fmt: skip
        return _output_head(x, config.out_channels, groups, self.dtype)


class AutoencoderKL(nn.Module):
    """Encoder, quant_conv, posterior, post_quant_conv, decoder (module docstring).

    ``__call__(x, rng)`` returns the reconstruction of a posterior sample (of its mode when
    ``rng`` is None) and the moments; `encode` and `decode` are the two halves.
    """

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        config = self.config
        self.encoder = Encoder(config, self.dtype)
        self.decoder = Decoder(config, self.dtype)
        if config.use_quant_conv:
            self.quant_conv = _conv(2 * config.latent_channels, 1, self.dtype, "quant_conv")
        if config.use_post_quant_conv:
            self.post_quant_conv = _conv(config.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, x: jax.Array) -> jax.Array:
        """Moments [B, H/f, W/f, 2 L] of q(z | x) (`posterior.DiagonalGaussian`), float32."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments.astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """The image [B, f h, f w, out_channels] of latent z (about [-1, 1]), float32."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None):
        moments = self.encode(x)
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), moments
