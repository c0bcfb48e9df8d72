"""Reverse-SDE samplers of score SDEs (Song et al. 2021): Euler-Maruyama and predictor-corrector.

For x_t = alpha_t x_0 + sigma_t eps the forward SDE is dx = f(t) x dt + g(t) dw with
f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, App. A), and
the reverse SDE (Eq. 6 of Song et al.) is dx = [f x - g^2 score] dt + g dw_bar, with
score = -eps_hat / sigma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.samplers import common


def _drift_diffusion(schedule, x0_eps_fn, model_fn, x, t, cond):
    """(reverse drift f x - g^2 score, g) at time t, and the score."""
    (alpha, sigma), (dalpha, dsigma) = schedule.alpha_sigma_derivatives(t)
    f = dalpha / alpha
    g_squared = 2.0 * sigma * dsigma - 2.0 * f * sigma**2
    _, eps = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t, cond)
    score = -eps / sigma
    return f * x - g_squared * score, jnp.sqrt(g_squared), score


def _langevin_step(x, score, noise, *, snr, scale):
    """Corrector of Algorithms 4 (VE) and 5 (VP) of Song et al., step size from the target SNR.

    epsilon = 2 scale (snr ||z|| / ||score||)^2 with the norms averaged over the batch, as in
    the paper's code: per-sample norms would give huge steps to samples near a mode, where the
    score vanishes (in a few dimensions; in image dimensions the norms concentrate).
    """
    axes = tuple(range(1, x.ndim))
    score_norm = jnp.mean(jnp.sqrt(jnp.sum(score**2, axis=axes)))
    noise_norm = jnp.mean(jnp.sqrt(jnp.sum(noise**2, axis=axes)))
    step_size = 2.0 * scale * (snr * noise_norm / score_norm) ** 2
    return x + step_size * score + jnp.sqrt(2.0 * step_size) * noise


def make_sde_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    corrector_steps: int = 0,
    snr: float = 0.16,
    time_spacing: str = "time_uniform",
    denoise_final: bool = False,
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """Euler-Maruyama on the reverse SDE (corrector_steps = 0), or the predictor-corrector
    sampler (Algorithm 1 of Song et al. 2021) with `corrector_steps` Langevin steps of target
    signal-to-noise ratio `snr` before each predictor step.

    The last step adds no noise (it returns the mean, as the paper's code does);
    `denoise_final` then returns x0_hat at t_min (one more evaluation).
    """
    name = "pc" if corrector_steps else "euler_maruyama"
    common.check_num_steps(num_steps, minimum=1, name=name)
    common.check_choice(time_spacing, noise_schedule.TIME_SPACINGS, option="time_spacing")
    if not isinstance(corrector_steps, int) or corrector_steps < 0 or snr <= 0:
        raise ValueError(
            f"corrector_steps must be an integer >= 0 and snr > 0, got {corrector_steps}, {snr}"
        )
    schedule = noise_schedule.as_noise_schedule(schedule)
    common.check_finite_log_snr(schedule, name=name)
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0
    )
    nfe = num_steps * (1 + corrector_steps) + int(denoise_final)

    def corrector(model_fn, x, t, t_next, rng_step, cond):
        alpha, _ = schedule.alpha_sigma(t)
        alpha_next, _ = schedule.alpha_sigma(t_next)
        scale = (alpha / alpha_next) ** 2  # 1 - beta_i of the discretized VP chain; 1 for VE
        for j in range(corrector_steps):
            _, _, score = _drift_diffusion(schedule, x0_eps_fn, model_fn, x, t, cond)
            noise = common.step_noise(rng_step, j + 1, x)
            x = _langevin_step(x, score, noise, snr=snr, scale=scale)
        return x

    def sample(model_fn, noise, rng, cond=None):
        grid = noise_schedule.time_grid(schedule, num_steps, time_spacing)

        def step(i, x):
            t, t_next = grid[i], grid[i + 1]
            rng_step = jax.random.fold_in(rng, i)
            x = corrector(model_fn, x, t, t_next, rng_step, cond)
            drift, g, _ = _drift_diffusion(schedule, x0_eps_fn, model_fn, x, t, cond)
            dt = t - t_next
            mean = x - drift * dt
            last = i == num_steps - 1
            return mean + jnp.where(last, 0.0, g * jnp.sqrt(dt)) * common.step_noise(rng_step, 0, x)

        sigma_first = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1]
        x = jax.lax.fori_loop(0, num_steps, step, sigma_first * noise)
        if denoise_final:
            t_min = jnp.float32(schedule.t_min)
            x = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t_min, cond)[0]
        return x, {"nfe": jnp.int32(nfe)}

    return sample
