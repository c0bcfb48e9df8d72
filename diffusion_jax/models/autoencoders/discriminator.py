"""The PatchGAN discriminator of the autoencoder's adversarial loss (Isola et al. 2017,
Sec. 3.2; Esser et al. 2021, Sec. 3.2), as LDM's `NLayerDiscriminator`.

A 4x4 stride-2 convolution and LeakyReLU(0.2); ``num_layers - 1`` more stride-2 4x4
convolutions with doubling widths (at most 8 x ``channels``), each followed by batch
normalisation and LeakyReLU; one stride-1 4x4 block; a stride-1 4x4 convolution to one
logit per patch. Batch normalisation always uses the batch's statistics (the discriminator
only ever runs in training mode, as in LDM), so it has no running averages to carry; under
`jax.jit` on a mesh the statistics are those of the global batch. Weights start as LDM's
`weights_init`: N(0, 0.02) convolutions, N(1, 0.02) normalisation scales.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import Dtype
from diffusion_jax.models.linear import Conv

BATCH_NORM_EPS = 1e-5


class BatchStatisticsNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, with the batch's mean and variance over
    batch and positions (PyTorch's BatchNorm2d in training mode)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", lambda key, s: 1.0 + 0.02 * jax.random.normal(key, s),
                           (channels,))  # fmt: skip
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=(0, 1, 2))
        var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))
        return ((x32 - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * scale + bias).astype(x.dtype)


class PatchDiscriminator(nn.Module):
    """Images [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1] (module docstring)."""

    channels: int = 64
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        conv = lambda features, strides, name: Conv(
            features, (4, 4), (strides, strides), 1, dtype=self.dtype, kernel_init=init, name=name
        )
        leaky = lambda h: nn.leaky_relu(h, 0.2)
        h = leaky(conv(self.channels, 2, "conv_0")(x))
        for n in range(1, self.num_layers + 1):
            strides = 2 if n < self.num_layers else 1
            h = conv(self.channels * min(2**n, 8), strides, f"conv_{n}")(h)
            h = leaky(BatchStatisticsNorm(name=f"norm_{n}")(h))
        return conv(1, 1, f"conv_{self.num_layers + 1}")(h).astype(jnp.float32)
