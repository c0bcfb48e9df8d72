"""Samplers of the discrete chain: DDPM ancestral sampling, DDIM and DDIM inversion.

Both run on a `DiffusionProcess` (integer steps n = 0..K-1) and call the network at the
process's `model_timesteps`. With num_steps below K they run on a respaced sub-chain chosen by
`spacing` ("linspace", "leading", "trailing"; see `schedules.spaced_timesteps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.process import DiffusionProcess
from diffusion_jax.samplers import common


def _check_process(schedule, name: str) -> DiffusionProcess:
    if not isinstance(schedule, DiffusionProcess):
        raise ValueError(
            f"Sampler {name!r} runs on a discrete DiffusionProcess, got {type(schedule).__name__}; "
            "for a continuous schedule use 'dpm_solver' with order=1 (the DDIM update, Lu et "
            "al. 2022, Sec. 4.1) or 'euler_maruyama'."
        )
    return schedule


def respaced_process(
    process: DiffusionProcess, num_steps: int, spacing: str, *, steps_offset: int = 0
) -> DiffusionProcess:
    """The sub-chain through num_steps of the process's steps, shifted by `steps_offset`; the
    process itself if all."""
    if num_steps == process.num_timesteps and steps_offset == 0:
        return process
    steps = _offset_steps(process, num_steps, spacing, steps_offset, name="ddpm")
    betas = schedules.respace_betas(np.asarray(process.betas, np.float64), steps)
    return DiffusionProcess.from_betas(
        betas, model_timesteps=np.asarray(process.model_timesteps)[steps]
    )


def _offset_steps(process, num_steps: int, spacing: str, offset: int, *, name: str):
    """The spaced steps (`schedules.spaced_timesteps`) shifted by `offset`, checked to stay
    inside the process. A single step is T-1 whatever the spacing (one step from noise to the
    data), and no offset moves it."""
    steps = schedules.spaced_timesteps(process.num_timesteps, num_steps, spacing)
    if num_steps > 1:
        steps = steps + offset
    if not (0 <= offset and steps[-1] < process.num_timesteps):
        raise ValueError(
            f"{name}: steps_offset={offset} puts the steps {steps[0]}..{steps[-1]} outside "
            f"the process's 0..{process.num_timesteps - 1}"
        )
    return steps


def make_ddpm_sampler(
    schedule: DiffusionProcess,
    *,
    num_steps: int,
    prediction: str = "eps",
    variance_type: str = "fixed_small",
    clip_x0: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
) -> common.SampleFn:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on the full or a respaced chain
    (its steps shifted by `steps_offset`, diffusers' option).

    x_{t-1} = mu_theta(x_t, t) + exp(log_variance / 2) z with the mean of Eq. 7 at x0_hat and the
    variance of `variance_type` (fixed_small beta_tilde, fixed_large beta, learned, or
    learned_range of Nichol & Dhariwal 2021, Eq. 15); no noise at the last step.
    """
    process = _check_process(schedule, "ddpm")
    common.check_num_steps(num_steps, minimum=1, name="ddpm")
    process = respaced_process(process, num_steps, spacing, steps_offset=steps_offset)
    x_t_scale = process.sqrt_one_minus_alphas_cumprod[-1]
    common.check_prediction_at(prediction, float(process.sqrt_alphas_cumprod[-1]), 1.0, name="ddpm")
    process_lib.check_variance_type(variance_type)

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            t = jnp.full((x.shape[0],), num_steps - 1 - i, jnp.int32)
            output = model_fn(x, process_lib.model_time(process, t), cond)
            reverse = process_lib.p_mean_variance(
                process, output, x, t, prediction=prediction,
                variance_type=variance_type, clip_x0=clip_x0,
            )  # fmt: skip
            scale = jnp.where(i < num_steps - 1, jnp.exp(0.5 * reverse["log_variance"]), 0.0)
            return reverse["mean"] + scale * common.step_noise(rng, i, x)

        x0 = jax.lax.fori_loop(0, num_steps, step, x_t_scale * noise)
        return x0, {"nfe": jnp.int32(num_steps)}

    return sample


def _ddim_coefficients(
    process: DiffusionProcess, steps: np.ndarray, *, set_alpha_to_one: bool = True
) -> dict[str, jnp.ndarray]:
    """alpha, sigma at the chosen steps and at the step before each; before the first, alpha
    = 1 (the data), or the process's first alpha_bar without `set_alpha_to_one` (diffusers'
    `final_alpha_cumprod`, as Stable Diffusion's scheduler configs set it)."""
    table = np.asarray(process.alphas_cumprod, np.float64)
    alphas_cumprod = table[steps]
    final = 1.0 if set_alpha_to_one else table[0]
    previous = np.concatenate([[final], alphas_cumprod[:-1]])
    arrays = {
        "alpha": np.sqrt(alphas_cumprod),
        "sigma": np.sqrt(1.0 - alphas_cumprod),
        "alpha_prev": np.sqrt(previous),
        "sigma_prev": np.sqrt(1.0 - previous),
        # sigma_t(eta = 1) of Eq. 16 of Song et al. 2021: the DDPM posterior standard deviation.
        "sigma_ddpm": np.sqrt((1.0 - previous) / (1.0 - alphas_cumprod))
        * np.sqrt(1.0 - alphas_cumprod / previous),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


def _check_eta(eta) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM), got {eta}")


def make_ddim_sampler(
    schedule: DiffusionProcess,
    *,
    num_steps: int,
    prediction: str = "eps",
    eta: float = 0.0,
    spacing: str = "linspace",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    clip_x0: bool = False,
    thresholding: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """DDIM, Eq. 12 of Song et al. 2021, on num_steps steps chosen by `spacing`, shifted by
    `steps_offset` (diffusers' option; Stable Diffusion's configs use 1).

    x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s^2) eps_hat + s z with s = eta sigma_t(1);
    the last step goes to alpha = 1 and returns x0_hat (without `set_alpha_to_one`, to the
    process's first alpha_bar, as diffusers does). eta = 0 is the deterministic sampler
    (Euler's method for the probability-flow ODE in lambda, first order); eta = 1 on all steps
    is DDPM with the fixed-small variance.
    """
    process = _check_process(schedule, "ddim")
    common.check_num_steps(num_steps, minimum=1, name="ddim")
    _check_eta(eta)
    steps = _offset_steps(process, num_steps, spacing, steps_offset, name="ddim")
    coefficients = _ddim_coefficients(process, steps, set_alpha_to_one=set_alpha_to_one)
    model_times = jnp.asarray(np.asarray(process.model_timesteps)[steps], jnp.float32)
    common.check_prediction_at(prediction, float(coefficients["alpha"][-1]), 1.0, name="ddim")
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type,
        clip_x0=clip_x0, thresholding=thresholding,
    )  # fmt: skip

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            n = num_steps - 1 - i
            c = jax.tree.map(lambda array: array[n], coefficients)
            model_t = common.batch_time(model_times[n], x)
            x0, eps = x0_eps_fn(model_fn, x, model_t, c["alpha"], c["sigma"], cond)
            s = eta * c["sigma_ddpm"]
            direction = jnp.sqrt(jnp.maximum(c["sigma_prev"] ** 2 - s**2, 0.0))
            return c["alpha_prev"] * x0 + direction * eps + s * common.step_noise(rng, i, x)

        x0 = jax.lax.fori_loop(0, num_steps, step, coefficients["sigma"][-1] * noise)
        return x0, {"nfe": jnp.int32(num_steps)}

    return sample


def make_ddim_inversion(
    schedule: DiffusionProcess,
    *,
    num_steps: int,
    prediction: str = "eps",
    spacing: str = "linspace",
    variance_type: str = "fixed_small",
):
    """Deterministic DDIM encoding x0 -> noise (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021).

    Runs the eta = 0 update forwards through the steps n_0 < ... < n_{K-1}, starting from
    x_{n_0} = x0 (alpha_bar_{n_0} ~ 1) with eps_hat taken at the current step, so it takes
    K - 1 network evaluations. Returns `invert(model_fn, x0, rng=None, cond=None) -> (noise,
    info)` with noise = x_T / sigma_T, the latent that `make_ddim_sampler` (same steps) decodes.
    """
    process = _check_process(schedule, "ddim_inversion")
    common.check_num_steps(num_steps, minimum=2, name="ddim_inversion")
    steps = schedules.spaced_timesteps(process.num_timesteps, num_steps, spacing)
    coefficients = _ddim_coefficients(process, steps)
    model_times = jnp.asarray(np.asarray(process.model_timesteps)[steps], jnp.float32)
    common.check_prediction_at(prediction, 1.0, float(coefficients["sigma"][0]), name="ddim")
    x0_eps_fn = common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type)

    def invert(model_fn, x0, rng=None, cond=None):
        del rng  # deterministic; the argument keeps the samplers' signature

        def step(i, x):
            c = jax.tree.map(lambda array: array[i], coefficients)
            model_t = common.batch_time(model_times[i], x)
            x0_hat, eps = x0_eps_fn(model_fn, x, model_t, c["alpha"], c["sigma"], cond)
            return coefficients["alpha"][i + 1] * x0_hat + coefficients["sigma"][i + 1] * eps

        x_t = jax.lax.fori_loop(0, num_steps - 1, step, x0)
        return x_t / coefficients["sigma"][-1], {"nfe": jnp.int32(num_steps - 1)}

    return invert
