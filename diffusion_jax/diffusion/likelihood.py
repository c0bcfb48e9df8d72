"""Bits per dimension of data under a model, through every step of the discrete chain.

This is the discrete variational bound (an upper bound on -log2 p(x_0) / D for 8-bit data),
the quantity DDPM and Improved DDPM report; it is not the probability-flow ODE likelihood
of score SDEs, which needs dequantization and is a different number.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.diffusion import vlb

# model_fn(x_t [B, ...], network time [B]) -> output [B, ...]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def bits_per_dim(
    process: process_lib.DiffusionProcess,
    model_fn: ModelFn,
    x0: jnp.ndarray,
    rng: jax.Array,
    *,
    prediction: str = "eps",
    variance_type: str = "fixed_small",
    decoder: str = "discretized",
) -> dict[str, jnp.ndarray]:
    """Negative ELBO of x0 in bits/dim, all K terms in one compiled loop (Eq. 5 of Ho et al.).

    Each term L_t draws its own x_t ~ q(x_t | x_0). Returns
    "total" [B] = prior + sum of terms, "terms" [B, K] (L_t for t = 0..K-1, t = 0 the decoder),
    "prior" [B], and "x0_mse" [B, K] (the squared error of the model's x_0 at each step).
    """
    num_steps = process.num_timesteps
    batch = x0.shape[0]

    def term(t_scalar, key):
        t = jnp.full((batch,), t_scalar, jnp.int32)
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = process_lib.q_sample(process, x0, t, noise)
        output = model_fn(x_t, process_lib.model_time(process, t))
        bits = vlb.vlb_term_bits(
            process,
            output,
            x0,
            x_t,
            t,
            prediction=prediction,
            variance_type=variance_type,
            decoder=decoder,
        )
        pred_x0 = process_lib.p_mean_variance(
            process, output, x_t, t, prediction=prediction, variance_type=variance_type
        )["pred_x0"]
        return bits, vlb.mean_over_dims((pred_x0 - x0) ** 2)

    keys = jax.random.split(rng, num_steps)
    steps = jnp.arange(num_steps)
    terms, x0_mse = jax.lax.map(lambda args: term(*args), (steps, keys))  # [K, B] each
    prior = vlb.prior_bits(process, x0)
    return {
        "total": prior + jnp.sum(terms, axis=0),
        "terms": terms.T,
        "prior": prior,
        "x0_mse": x0_mse.T,
    }
