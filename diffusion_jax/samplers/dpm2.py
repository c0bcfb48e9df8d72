"""DPM-2 and DPM-2 ancestral in sigma space (k-diffusion's sample_dpm_2, sample_dpm_2_ancestral).

The second-order single-step DPM-Solver (Lu et al. 2022a, Algorithm 4 with r1 = 1/2) written on
the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma of Karras et al. 2022: an Euler
half step to the geometric midpoint sigma_mid = sqrt(sigma sigma_next) (the midpoint in
lambda), then the full step with the slope there. A step to sigma = 0 is a plain Euler step.
The ancestral variant aims at sigma_down and adds noise of std sigma_up (see
`euler_ancestral.ancestral_levels`). NFE: 2 num_steps - 1 when the grid ends at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import common, sigma_grid
from diffusion_jax.samplers.euler_ancestral import ancestral_levels


def make_dpm2_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    ancestral: bool = False,
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
    """DPM-2 (diffusers' KDPM2DiscreteScheduler) or DPM-2 ancestral (eta, s_noise;
    KDPM2AncestralDiscreteScheduler at eta = 1) on the shared grid; the midpoint's network time
    is interpolated in log sigma, and Karras timesteps are rounded, as diffusers does."""
    name = "dpm2_ancestral" if ancestral else "dpm2"
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got {eta}, {s_noise}")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name=name, prediction=prediction, sigmas=sigmas, spacing=spacing,
        steps_offset=steps_offset, rho=rho, final_sigma=final_sigma, time_spacing=time_spacing,
        round_karras=True,
    )  # fmt: skip
    denoise = sigma_grid.make_denoiser(
        grid,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )
    eta = eta if ancestral else 0.0

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
            slope = (x - denoise(model_fn, x, sigma, grid.model_times[i], cond)) / sigma
            sigma_down, sigma_up = ancestral_levels(sigma, sigma_next, eta)

            def midpoint_step(x):
                sigma_mid = jnp.exp(0.5 * (jnp.log(sigma) + jnp.log(sigma_down)))
                x_mid = x + (sigma_mid - sigma) * slope
                time_mid = grid.model_time_of_sigma(sigma_mid)
                slope_mid = (
                    x_mid - denoise(model_fn, x_mid, sigma_mid, time_mid, cond)
                ) / sigma_mid
                return x + (sigma_down - sigma) * slope_mid

            euler_step = lambda x: x + (sigma_down - sigma) * slope
            x = jax.lax.cond(sigma_down > 0, midpoint_step, euler_step, x)
            if not ancestral:
                return x
            return x + s_noise * sigma_up * common.step_noise(rng, i, x)

        x = jax.lax.fori_loop(0, num_steps, step, grid.sigmas[0] * noise)
        x0 = sigma_grid.unscaled(grid, x)
        return x0, {"nfe": jnp.int32(nfe)}

    ends_at_zero = float(grid.sigmas[-1]) == 0.0
    nfe = 2 * num_steps - int(ends_at_zero)
    return sample
