"""Euler and Heun samplers of flow matching / rectified flow (Liu et al. 2023; Lipman et al. 2023).

They integrate the probability-flow ODE in the schedule's own time t,
dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat, which for the rectified-flow schedule
x_t = (1 - t) x_0 + t eps is the straight-line velocity eps - x0 = u (what a "velocity" network
predicts). On any other schedule it is the same ODE written in t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.samplers import common


def make_flow_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "velocity",
    heun: bool = False,
    time_spacing: str = "time_uniform",
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """Euler (Liu et al. 2023, Eq. 1 discretized) or Heun steps from t_max to t_min.

    Heun (Karras et al. 2022, Algorithm 1) skips its correction where sigma(t_next) = 0, as the
    velocity there may need a division by sigma. NFE: num_steps (Euler) or 2 num_steps - 1
    (Heun, ending at sigma = 0) else 2 num_steps. Neither evaluates the network where sigma = 0,
    so an x0-predicting network may end at the data.
    """
    name = "flow_heun" if heun else "flow_euler"
    common.check_num_steps(num_steps, minimum=1, name=name)
    common.check_choice(time_spacing, noise_schedule.TIME_SPACINGS, option="time_spacing")
    schedule = noise_schedule.as_noise_schedule(schedule)
    if time_spacing == "log_snr":
        common.check_finite_log_snr(schedule, name=name)
    alpha_first, _ = schedule.alpha_sigma(jnp.float32(schedule.t_max))
    _, sigma_last = schedule.alpha_sigma(jnp.float32(schedule.t_min))
    common.check_prediction_at(prediction, float(alpha_first), 1.0, name=name)
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0
    )
    ends_at_data = float(sigma_last) == 0.0

    def velocity(model_fn, x, t, cond):
        (_, _), (dalpha, dsigma) = schedule.alpha_sigma_derivatives(t)
        x0, eps = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t, cond)
        return dalpha * x0 + dsigma * eps

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic
        grid = noise_schedule.time_grid(schedule, num_steps, time_spacing)

        def step(i, x):
            t, t_next = grid[i], grid[i + 1]
            slope = velocity(model_fn, x, t, cond)
            x_next = x + (t_next - t) * slope
            if not heun:
                return x_next

            def corrected(x_next):
                slope_next = velocity(model_fn, x_next, t_next, cond)
                return x + (t_next - t) * 0.5 * (slope + slope_next)

            is_last_to_data = (i == num_steps - 1) & ends_at_data
            return jax.lax.cond(is_last_to_data, lambda x_next: x_next, corrected, x_next)

        sigma_first = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1]
        x0 = jax.lax.fori_loop(0, num_steps, step, sigma_first * noise)
        nfe = (2 * num_steps - int(ends_at_data)) if heun else num_steps
        return x0, {"nfe": jnp.int32(nfe)}

    return sample
