"""What a denoiser predicts, and the exact conversions between its parameterizations.

Every process here writes x_t = alpha_t x_0 + sigma_t eps (Kingma et al. 2021, Eq. 1),
with (alpha, sigma) from the schedule. A network can predict
- "eps":      the noise eps (Ho et al. 2020, Eq. 11);
- "x0":       the clean data x_0;
- "v":        v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4 and App. D);
- "score":    grad log p(x_t) = -eps / sigma (Song et al. 2021, Eq. 18 in the Gaussian case);
- "velocity": the flow-matching velocity u = eps - x_0 of x_t = (1 - t) x_0 + t eps
              (Liu et al. 2023; Lipman et al. 2023), written for any (alpha, sigma).
Given x_t, each determines (x_0, eps), so any one converts to any other.
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def check_prediction(prediction: str, *, name: str = "prediction") -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown {name} {prediction!r}; allowed: {list(PREDICTIONS)}")


def to_x0_eps(
    output: jnp.ndarray, x_t: jnp.ndarray, alpha: jnp.ndarray, sigma: jnp.ndarray, prediction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x_0, eps) implied by a prediction of kind `prediction` at x_t = alpha x_0 + sigma eps."""
    check_prediction(prediction)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
    if prediction == "score":
        eps = -sigma * output
        return (x_t - sigma * eps) / alpha, eps
    # velocity u = eps - x0:
    # x_t - sigma u = (alpha + sigma) x0 and x_t + alpha u = (alpha + sigma) eps.
    norm = alpha + sigma
    return (x_t - sigma * output) / norm, (x_t + alpha * output) / norm


def from_x0_eps(
    x0: jnp.ndarray, eps: jnp.ndarray, alpha: jnp.ndarray, sigma: jnp.ndarray, prediction: str
) -> jnp.ndarray:
    """The prediction of kind `prediction` that corresponds to (x_0, eps)."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    return eps - x0


def convert(
    output: jnp.ndarray,
    x_t: jnp.ndarray,
    alpha: jnp.ndarray,
    sigma: jnp.ndarray,
    *,
    source: str,
    target: str,
) -> jnp.ndarray:
    """Convert a `source` prediction into the equivalent `target` prediction."""
    if source == target:
        check_prediction(source)
        return output
    x0, eps = to_x0_eps(output, x_t, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)


def edm_preconditioning(
    sigma: jnp.ndarray, *, sigma_data: float = 0.5
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1 ("Ours").

    The denoiser is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for x = x_0 + sigma eps.
    """
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise
