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
from diffusion_jax.samplers import common


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


def _make_denoiser(schedule, x0_eps_fn):
    """`denoise(model_fn, x, sigma, cond)`: D(x; sigma) of EDM's scaled variable x = x_t /
    alpha, from the network at x_t = alpha x and the time whose log-SNR is -2 log sigma."""

    def denoise(model_fn, x, sigma, cond):
        log_snr = -2.0 * jnp.log(sigma)
        alpha, sigma_t = noise_schedule.alpha_sigma_of_log_snr(schedule.kind, log_snr)
        model_t = schedule.model_time(schedule.t_from_log_snr(log_snr))
        x0, _ = x0_eps_fn(model_fn, alpha * x, common.batch_time(model_t, x), alpha, sigma_t, cond)
        return x0

    return denoise


def make_edm_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    heun: bool = True,
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
    """
    name = "edm_heun" if heun else "edm_euler"
    common.check_num_steps(num_steps, minimum=1, name=name)
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    schedule = noise_schedule.as_noise_schedule(schedule)
    common.check_finite_log_snr(schedule, name=name)
    sigma_min, sigma_max = _sigma_range(schedule, sigma_min, sigma_max)
    sigmas = jnp.asarray(
        schedules.karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho),
        jnp.float32,
    )
    gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    denoise = _make_denoiser(
        schedule,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            churn = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma, 0.0)
            sigma_hat = sigma * (1.0 + churn)
            # sqrt(sigma_hat^2 - sigma^2), written so that it is exactly 0 without churn.
            extra_noise = sigma * jnp.sqrt(churn * (2.0 + churn)) * s_noise
            x_hat = x + extra_noise * common.step_noise(rng, i, x)
            slope = (x_hat - denoise(model_fn, x_hat, sigma_hat, cond)) / sigma_hat
            x_next = x_hat + (sigma_next - sigma_hat) * slope
            if not heun:
                return x_next

            def corrected(x_next):
                slope_next = (x_next - denoise(model_fn, x_next, sigma_next, cond)) / sigma_next
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)

            return jax.lax.cond(sigma_next > 0, corrected, lambda x_next: x_next, x_next)

        x0 = jax.lax.fori_loop(0, num_steps, step, sigmas[0] * noise)
        nfe = 2 * num_steps - 1 if heun else num_steps
        return x0, {"nfe": jnp.int32(nfe)}

    return sample
