"""Noise levels a sampler steps through: one helper for every sigma spacing of every sampler.

A grid is N + 1 decreasing noise levels sigma_0 > ... > sigma_N in EDM's convention
sigma = sigma_t / alpha_t = exp(-lambda / 2) (Karras et al. 2022, Sec. 2), the network's time at
each, and the family that turns sigma back into (alpha_t, sigma_t). The sampler evaluates the
network at sigma_0..sigma_{N-1} and ends at sigma_N (0: the data, or the schedule's smallest).

`sigmas` chooses the levels:
- "schedule": on a discrete process, the training sigmas at the timesteps of `spacing`
  ("linspace", "leading" with `steps_offset`, "trailing"; diffusers' `timestep_spacing`, Lin et
  al. 2024, Table 2); on a continuous schedule, the times of `time_spacing` (DPM-Solver's);
- "karras": Eq. 5 of Karras et al. 2022 with `rho` between the ends;
- "exponential": uniform in log sigma (uniform in lambda);
- "beta": sigma_min + ppf(1 - i / (N - 1)) (sigma_max - sigma_min) of a Beta(0.6, 0.6)
  (Lee et al. 2024, "Beta sampling is all you need").
Timesteps of non-schedule levels come from piecewise-linear interpolation in log sigma over the
training sigmas, as diffusers' `_sigma_to_t` does.

Two conventions follow diffusers' two families of schedulers: "k_diffusion" (Euler, LMS,
KDPM2, Heun: N timesteps spread over [0, T - 1], Karras range from those timesteps) and
"multistep" (DPM-Solver, UniPC, DEIS: N + 1 points of which the last is dropped, Karras range
over all training sigmas).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import scipy.stats

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.diffusion.process import DiffusionProcess
from diffusion_jax.samplers import common

SIGMA_SPACINGS = ("schedule", "karras", "exponential", "beta")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min", "last")
CONVENTIONS = ("k_diffusion", "multistep")
BETA_SIGMAS_ALPHA = BETA_SIGMAS_BETA = 0.6


@dataclasses.dataclass(frozen=True)
class SigmaGrid:
    """sigmas [N + 1] and model_times [N + 1] (float32; the last time is unused if sigma_N = 0).

    `kind` ("vp", "ve", "flow") turns sigma into (alpha_t, sigma_t); `model_time_of_sigma`
    gives the network's time at any sigma inside the grid (jit-compatible), for samplers that
    evaluate between grid points.
    """

    sigmas: jnp.ndarray
    model_times: jnp.ndarray
    kind: str
    model_time_of_sigma: Callable[[jnp.ndarray], jnp.ndarray]

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    def alpha_sigma(self, sigma: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(alpha_t, sigma_t) of the family at EDM noise level sigma (exact at sigma = 0)."""
        return alpha_sigma_of_sigma(self.kind, sigma)


def alpha_sigma_of_sigma(kind: str, sigma):
    """(alpha_t, sigma_t) with sigma_t / alpha_t = sigma: VP alpha = 1 / sqrt(1 + sigma^2), VE
    alpha = 1, flow alpha = 1 / (1 + sigma)."""
    if kind == "vp":
        alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    elif kind == "ve":
        alpha = jnp.ones_like(sigma)
    else:
        alpha = 1.0 / (1.0 + sigma)
    return alpha, sigma * alpha


def check_grid_options(sigmas, spacing, final_sigma) -> None:
    common.check_choice(sigmas, SIGMA_SPACINGS, option="sigmas (sigma spacing)")
    if spacing is not None:
        common.check_choice(spacing, TIMESTEP_SPACINGS, option="spacing (timestep spacing)")
    common.check_choice(final_sigma, FINAL_SIGMAS, option="final_sigma")


def discrete_timesteps(
    num_timesteps: int, num_steps: int, spacing: str, steps_offset: int, convention: str
) -> np.ndarray:
    """The N decreasing (float) timesteps of diffusers' `set_timesteps` for `convention`."""
    count = num_steps if convention == "k_diffusion" else num_steps + 1
    if spacing == "linspace":
        timesteps = np.linspace(0, num_timesteps - 1, count)
        timesteps = timesteps.astype(np.float32) if count == num_steps else timesteps.round()
        return np.asarray(timesteps[::-1][:num_steps], np.float64)
    if spacing == "leading":
        stride = num_timesteps // count
        timesteps = (np.arange(count) * stride).round()[::-1][:num_steps]
        return timesteps.astype(np.float64) + steps_offset
    stride = num_timesteps / num_steps
    return np.arange(num_timesteps, 0, -stride).round()[:num_steps].astype(np.float64) - 1.0


def converted_sigmas(kind: str, sigma_min: float, sigma_max: float, count: int, rho: float):
    """`count` decreasing levels of spacing `kind` ("karras", "exponential", "beta")."""
    ramp = np.linspace(0.0, 1.0, count)
    if kind == "karras":
        inv_min, inv_max = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        return (inv_max + ramp * (inv_min - inv_max)) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), count))
    quantiles = scipy.stats.beta.ppf(1.0 - ramp, BETA_SIGMAS_ALPHA, BETA_SIGMAS_BETA)
    return sigma_min + quantiles * (sigma_max - sigma_min)


def sigma_to_timestep(sigma: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of sigma by linear interpolation in log sigma, clipped to [0, T-1]."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    return np.interp(log_sigma, log_train_sigmas, np.arange(log_train_sigmas.shape[0]))


def _discrete_grid(process, num_steps, *, sigmas, spacing, steps_offset, rho, final_sigma,
                   convention, round_karras):  # fmt: skip
    # From the betas in float64: 1 - alpha_bar ~ 1e-4 at the first steps, where the float32
    # alpha_bar table would put sigma 1e-4 (relative) off.
    alphas_cumprod = np.cumprod(1.0 - np.asarray(process.betas, np.float64))
    if not alphas_cumprod[-1] > 0.0:
        raise ValueError(
            "This process has zero terminal SNR (alpha_bar = 0 at its last step): its sigma = "
            "sigma_t / alpha_t is infinite there, so no sigma grid starts from it. Allowed with "
            "it: ddim, ddpm (with prediction 'v' or 'x0')."
        )
    train_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    log_train_sigmas = np.log(train_sigmas)
    num_timesteps = train_sigmas.shape[0]
    timesteps = discrete_timesteps(num_timesteps, num_steps, spacing, steps_offset, convention)
    levels = np.interp(timesteps, np.arange(num_timesteps), train_sigmas)
    if sigmas != "schedule":
        if convention == "k_diffusion":
            low, high = levels[-1], levels[0]
        else:
            low, high = train_sigmas[0], train_sigmas[-1]
        levels = converted_sigmas(sigmas, float(low), float(high), num_steps, rho)
        timesteps = sigma_to_timestep(levels, log_train_sigmas)
        if sigmas == "karras" and round_karras:
            timesteps = timesteps.round()
        if convention == "multistep":
            # diffusers' multistep schedulers store int64 timesteps: the network sees the
            # truncated timestep, while the solver uses the level itself.
            timesteps = np.trunc(timesteps)
    last = {"zero": 0.0, "sigma_min": train_sigmas[0], "last": levels[-1]}[final_sigma]
    levels = np.concatenate([levels, [last]]).astype(np.float32)
    model_timesteps = np.asarray(process.model_timesteps, np.float64)
    model_times = np.interp(timesteps, np.arange(num_timesteps), model_timesteps)
    model_times = np.concatenate([model_times, [0.0]]).astype(np.float32)

    def model_time_of_sigma(sigma):
        log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
        # float64 tables under jax_enable_x64 (diffusers interpolates in float64 too).
        step = jnp.interp(log_sigma, jnp.asarray(log_train_sigmas), jnp.arange(num_timesteps))
        return jnp.interp(step, jnp.arange(num_timesteps), jnp.asarray(model_timesteps))

    return SigmaGrid(jnp.asarray(levels), jnp.asarray(model_times), "vp", model_time_of_sigma)


def _continuous_grid(schedule, num_steps, *, sigmas, rho, final_sigma, time_spacing):
    common.check_finite_log_snr(schedule, name=f"sigmas={sigmas!r}")

    def sigma_of_time(t):
        return jnp.exp(-0.5 * schedule.log_snr(jnp.asarray(t, jnp.float32)))

    def model_time_of_sigma(sigma):
        t = schedule.t_from_log_snr(-2.0 * jnp.log(jnp.maximum(sigma, 1e-10)))
        return schedule.model_time(t)

    if sigmas == "schedule":
        times = noise_schedule.time_grid(schedule, num_steps, time_spacing)[:-1]
        levels = np.asarray(sigma_of_time(times), np.float64)
        model_times = np.asarray(schedule.model_time(times), np.float64)
    else:
        high, low = (float(sigma_of_time(t)) for t in (schedule.t_max, schedule.t_min))
        levels = converted_sigmas(sigmas, low, high, num_steps, rho)
        model_times = np.asarray(model_time_of_sigma(jnp.asarray(levels, jnp.float32)))
    sigma_min = float(sigma_of_time(schedule.t_min))
    last = {"zero": 0.0, "sigma_min": sigma_min, "last": levels[-1]}[final_sigma]
    levels = np.concatenate([levels, [last]]).astype(np.float32)
    model_times = np.concatenate([model_times, [0.0]]).astype(np.float32)
    kind = schedule.kind
    return SigmaGrid(jnp.asarray(levels), jnp.asarray(model_times), kind, model_time_of_sigma)


def make_sigma_grid(
    schedule,
    num_steps: int,
    *,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    convention: str = "k_diffusion",
    round_karras: bool = False,
    time_spacing: str = "log_snr",
) -> SigmaGrid:
    """The grid of a sampler of num_steps steps (see the module docstring).

    A discrete `DiffusionProcess` follows diffusers (spacing defaults to "linspace"); a
    continuous NoiseSchedule takes its times from `time_spacing` ("schedule") or converts
    [sigma(t_min), sigma(t_max)]. `round_karras` rounds Karras timesteps to integers (diffusers'
    DPM-Solver, UniPC, DEIS and KDPM2 do). final_sigma: "zero" (end at the data),
    "sigma_min" (the schedule's smallest level) or "last" (repeat the last level, DEIS).
    """
    check_grid_options(sigmas, spacing, final_sigma)
    common.check_choice(convention, CONVENTIONS, option="grid convention")
    if isinstance(schedule, DiffusionProcess):
        return _discrete_grid(
            schedule, num_steps, sigmas=sigmas, spacing=spacing or "linspace",
            steps_offset=steps_offset, rho=rho, final_sigma=final_sigma,
            convention=convention, round_karras=round_karras,
        )  # fmt: skip
    if spacing is not None:
        raise ValueError(
            f"spacing={spacing!r} (a diffusers timestep spacing) needs a discrete "
            "DiffusionProcess; on a continuous schedule use time_spacing or sigmas"
        )
    schedule = noise_schedule.as_noise_schedule(schedule)
    return _continuous_grid(
        schedule, num_steps, sigmas=sigmas, rho=rho, final_sigma=final_sigma,
        time_spacing=time_spacing,
    )  # fmt: skip


def make_denoiser(grid: SigmaGrid, x0_eps_fn: common.X0EpsFn):
    """`denoise(model_fn, x, sigma, model_time, cond) -> x0_hat` in EDM's scaled variable
    x = x_t / alpha_t: the network sees x_t = alpha x at its time `model_time`."""

    def denoise(model_fn, x, sigma, model_time, cond):
        alpha, sigma_t = grid.alpha_sigma(sigma)
        model_t = common.batch_time(model_time, x)
        return x0_eps_fn(model_fn, alpha * x, model_t, alpha, sigma_t, cond)[0]

    return denoise


def checked_grid(
    schedule,
    num_steps: int,
    *,
    name: str,
    prediction: str,
    convention: str = "k_diffusion",
    round_karras: bool = False,
    minimum_steps: int = 1,
    **grid_options,
) -> SigmaGrid:
    """make_sigma_grid after the checks every grid sampler shares (steps, prediction)."""
    common.check_num_steps(num_steps, minimum=minimum_steps, name=name)
    grid = make_sigma_grid(
        schedule, num_steps, convention=convention, round_karras=round_karras, **grid_options
    )
    alpha_first, _ = grid.alpha_sigma(grid.sigmas[0])
    _, sigma_last = grid.alpha_sigma(grid.sigmas[-2])
    common.check_prediction_at(prediction, float(alpha_first), float(sigma_last), name=name)
    return grid


def unscaled(grid: SigmaGrid, x: jnp.ndarray) -> jnp.ndarray:
    """x_t = alpha_N x at the grid's last level: the samplers that step in EDM's scaled
    variable return what the others do (x0 itself when the grid ends at sigma = 0)."""
    return grid.alpha_sigma(grid.sigmas[-1])[0] * x
