"""Euler ancestral sampling in sigma space (k-diffusion's `sample_euler_ancestral`).

Each step splits the move sigma -> sigma_next into a deterministic Euler step of the
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 3) down to
sigma_down, and fresh noise of std sigma_up that brings the level back up to sigma_next:
sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
sigma_down = sqrt(sigma_next^2 - sigma_up^2). With eta = 1 this is the DDPM posterior's
variance (Ho et al. 2020, Eq. 7) in the scaled variable x = x_t / alpha_t; eta = 0 is Euler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import common, sigma_grid


def ancestral_levels(sigma, sigma_next, eta):
    """(sigma_down, sigma_up) of one ancestral step from sigma to sigma_next."""
    variance = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(jnp.maximum(variance, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def make_euler_ancestral_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    time_spacing: str = "log_snr",
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """Euler ancestral on the shared grid (diffusers' EulerAncestralDiscreteScheduler at
    eta = 1); the noise of step i is `common.step_noise(rng, i, x)`. NFE: num_steps."""
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got {eta}, {s_noise}")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name="euler_ancestral", prediction=prediction, sigmas=sigmas,
        spacing=spacing, steps_offset=steps_offset, rho=rho, final_sigma=final_sigma,
        time_spacing=time_spacing,
    )  # fmt: skip
    denoise = sigma_grid.make_denoiser(
        grid,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
            x0 = denoise(model_fn, x, sigma, grid.model_times[i], cond)
            sigma_down, sigma_up = ancestral_levels(sigma, sigma_next, eta)
            x = x + (sigma_down - sigma) * (x - x0) / sigma
            return x + s_noise * sigma_up * common.step_noise(rng, i, x)

        x = jax.lax.fori_loop(0, num_steps, step, grid.sigmas[0] * noise)
        x0 = sigma_grid.unscaled(grid, x)
        return x0, {"nfe": jnp.int32(num_steps)}

    return sample
