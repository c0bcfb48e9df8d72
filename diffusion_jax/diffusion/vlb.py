"""Terms of the variational bound of a discrete diffusion process, in bits per dimension.

-log p(x_0) <= L_prior + sum_{t >= 1} L_t + L_0 (Eq. 5 of Ho et al. 2020), with
L_prior = KL(q(x_T | x_0) || N(0, I)), L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and
the decoder L_0 = -log p(x_0 | x_1). In this module's 0-indexed steps, step t = 0 is the
decoder and steps t >= 1 are the KL terms. Every term is averaged over the data dimensions
and divided by log 2, so that the sum is bits/dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process as process_lib

DECODERS = ("discretized", "gaussian")


def mean_over_dims(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the first (the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: jnp.ndarray, log_var1: jnp.ndarray, mean2: jnp.ndarray, log_var2: jnp.ndarray
) -> jnp.ndarray:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + jnp.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * jnp.exp(-log_var2)
    )


def _standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (1.0 + jax.lax.erf(x / np.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, *, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
    """log P(x) of 8-bit data under a Gaussian integrated over each bin (Ho et al. 2020, Eq. 13).

    x holds values (2k - 255) / 255, k = 0..255, bins are of width 2/255, and the outermost
    bins extend to -inf and +inf so that the 256 probabilities sum to 1.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_bin = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def gaussian_log_likelihood(
    x: jnp.ndarray, *, means: jnp.ndarray, log_variance: jnp.ndarray
) -> jnp.ndarray:
    """log N(x; means, exp(log_variance)) elementwise: the decoder for continuous data."""
    return -0.5 * (np.log(2 * np.pi) + log_variance + (x - means) ** 2 * jnp.exp(-log_variance))


def vlb_term_bits(
    process: process_lib.DiffusionProcess,
    model_output: jnp.ndarray,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str = "eps",
    variance_type: str = "fixed_small",
    decoder: str = "discretized",
) -> jnp.ndarray:
    """L_t in bits/dim for each example [B]: the decoder NLL at t = 0, a KL otherwise.

    The model's reverse step comes from `process.p_mean_variance` (Eq. 7 and Eq. 11 of Ho
    et al.; Eq. 15 of Nichol & Dhariwal for learned_range).
    """
    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}; allowed: {list(DECODERS)}")
    true_mean, _, true_log_variance = process_lib.q_posterior_mean_variance(process, x0, x_t, t)
    reverse = process_lib.p_mean_variance(
        process, model_output, x_t, t, prediction=prediction, variance_type=variance_type
    )
    mean, log_variance = reverse["mean"], reverse["log_variance"]
    kl = mean_over_dims(normal_kl(true_mean, true_log_variance, mean, log_variance))
    if decoder == "discretized":
        log_likelihood = discretized_gaussian_log_likelihood(
            x0, means=mean, log_scales=0.5 * log_variance
        )
    else:
        log_likelihood = gaussian_log_likelihood(x0, means=mean, log_variance=log_variance)
    decoder_nll = -mean_over_dims(jnp.broadcast_to(log_likelihood, x0.shape))
    return jnp.where(t == 0, decoder_nll, kl) / np.log(2.0)


def prior_bits(process: process_lib.DiffusionProcess, x0: jnp.ndarray) -> jnp.ndarray:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) in bits/dim for each example [B]."""
    last = jnp.full((x0.shape[0],), process.num_timesteps - 1)
    mean, variance = process_lib.q_mean_variance(process, x0, last)
    kl = normal_kl(mean, jnp.log(variance), 0.0, 0.0)
    return mean_over_dims(kl) / np.log(2.0)
