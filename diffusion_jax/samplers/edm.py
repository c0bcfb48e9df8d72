"""EDM samplers of Karras et al. 2022: Euler and Heun on the Karras sigmas, with S_churn.

They integrate dx/dsigma = (x - D(x; sigma)) / sigma (Eq. 3 with sigma(t) = t, s(t) = 1) in the
scaled variable x = x_t / alpha_t, whose noise level is sigma = sigma_t / alpha_t =
exp(-lambda / 2). A VP network is called at x_t = alpha x with alpha from the family's formula
and at the time t(lambda) of its schedule (the "VP" column of Table 1, with the discrete
schedule's time for DDPM networks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_schedule, schedules
from diffusion_jax.samplers import common, sigma_grid


def _sigma_range(schedule, sigma_min, sigma_max):
    """EDM sigmas of the schedule's ends, or the ones asked for if they lie inside them."""
    ends = jnp.asarray([schedule.t_min, schedule.t_max], jnp.float32)
    lowest, highest = (float(v) for v in jnp.exp(-0.5 * schedule.log_snr(ends)))
    sigma_min = lowest if sigma_min is None else sigma_min
    sigma_max = highest if sigma_max is None else sigma_max
    tolerance = 1e-4
    if not lowest * (1 - tolerance) <= sigma_min < sigma_max <= highest * (1 + tolerance):
        raise ValueError(
            f"EDM needs {lowest:.4g} <= sigma_min < sigma_max <= {highest:.4g} on this schedule "
            f"(sigma = sigma_t / alpha_t at t_min, t_max), got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}"
        )
    return sigma_min, sigma_max


def _edm_grid(schedule, num_steps, sigma_min, sigma_max, rho) -> sigma_grid.SigmaGrid:
    """EDM's own grid: Karras sigmas over the schedule's range, the network's time at each from
    the continuous view t(lambda = -2 log sigma) (the discrete schedule's time for DDPM)."""
    schedule = noise_schedule.as_noise_schedule(schedule)
    common.check_finite_log_snr(schedule, name="edm")
    sigma_min, sigma_max = _sigma_range(schedule, sigma_min, sigma_max)
    sigmas = jnp.asarray(
        schedules.karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho),
        jnp.float32,
    )

    def model_time_of_sigma(sigma):
        log_snr = -2.0 * jnp.log(jnp.maximum(sigma, 1e-10))
        return schedule.model_time(schedule.t_from_log_snr(log_snr))

    model_times = model_time_of_sigma(sigmas).at[-1].set(0.0)
    return sigma_grid.SigmaGrid(sigmas, model_times, schedule.kind, model_time_of_sigma)


def make_edm_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    heun: bool = True,
    sigmas: str | None = None,
    spacing: str | None = None,
    steps_offset: int = 0,
    final_sigma: str = "zero",
    time_spacing: str = "log_snr",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """Algorithm 2 of Karras et al. 2022 (Algorithm 1 when s_churn = 0) on num_steps sigmas.

    Each step may first raise sigma_i to sigma_hat = (1 + gamma) sigma_i, gamma =
    min(s_churn / N, sqrt(2) - 1) for sigma_i in [s_tmin, s_tmax], adding noise of std
    s_noise sqrt(sigma_hat^2 - sigma_i^2); then an Euler step to sigma_{i+1}, corrected by
    Heun's rule unless sigma_{i+1} = 0. NFE: num_steps (Euler), 2 num_steps - 1 (Heun).

    sigmas=None is EDM's grid (Karras over [sigma_min, sigma_max], default the schedule's
    range); any of `sigma_grid.SIGMA_SPACINGS` takes the shared grid instead (with spacing,
    steps_offset, final_sigma, time_spacing), as diffusers' EulerDiscreteScheduler and
    HeunDiscreteScheduler do: registry names "euler" and "heun".
    """
    name = "edm_heun" if heun else "edm_euler"
    common.check_num_steps(num_steps, minimum=1, name=name)
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    if sigmas is None:
        grid = _edm_grid(schedule, num_steps, sigma_min, sigma_max, rho)
    elif sigma_min is not None or sigma_max is not None:
        raise ValueError("sigma_min and sigma_max set EDM's own grid: use them with sigmas=None")
    else:
        grid = sigma_grid.checked_grid(
            schedule, num_steps, name=name, prediction=prediction, sigmas=sigmas,
            spacing=spacing, steps_offset=steps_offset, rho=rho, final_sigma=final_sigma,
            time_spacing=time_spacing,
        )  # fmt: skip
    gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    denoise = sigma_grid.make_denoiser(
        grid,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )

    nfe = 2 * num_steps - int(float(grid.sigmas[-1]) == 0.0) if heun else num_steps

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
            churn = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma, 0.0)
            sigma_hat = sigma * (1.0 + churn)
            # sqrt(sigma_hat^2 - sigma^2), written so that it is exactly 0 without churn.
            extra_noise = sigma * jnp.sqrt(churn * (2.0 + churn)) * s_noise
            x_hat = x + extra_noise * common.step_noise(rng, i, x)
            time_hat = grid.model_time_of_sigma(sigma_hat)
            time_hat = jnp.where(churn > 0, time_hat, grid.model_times[i])
            slope = (x_hat - denoise(model_fn, x_hat, sigma_hat, time_hat, cond)) / sigma_hat
            x_next = x_hat + (sigma_next - sigma_hat) * slope
            if not heun:
                return x_next

            def corrected(x_next):
                x0_next = denoise(model_fn, x_next, sigma_next, grid.model_times[i + 1], cond)
                slope_next = (x_next - x0_next) / sigma_next
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)

            return jax.lax.cond(sigma_next > 0, corrected, lambda x_next: x_next, x_next)

        x = jax.lax.fori_loop(0, num_steps, step, grid.sigmas[0] * noise)
        x0 = sigma_grid.unscaled(grid, x)
        return x0, {"nfe": jnp.int32(nfe)}

    return sample
