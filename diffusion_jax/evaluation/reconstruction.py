"""How close reconstructions are to their inputs: PSNR and SSIM per image.

Images are [B, H, W, C] floats in [-1, 1] (a dynamic range of 2); reconstructions are
clipped to it first. SSIM is Wang et al. (2004), Eq. 13, with their Gaussian window
(11 x 11, sigma 1.5), K1 = 0.01, K2 = 0.03 and population (co)variances, averaged over the
positions where the window fits inside the image and over channels: scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the window of scikit-image's Gaussian filter
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio per image [B] in dB: 10 log10(range^2 / MSE)."""
    mse = jnp.mean(jnp.square(x - jnp.clip(x_hat, -1, 1)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(DATA_RANGE**2 / jnp.maximum(mse, 1e-12))


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
    weights = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _local_mean(x: jax.Array) -> jax.Array:
    """The Gaussian-weighted mean around each position where the window fits, per channel:
    [B, H, W, C] -> [B, H - 10, W - 10, C] (two 1-D 'valid' convolutions)."""
    window = jnp.asarray(_gaussian_window())
    channels = x.shape[-1]
    kernel_rows = jnp.tile(window[:, None, None, None], (1, 1, 1, channels))
    kernel_cols = jnp.tile(window[None, :, None, None], (1, 1, 1, channels))
    conv = lambda y, k: jax.lax.conv_general_dilated(
        y, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return conv(conv(x, kernel_rows), kernel_cols)


def ssim(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Structural similarity per image [B] (module docstring)."""
    if min(x.shape[1:3]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than 11 x 11; these are {x.shape[1:3]}")
    x = x.astype(jnp.float32)
    y = jnp.clip(x_hat, -1, 1).astype(jnp.float32)
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x = _local_mean(x * x) - mu_x**2
    var_y = _local_mean(y * y) - mu_y**2
    cov = _local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return jnp.mean(ssim_map, axis=(1, 2, 3))
