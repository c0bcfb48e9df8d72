"""Tests of models/autoencoders/posterior.py against SciPy's normal distribution."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from diffusion_jax.models.autoencoders import DiagonalGaussian


def _posterior(seed=0, shape=(3, 2, 2, 4)):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=shape).astype(np.float32)
    logvar = rng.uniform(-2, 1, size=shape).astype(np.float32)
    return DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1)), mean, logvar


def test_moments_split_into_mean_and_a_clipped_log_variance():
    moments = jnp.concatenate([jnp.ones((1, 1, 1, 2)), jnp.array([[[[-50.0, 30.0]]]])], -1)
    posterior = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(posterior.mean, 1.0)
    np.testing.assert_array_equal(posterior.logvar, [[[[-30.0, 20.0]]]])
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)


def test_kl_to_the_standard_normal_is_the_closed_form_summed_per_example():
    posterior, mean, logvar = _posterior()
    std = np.exp(0.5 * logvar)
    # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2, per element
    expected = (np.log(1 / std) + (std**2 + mean**2) / 2 - 0.5).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.kl(), expected, rtol=1e-5)


def test_nll_is_the_negative_log_density_of_the_normal():
    posterior, mean, logvar = _posterior(1)
    z = np.random.default_rng(2).normal(size=mean.shape).astype(np.float32)
    expected = -stats.norm.logpdf(z, mean, np.exp(0.5 * logvar)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.nll(z), expected, rtol=1e-5)


def test_samples_have_the_posterior_mean_and_variance():
    posterior, mean, logvar = _posterior(3, shape=(1, 1, 1, 4))
    keys = jax.random.split(jax.random.key(0), 20000)
    samples = jax.vmap(posterior.sample)(keys)[:, 0, 0, 0]  # [N, 4]
    n = samples.shape[0]
    std = np.exp(0.5 * logvar[0, 0, 0])
    # the sample mean within 5 standard errors, the variance within 5% (N = 20000)
    assert np.all(np.abs(samples.mean(0) - mean[0, 0, 0]) < 5 * std / np.sqrt(n))
    np.testing.assert_allclose(samples.var(0), std**2, rtol=0.05)
