"""Exact optimal predictions for Gaussian data x_0 ~ N(mean, std^2 I), in closed form.

For x_t = alpha x_0 + sigma eps the pair (x_0, x_t) is jointly Gaussian, so
E[x_0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean), and
Var(x_0 | x_t) = std^2 sigma^2 / (alpha^2 std^2 + sigma^2).
"""

import jax.numpy as jnp


def optimal_x0(x_t, alpha, sigma, *, mean: float, std: float):
    gain = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    return mean + gain * (x_t - alpha * mean)


def optimal_eps(x_t, alpha, sigma, *, mean: float, std: float):
    return (x_t - alpha * optimal_x0(x_t, alpha, sigma, mean=mean, std=std)) / sigma


def posterior_variance_of_x0(alpha, sigma, *, std: float):
    return std**2 * sigma**2 / (alpha**2 * std**2 + sigma**2)


def gaussian_nll_nats(std: float) -> float:
    """E[-log N(x; mean, std^2)] per dimension: the differential entropy."""
    return float(0.5 * jnp.log(2 * jnp.pi * jnp.e * std**2))
