"""Convolution and dense layers with `reductions.add_bias`: the parameters (``kernel``,
``bias``), initialisation and outputs of ``flax.linen.Conv`` / ``flax.linen.Dense``, with
a bias gradient that XLA:CPU computes as a multi-threaded matrix-vector product instead of a
single-threaded reduction over batch and space (`reductions`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import winograd
from diffusion_jax.models.layers import Dtype, default_init
from diffusion_jax.models.reductions import add_bias

Initializer = Any
WINOGRAD_MODES = ("none", "inference", "training")


class Conv(nn.Module):
    """2-D convolution of ``[B, H, W, C_in]`` with a ``[k, k, C_in, features]`` kernel,
    symmetric zero padding of ``padding`` on each side, plus a bias.

    ``winograd`` computes the 3x3, stride-1 convolutions where it pays by Winograd's
    F(m x m, 3x3) (m from `winograd.output_tile`), same parameters, same result up to float32
    rounding (CPUs):
    "inference" by `winograd.conv3x3` (differentiable in forward and reverse mode),
    "training" by `winograd.conv3x3_for_training` (a faster gradient, reverse mode only);
    "none" always by XLA's convolution.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: int = 0
    dtype: Dtype | None = None
    kernel_init: Initializer = default_init
    winograd: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or jnp.result_type(x, kernel)
        if self.winograd not in WINOGRAD_MODES:
            raise ValueError(f"Conv winograd={self.winograd!r}; allowed: {WINOGRAD_MODES}")
        training = self.winograd == "training"
        tile = 0  # F(tile x tile, 3x3), or 0: XLA's convolution
        if self.winograd != "none":
            tile = winograd.output_tile(
                self.kernel_size, self.strides, self.padding, dtype, *x.shape[:3], training=training
            )
        if tile:
            x, kernel = x.astype(dtype), kernel.astype(dtype)
            if training:
                y = winograd.conv3x3_for_training(x, kernel, tile)
            else:
                y = winograd.conv3x3(x, winograd.transform_kernel(kernel, tile))
            return add_bias(y, bias.astype(dtype))
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            window_strides=tuple(self.strides),
            padding=[(self.padding, self.padding)] * len(self.kernel_size),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return add_bias(y, bias.astype(dtype))  # [B, H / stride, W / stride, features]


class Dense(nn.Module):
    """``x [..., C_in] @ kernel [C_in, features] + bias``."""

    features: int
    dtype: Dtype | None = None
    kernel_init: Initializer = default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        return add_bias(y, bias.astype(dtype))  # [..., features]
