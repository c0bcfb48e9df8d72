"""LPIPS, the learned perceptual image distance of Zhang et al. 2018 ("The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", Eq. 1), on VGG16 features: the
version 0.1 "vgg" network of the `lpips` package, the perceptual loss of latent diffusion's
autoencoder (Rombach et al. 2022, App. G; `latent.autoencoder_loss`).

    params = lpips_weights.load_lpips("lpips_vgg.npz")   # never downloaded
    d = lpips_distance(params, x0, x1)                    # [B, H, W, C] in [-1, 1] -> [B]

For images x0, x1, with features y^l of VGG16 tap l (relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3), each unit-normalised over its channels at every location, and the learned
non-negative weights w_l of a 1x1 convolution without bias:

    d(x0, x1) = sum_l mean_{h, w} sum_c w_lc (y0^l_hwc - y1^l_hwc)^2

The inputs pass LPIPS v0.1's scaling layer first, (x - shift) / scale per RGB channel; a
grey image (1 channel) is read as RGB with three equal channels, as the `lpips` package's
broadcasting reads it. The distance is differentiable in both images: it is a loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's vgg16 `features` up to relu5_3: (channels, convolutions) of each block, a
# 2x2 max-pool before blocks 2-5. The last ReLU of each block is a tap.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = tuple(channels for channels, _ in VGG16_BLOCKS)
# LPIPS v0.1's ScalingLayer: ImageNet's mean and std in [-1, 1] coordinates.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor's
MIN_SIZE = 16  # four 2x2 max-pools leave relu5_3 at least 1 x 1


def conv_names() -> tuple[str, ...]:
    """("conv1_1", "conv1_2", "conv2_1", ..., "conv5_3"): the 13 convolutions, in order."""
    return tuple(
        f"conv{block}_{layer}"
        for block, (_, layers) in enumerate(VGG16_BLOCKS, start=1)
        for layer in range(1, layers + 1)
    )


class VGG16Features(nn.Module):
    """torchvision's VGG16 convolutions (3x3, padding 1, ReLU) up to relu5_3, returning the
    five taps of `TAPS`; max-pools 2x2 (stride 2, odd sizes floored) between blocks."""

    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []  # [B, H / 2^k, W / 2^k, TAP_CHANNELS[k]] for k = 0..4
        for block, (channels, layers) in enumerate(VGG16_BLOCKS, start=1):
            if block > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for layer in range(1, layers + 1):
                conv = nn.Conv(
                    channels, (3, 3), padding=1, precision=self.precision,
                    name=f"conv{block}_{layer}",
                )  # fmt: skip
                x = nn.relu(conv(x))
            taps.append(x)
        return tuple(taps)


def scale_inputs(x: jax.Array) -> jax.Array:
    """[B, H, W, 1 or 3] in [-1, 1] -> [B, H, W, 3], (x - shift) / scale (LPIPS v0.1)."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"LPIPS takes images [B, H, W, C] with C = 3 (RGB) or 1 (grey); got {x.shape}"
        )
    x = jnp.broadcast_to(x, (*x.shape[:-1], 3))
    return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def unit_normalize(features: jax.Array) -> jax.Array:
    """features / (|features|_2 + 1e-10) over the channels (last axis), as lpips'
    `normalize_tensor`. Where a location's features are all 0 the result is 0 and the
    gradient finite (the square root's infinite slope at 0 is kept out of the graph)."""
    squared = jnp.sum(jnp.square(features), axis=-1, keepdims=True)  # [..., 1]
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return features / (norm + NORM_EPS)


def lpips_distance(
    params: Mapping, x0: jax.Array, x1: jax.Array, *, precision: jax.lax.Precision | None = None
) -> jax.Array:
    """LPIPS (Zhang et al. 2018, Eq. 1; module docstring) of each pair: [B, H, W, C] twice,
    in [-1, 1] -> [B]. `params` = {"vgg": VGG16Features params, "lin": {tap: [C_tap]}}."""
    if x0.shape != x1.shape:
        raise ValueError(f"LPIPS compares images of one shape; got {x0.shape} and {x1.shape}")
    if x0.ndim == 4 and min(x0.shape[1:3]) < MIN_SIZE:
        raise ValueError(
            f"LPIPS's VGG16 needs images of {MIN_SIZE} x {MIN_SIZE} or more; got {x0.shape}"
        )
    # One pass over both batches. A convolution's rounding may depend on an image's place
    # in the batch (and on XLA's fusions), so LPIPS(x, x) is 0 to about 1e-15, not exactly.
    both = scale_inputs(jnp.concatenate([x0, x1]).astype(jnp.float32))  # [2B, H, W, 3]
    taps = VGG16Features(precision).apply({"params": params["vgg"]}, both)
    total = jnp.zeros(x0.shape[0], jnp.float32)  # [B]
    for name, tap in zip(TAPS, taps):
        y0, y1 = jnp.split(unit_normalize(tap), 2)  # [B, h, w, C] each
        weighted = jnp.einsum("bhwc,c->bhw", jnp.square(y0 - y1), params["lin"][name])
        total = total + jnp.mean(weighted, axis=(1, 2))
    return total
