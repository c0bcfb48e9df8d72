"""The blocks of the conditional U-Net (Ronneberger et al. 2015's encoder-decoder with skip
connections, Ho et al. 2020's time-conditioned ResNet blocks, Rombach et al. 2022's spatial
transformers), as diffusers' `unet_2d_blocks`: `DownBlock2D`, `CrossAttnDownBlock2D`,
`UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`.

Each block takes the config and its level (index into block_out_channels, in down order; up
block i of diffusers is level ``num_levels - 1 - i``). Down blocks return their output and
the skip states (every layer's output, then the downsampled one); an up block consumes
``layers_per_block + 1`` of them from the last, concatenating each to its input's channels.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.conditional_unet.config import UNetConditionConfig
from diffusion_jax.models.conditional_unet.transformer import Transformer2DModel
from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.layers import Dtype, default_init, upsample_nearest, zeros_init
from diffusion_jax.models.linear import Conv, Dense


def group_norm(config: UNetConditionConfig, dtype: Dtype, name: str) -> GroupNorm:
    """GroupNorm(norm_num_groups, norm_eps) with PyTorch's two-pass variance."""
    return GroupNorm(config.norm_num_groups, config.norm_eps, dtype, centered=True, name=name)


def conv3x3(features: int, dtype: Dtype, name: str, *, strides: int = 1, init=default_init):
    return Conv(features, (3, 3), (strides, strides), 1, dtype, kernel_init=init, name=name)


class ResnetBlock2D(nn.Module):
    """(x + conv2(SiLU(GN(conv1(SiLU(GN(x))) + time_emb_proj(SiLU(temb)))))) / scale, a 1x1
    conv_shortcut on x when the width changes (Ho et al. 2020, App. B): x [B, H, W, C_in],
    temb [B, T] -> [B, H, W, out_channels]. conv2 starts at zero (LDM's zero_module)."""

    config: UNetConditionConfig
    out_channels: int
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = nn.silu(group_norm(self.config, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        time = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + time[:, None, None, :]
        h = nn.silu(group_norm(self.config, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2", init=zeros_init)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2, padded by 1: [B, H, W, C] -> [B, ceil(H/2), ...]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3x3(x.shape[-1], self.dtype, "conv", strides=2)(x)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, *size, C] by PyTorch's ``interpolate(mode="nearest", size=...)``:
    output row i reads input row min(floor(i * (H / size[0])), H - 1), in float32."""
    for axis, (before, after) in enumerate(zip(x.shape[1:3], size), start=1):
        scale = np.float32(before) / np.float32(after)
        index = np.floor(np.arange(after, dtype=np.float32) * scale).astype(np.int64)
        x = jnp.take(x, np.minimum(index, before - 1), axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest upsampling to 2x, or to `output_size` (odd shapes, as diffusers' U-Net passes
    the skip state's size), then a 3x3 convolution: [B, H, W, C] -> [B, 2H, 2W, C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        doubled = (2 * x.shape[1], 2 * x.shape[2])
        if output_size is None or tuple(output_size) == doubled:
            x = upsample_nearest(x)
        else:
            x = resize_nearest(x, tuple(output_size))
        return conv3x3(x.shape[-1], self.dtype, "conv")(x)


class _LevelBlock(nn.Module):
    """What the blocks share: the config, the level, the attention options, the dtype."""

    config: UNetConditionConfig
    level: int
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    has_cross_attention: ClassVar[bool] = False

    @property
    def channels(self) -> int:
        return self.config.block_out_channels[self.level]

    def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.config, self.channels, scale, self.dtype, name=name)

    def transformer(self, name: str) -> Transformer2DModel:
        config, level = self.config, self.level
        return Transformer2DModel(
            heads=config.heads[level],
            head_dim=config.head_dims[level],
            num_layers=config.per_level("transformer_layers_per_block")[level],
            norm_num_groups=config.norm_num_groups,
            use_linear_projection=config.use_linear_projection,
            upcast=config.upcast_attention,
            query_chunk_size=self.query_chunk_size,
            dtype=self.dtype,
            name=name,
        )


class DownBlock2D(_LevelBlock):
    """layers_per_block ResNet blocks (each followed by a spatial transformer in
    `CrossAttnDownBlock2D`), then a downsampling but at the last level.

    x [B, H, W, C] -> (x [B, H', W', channels], skip states)."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array):
        skips = []
        for i in range(self.config.per_level("layers_per_block")[self.level]):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.level != self.config.num_levels - 1:
            x = Downsample2D(self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
    has_cross_attention: ClassVar[bool] = True


class UpBlock2D(_LevelBlock):
    """layers_per_block + 1 ResNet blocks on [x, skip] concatenated (each followed by a
    spatial transformer in `CrossAttnUpBlock2D`), the last skip state first; then an
    upsampling (to `output_size`) but at level 0.

    x [B, h, w, C], skips (this block's, in down order) -> [B, H, W, channels]."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        output_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)  # [B, h, w, C + C_skip]
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.level != 0:
            x = Upsample2D(self.dtype, name="upsamplers_0")(x, output_size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    has_cross_attention: ClassVar[bool] = True


class UNetMidBlock2DCrossAttn(_LevelBlock):
    """ResNet block, spatial transformer, ResNet block at the lowest resolution, the ResNets
    scaled by 1 / mid_block_scale_factor: [B, h, w, C] -> [B, h, w, C]."""

    has_cross_attention: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        scale = self.config.mid_block_scale_factor
        x = self.resnet("resnets_0", scale)(x, temb)
        x = self.transformer("attentions_0")(x, context)
        return self.resnet("resnets_1", scale)(x, temb)


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
