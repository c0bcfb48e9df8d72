"""Tests of evaluation/reconstruction.py: PSNR's closed form and SSIM equal to
scikit-image's `structural_similarity` with the Gaussian window of Wang et al."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import reconstruction


def test_psnr_of_a_constant_error_is_its_closed_form():
    x = jnp.zeros((2, 8, 8, 1))
    np.testing.assert_allclose(reconstruction.psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-5)


def test_ssim_of_an_image_with_itself_is_one():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(reconstruction.ssim(x, x), 1.0, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_equals_scikit_image(channels):
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    x = np.clip(np.cumsum(rng.normal(0, 0.2, (2, 24, 20, channels)), axis=1), -1, 1)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1)
    ours = reconstruction.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    for i in range(2):
        theirs = metrics.structural_similarity(
            x[i], y[i], data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        np.testing.assert_allclose(ours[i], theirs, rtol=1e-4)
