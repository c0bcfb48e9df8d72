"""The analytic mixture itself: its draws, density and score agree with each other."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import gaussian_mixture


def test_sample_follows_the_weights_means_and_variances():
    mixture = gaussian_mixture.example_mixture()
    x, components = mixture.sample(jax.random.key(0), 40000)
    counts = np.bincount(np.asarray(components), minlength=mixture.num_components) / 40000
    weights = np.asarray(mixture.weights)
    assert np.all(np.abs(counts - weights) < 5 * np.sqrt(weights * (1 - weights) / 40000))
    for k in range(mixture.num_components):
        members = np.asarray(x)[np.asarray(components) == k]
        np.testing.assert_allclose(members.mean(0), mixture.means[k], atol=0.02)
        np.testing.assert_allclose(members.var(0), mixture.variances[k], rtol=0.05)


def test_score_is_the_gradient_of_the_noised_log_density():
    mixture = gaussian_mixture.example_mixture()
    x = jax.random.normal(jax.random.key(1), (16, 2))
    alpha, sigma = jnp.float32(0.8), jnp.float32(0.6)
    score, _ = mixture.score_and_denoiser(x, alpha, sigma)
    gradient = jax.vmap(jax.grad(lambda xi: mixture.log_prob(xi[None], alpha, sigma)[0]))(x)
    np.testing.assert_allclose(score, gradient, rtol=1e-4, atol=1e-4)
