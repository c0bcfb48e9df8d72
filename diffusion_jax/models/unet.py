"""The U-Net denoiser of DDPM (Ho et al. 2020, Appendix B) and its Improved-DDPM / ADM
extensions (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, Sec. 3).

Layout (as Ho et al.'s TF code and guided-diffusion): a 3x3 input convolution; per
resolution ``num_res_blocks`` residual blocks (each followed by self-attention at the
resolutions in ``attn_resolutions``) and a 2x downsampling; a middle ResBlock-Attention-
ResBlock; on the way up ``num_res_blocks + 1`` blocks per resolution, each fed the
concatenation with the matching skip activation, and a 2x upsampling; GroupNorm, SiLU and a
zero-initialised 3x3 output convolution. The network knows nothing of diffusion: it maps
``(x_t, t[, label])`` to ``out_channels`` channels. The stride-2 downsampling convolution
pads as ``downsample_padding`` says: "same" only the bottom and right (Ho et al.'s TF "SAME",
score_sde's DDPM, diffusers' ``downsample_padding=0``), "symmetric" one pixel on every side
(guided-diffusion, Improved DDPM / ADM).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import attention
from diffusion_jax.models.dropout import dropout
from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.layers import (
    Dtype,
    TimeEmbedding,
    check_label,
    default_init,
    downsample_avg,
    upsample_nearest,
    zeros_init,
)
from diffusion_jax.models.linear import Conv, Dense


def _conv(
    features: int,
    kernel: int,
    dtype: Dtype,
    *,
    strides: int = 1,
    padding: int | None = None,
    zero: bool = False,
    winograd: str = "none",
    name: str | None = None,
) -> Conv:
    return Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=kernel // 2 if padding is None else padding,
        dtype=dtype,
        kernel_init=zeros_init if zero else default_init,
        winograd=winograd,
        name=name,
    )


class ResBlock(nn.Module):
    """Residual block with time conditioning (Ho et al. 2020; Nichol & Dhariwal 2021, Sec. 3).

    The embedding is added to the features, or, with ``use_scale_shift_norm``, modulates them
    as ``GroupNorm(h) * (1 + scale) + shift`` (FiLM, Perez et al. 2018). ``resample`` "up" or
    "down" makes it a BigGAN-style resampling block (Brock et al. 2019; Dhariwal & Nichol 2021).
    The last convolution is zero-initialised, so the block starts as the identity map.
    ``winograd`` makes its 3x3 convolutions use Winograd's algorithm (`linear.Conv`'s modes).
    Given a ``dropout_key`` (training), dropout is applied before the last convolution, with
    the counters of stream ``dropout_stream`` (`dropout.random_bits`).
    """

    out_channels: int
    dropout: float
    use_scale_shift_norm: bool
    norm_groups: int
    dropout_stream: int = 0
    resample: str = "none"
    dtype: Dtype = jnp.float32
    winograd: str = "none"

    @nn.compact
    def __call__(
        self, x: jax.Array, emb: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        norm = lambda name: GroupNorm(self.norm_groups, dtype=self.dtype, name=name)
        h = nn.silu(norm("norm_0")(x))  # [B, H, W, C_in]
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        conv3x3 = lambda zero, name: _conv(
            self.out_channels, 3, self.dtype, zero=zero, winograd=self.winograd, name=name
        )
        h = conv3x3(False, "conv_0")(h)  # [B, H, W, C_out]
        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = Dense(emb_width, dtype=self.dtype, kernel_init=default_init, name="emb")(
            nn.silu(emb)
        )[:, None, None, :]  # [B, 1, 1, emb_width]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = nn.silu(norm("norm_1")(h) * (1.0 + scale) + shift)
        else:
            h = nn.silu(norm("norm_1")(h + emb_out))
        if dropout_key is not None:
            h = dropout(h, self.dropout, dropout_key, self.dropout_stream)
        h = conv3x3(True, "conv_1")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, name="skip")(x)  # Ho et al.'s NIN
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    ``head_channels > 0`` fixes the head width (ADM); otherwise ``num_heads`` heads are used.
    The output projection is zero-initialised (Ho et al.'s ``proj_out``).
    """

    num_heads: int
    head_channels: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        heads = channels // self.head_channels if self.head_channels > 0 else self.num_heads
        h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x)
        h = h.reshape(batch, height * width, channels)  # [B, L, C]
        qkv = Dense(3 * channels, dtype=self.dtype, kernel_init=default_init, name="qkv")(h)
        qkv = qkv.reshape(batch, height * width, 3, heads, channels // heads)  # [B, L, 3, N, D]
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, L, N, D]
        out = out.reshape(batch, height, width, channels)
        out = Dense(channels, dtype=self.dtype, kernel_init=zeros_init, name="proj_out")(out)
        return x + out


class _ForwardPass(NamedTuple):
    """What every block of one U-Net pass shares: whether it trains, the conditioning
    embedding, and the one dropout key (None: no dropout) with each block's own stream."""

    train: bool
    emb: jax.Array
    dropout_key: jax.Array | None
    dropout_streams: Iterator[int]


class UNet(nn.Module):
    """U-Net denoiser: ``(x [B, H, W, C_in], t [B], label [B] | None) -> [B, H, W, out]``.

    ``out_channels`` is the final count (already doubled for learned variance). With
    ``num_classes > 0`` the label embedding table has ``num_classes + 1`` rows, the last one
    the "null" class used for classifier-free guidance (Ho & Salimans 2022).
    ``conv_algorithm="winograd"`` computes the 3x3 convolutions by Winograd's F(m x m, 3x3)
    (`winograd`; m = 4 or 2 by `winograd.output_tile`), faster on CPUs: with ``train=True``
    in the form with a fast gradient (reverse mode only), with ``train=False`` in the form
    that forward mode differentiates too.
    In training, the ResBlocks' dropout takes one key (the "dropout" RNG) for the whole network
    and a stream of counters per block (`dropout`).
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    out_channels: int
    num_heads: int = 1
    head_channels: int = -1
    dropout: float = 0.0
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    conv_resample: bool = True
    downsample_padding: str = "symmetric"  # "same" | "symmetric" (the module docstring)
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    norm_groups: int = 32
    num_classes: int = 0
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_algorithm: str = "direct"

    def _winograd(self, train: bool) -> str:
        """`linear.Conv`'s Winograd mode for a training or an inference pass."""
        if self.conv_algorithm != "winograd":
            return "none"
        return "training" if train else "inference"

    def _conv3x3(self, features: int, train: bool, name: str, **kwargs) -> Conv:
        return _conv(features, 3, self.dtype, winograd=self._winograd(train), name=name, **kwargs)

    def _res_block(self, h, run: _ForwardPass, out_channels: int, resample: str, name: str):
        """``h`` through a new ResBlock ``name``, which takes the pass's next dropout stream."""
        block = nn.remat(ResBlock) if self.remat else ResBlock
        return block(
            out_channels,
            self.dropout,
            self.use_scale_shift_norm,
            self.norm_groups,
            dropout_stream=next(run.dropout_streams),
            resample=resample,
            dtype=self.dtype,
            winograd=self._winograd(run.train),
            name=name,
        )(h, run.emb, run.dropout_key)

    def _attn_block(self, name: str) -> nn.Module:
        block = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        return block(self.num_heads, self.head_channels, self.norm_groups, self.dtype, name=name)

    def _resample(self, h: jax.Array, run: _ForwardPass, direction: str, name: str):
        """2x down/upsampling: a BigGAN residual block, a convolution, or pooling/nearest."""
        if self.resblock_updown:
            return self._res_block(h, run, h.shape[-1], direction, name)
        if direction == "up":
            h = upsample_nearest(h)
            return self._conv3x3(h.shape[-1], run.train, name)(h) if self.conv_resample else h
        if not self.conv_resample:
            return downsample_avg(h)
        if self.downsample_padding == "same":  # [B, H + 1, W + 1, C]: bottom and right only
            h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv(h.shape[-1], 3, self.dtype, strides=2, padding=0, name=name)(h)
        return _conv(h.shape[-1], 3, self.dtype, strides=2, name=name)(h)

    def _embed(self, t: jax.Array, label: jax.Array | None) -> jax.Array:
        emb = TimeEmbedding(
            self.ch,
            4 * self.ch,
            kind=self.time_embedding,
            fourier_scale=self.fourier_scale,
            dtype=self.dtype,
            name="time_embed",
        )(t)  # [B, 4 ch]
        if self.num_classes > 0:
            emb = emb + nn.Embed(
                self.num_classes + 1, 4 * self.ch, dtype=self.dtype, name="label_embed"
            )(label)
        return emb

    def _encode(self, h, run: _ForwardPass) -> tuple[jax.Array, list[jax.Array]]:
        skips = [h]
        resolution = h.shape[1]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self._res_block(h, run, self.ch * mult, "none", f"down_{level}_res_{i}")
                if resolution in self.attn_resolutions:
                    h = self._attn_block(f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != len(self.ch_mult) - 1:
                h = self._resample(h, run, "down", f"down_{level}_downsample")
                resolution //= 2
                skips.append(h)
        return h, skips

    def _decode(self, h, skips, run: _ForwardPass) -> jax.Array:
        resolution = h.shape[1]
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                out_channels = self.ch * self.ch_mult[level]
                h = self._res_block(h, run, out_channels, "none", f"up_{level}_res_{i}")
                if resolution in self.attn_resolutions:
                    h = self._attn_block(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = self._resample(h, run, "up", f"up_{level}_upsample")
                resolution *= 2
        return h

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, label: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        check_label(label, self.num_classes)
        emb = self._embed(t, label)  # [B, 4 ch]
        h = self._conv3x3(self.ch, train, "conv_in")(x.astype(self.dtype))  # [B, H, W, ch]
        dropout_key = self.make_rng("dropout") if train and self.dropout > 0 else None
        run = _ForwardPass(train, emb, dropout_key, itertools.count())
        h, skips = self._encode(h, run)
        h = self._res_block(h, run, h.shape[-1], "none", "mid_res_0")
        h = self._attn_block("mid_attn")(h)
        h = self._res_block(h, run, h.shape[-1], "none", "mid_res_1")
        h = self._decode(h, skips, run)
        h = nn.silu(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        out = self._conv3x3(self.out_channels, train, "conv_out", zero=True)(h)
        return out.astype(jnp.float32)  # [B, H, W, out_channels]
