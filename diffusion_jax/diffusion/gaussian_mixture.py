"""A Gaussian mixture with diagonal covariances: a data distribution with exact answers.

If x_0 ~ sum_k w_k N(mu_k, diag(v_k)) and x_t = alpha x_0 + sigma eps, then x_t is the mixture
sum_k w_k N(alpha mu_k, diag(alpha^2 v_k + sigma^2)), so the score, the optimal denoiser
E[x_0 | x_t] and the optimal eps = -sigma * score are closed forms. `exact_model_fn` turns them
into a model function `(x, t, cond) -> prediction` that every sampler accepts; conditioned on a
label k it is the model of component k alone, and the null label K gives the whole mixture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import parameterization


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    weights: jnp.ndarray  # [K], summing to 1
    means: jnp.ndarray  # [K, D]
    variances: jnp.ndarray  # [K, D], diagonal covariances

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def sample(self, rng: jax.Array, num_samples: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """num_samples draws x [N, D] and their components [N]."""
        component_key, normal_key = jax.random.split(rng)
        components = jax.random.categorical(
            component_key, jnp.log(self.weights), shape=(num_samples,)
        )
        normal = jax.random.normal(normal_key, (num_samples, self.means.shape[1]))
        return self.means[components] + jnp.sqrt(self.variances[components]) * normal, components

    def _noised_terms(self, x, alpha, sigma, log_weights):
        """Per-component log densities of x_t [B, K] and the pieces of the posterior."""
        alpha = jnp.reshape(alpha, (-1, 1, 1))  # [B or 1, 1, 1]
        sigma = jnp.reshape(sigma, (-1, 1, 1))
        variances = alpha**2 * self.variances + sigma**2  # [B, K, D]
        residual = x[:, None, :] - alpha * self.means  # [B, K, D]
        log_normal = -0.5 * jnp.sum(
            residual**2 / variances + jnp.log(2 * jnp.pi * variances), axis=-1
        )
        return log_weights + log_normal, residual, variances, alpha

    def log_prob(self, x, alpha=1.0, sigma=0.0, log_weights=None):
        """log p(x_t) [B] of the noised mixture at (alpha, sigma)."""
        log_weights = jnp.log(self.weights) if log_weights is None else log_weights
        log_joint, _, _, _ = self._noised_terms(x, alpha, sigma, log_weights)
        return jax.nn.logsumexp(log_joint, axis=-1)

    def responsibilities(self, x, alpha=1.0, sigma=0.0, log_weights=None):
        """p(k | x_t) [B, K]."""
        log_weights = jnp.log(self.weights) if log_weights is None else log_weights
        log_joint, _, _, _ = self._noised_terms(x, alpha, sigma, log_weights)
        return jax.nn.softmax(log_joint, axis=-1)

    def score_and_denoiser(self, x, alpha, sigma, log_weights=None):
        """(grad log p(x_t), E[x_0 | x_t]), each [B, D], at (alpha, sigma) scalars or [B]."""
        log_weights = jnp.log(self.weights) if log_weights is None else log_weights
        log_joint, residual, variances, alpha_b = self._noised_terms(x, alpha, sigma, log_weights)
        posterior = jax.nn.softmax(log_joint, axis=-1)[..., None]  # [B, K, 1]
        score = jnp.sum(posterior * (-residual / variances), axis=1)
        gain = alpha_b * self.variances / variances  # Wiener filter per component
        denoised = jnp.sum(posterior * (self.means + gain * residual), axis=1)
        return score, denoised


def exact_prediction(mixture, x, alpha, sigma, prediction, log_weights=None):
    """The optimal output of kind `prediction` at x_t [B, D]; alpha, sigma [B]."""
    score, x0 = mixture.score_and_denoiser(x, alpha, sigma, log_weights)
    eps = -sigma[:, None] * score
    return parameterization.from_x0_eps(x0, eps, alpha[:, None], sigma[:, None], prediction)


def exact_model_fn(
    mixture: GaussianMixture,
    alpha_sigma_fn: Callable[[jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]],
    prediction: str = "eps",
    *,
    variance_output: float | None = None,
) -> Callable:
    """The optimal network `(x, t, cond) -> output` for data drawn from `mixture`.

    alpha_sigma_fn maps the network's time t [B] to (alpha, sigma) [B]. cond is None, or labels
    [B] in [0, K]: label k < K conditions on component k, label K (null) on the whole mixture.
    With `variance_output` the output gets D more channels of that constant (a learned-variance
    head; for learned_range, -1 is the fixed-small and 1 the fixed-large variance).
    """

    def model_fn(x, t, cond=None):
        alpha, sigma = alpha_sigma_fn(t)
        log_weights = jnp.log(mixture.weights)
        if cond is not None:
            components = jnp.arange(mixture.num_components)
            single = jnp.where(components == cond[:, None], 0.0, -jnp.inf)  # [B, K]
            is_null = (cond == mixture.num_components)[:, None]
            log_weights = jnp.where(is_null, log_weights, single)
        output = exact_prediction(mixture, x, alpha, sigma, prediction, log_weights)
        if variance_output is not None:
            output = jnp.concatenate([output, jnp.full_like(output, variance_output)], axis=-1)
        return output

    return model_fn


def component_statistics(mixture: GaussianMixture, x: jnp.ndarray):
    """(weights [K], means [K, D], covariances [K, D, D], counts [K]) of samples x [N, D].

    Each sample goes to its most probable component under the clean mixture.
    """
    assignment = jnp.argmax(mixture.responsibilities(x), axis=-1)
    one_hot = jax.nn.one_hot(assignment, mixture.num_components)  # [N, K]
    counts = one_hot.sum(axis=0)
    means = (one_hot.T @ x) / counts[:, None]
    centered = x[:, None, :] - means[None]  # [N, K, D]
    covariances = jnp.einsum("nk,nkd,nke->kde", one_hot, centered, centered)
    covariances = covariances / (counts[:, None, None] - 1)
    return counts / x.shape[0], means, covariances, counts


def example_mixture(dtype=jnp.float32) -> GaussianMixture:
    """Three well-separated 2-D components of unequal weights and shapes, inside [-1.5, 1.5]."""
    return GaussianMixture(
        weights=jnp.asarray([0.5, 0.3, 0.2], dtype),
        means=jnp.asarray([[-1.0, -0.5], [1.0, 0.0], [0.0, 1.2]], dtype),
        variances=jnp.asarray([[0.04, 0.09], [0.09, 0.0225], [0.0225, 0.0225]], dtype),
    )
