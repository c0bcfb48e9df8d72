"""Noise schedules: discrete beta schedules, respacing and continuous log-SNR schedules.

A discrete schedule is an array of betas, beta_t for t = 0..T-1 (0-indexed), with
alpha_bar_t = prod_{s <= t} (1 - beta_s) (Eq. 4 of Ho et al. 2020). A continuous schedule
is a function of t in [0, 1] returning the log signal-to-noise ratio
lambda(t) = log(alpha_t^2 / sigma_t^2) (Kingma et al. 2021, Eq. 3), from which a
variance-preserving process has alpha_t^2 = sigmoid(lambda), sigma_t^2 = sigmoid(-lambda).

Discrete schedules are computed in float64 with numpy (they are constants, built once on the
host); continuous schedules are jnp functions that work under jit and vmap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("linspace", "leading", "trailing")


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")


def linear_betas(
    num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Linear betas of Ho et al. 2020 (Sec. 4), scaled by 1000 / T as in Improved DDPM.

    At T = 1000 this is exactly linspace(1e-4, 0.02, 1000); for other T the endpoints
    are scaled so that the total noise added stays comparable (Nichol & Dhariwal 2021).
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"diffusion.num_timesteps={num_timesteps} is too few for the linear schedule: "
            f"scaled by 1000 / T its last beta is {scale * beta_end:g} (must be < 1); allowed: "
            f"num_timesteps > {1000.0 * beta_end:g}, or another diffusion.schedule"
        )
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Betas linear in sqrt(beta) ("quadratic", Stable Diffusion's "scaled_linear")."""
    _check_num_timesteps(num_timesteps)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule, Eq. 17 of Nichol & Dhariwal 2021, betas clipped at `max_beta`.

    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), alpha_bar_t = f(t + 1) / f(0) for
    0-indexed t, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
    """
    _check_num_timesteps(num_timesteps)
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return np.minimum(betas, max_beta)


def sigmoid_betas(
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    start: float = -6.0,
    end: float = 6.0,
) -> np.ndarray:
    """Sigmoid betas of GeoDiff (Xu et al. 2022): a sigmoid ramp from beta_start to beta_end."""
    _check_num_timesteps(num_timesteps)
    ramp = 1.0 / (1.0 + np.exp(-np.linspace(start, end, num_timesteps, dtype=np.float64)))
    return beta_start + (beta_end - beta_start) * ramp


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "quadratic": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that alpha_bar_{T-1} = 0 (Algorithm 1 of Lin et al. 2024).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is unchanged.
    The last beta becomes exactly 1 and alpha_T = 0, so x0 = (x_T - sigma_T eps) / alpha_T is
    undefined: such a schedule needs v- or x0-prediction (Lin et al. 2024, Sec. 3.2).
    """
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def get_betas(
    name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **kwargs
) -> np.ndarray:
    """Betas of the named schedule (a registry for the names used in configs)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"Unknown beta schedule {name!r} (diffusion.schedule); "
            f"allowed: {sorted(BETA_SCHEDULES)}"
        )
    betas = BETA_SCHEDULES[name](num_timesteps, **kwargs)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    check_betas(betas)
    return betas


def check_betas(betas: np.ndarray) -> None:
    """Raise ValueError unless every beta lies in (0, 1] and there is at least one."""
    betas = np.asarray(betas)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        bad = betas[~((betas > 0) & (betas <= 1))]
        raise ValueError(f"betas must lie in (0, 1) (1 only at a zero-SNR end); got {bad[:5]}")
    if np.any(betas[:-1] >= 1):
        raise ValueError("betas must be < 1 except possibly the last (zero terminal SNR)")


# --- Respacing -----------------------------------------------------------------------------


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """Choose `num_steps` of `num_timesteps` original steps, increasing (0-indexed).

    "linspace": evenly spaced including both ends (Improved DDPM's respacing);
    "leading": 0, c, 2c, ... with c = T // K (DDIM, Stable Diffusion), shifted by offset 0;
    "trailing": T-1, T-1-c, ... counted from the end (Lin et al. 2024, Table 2).
    One step is T-1 whatever the spacing: a single step from noise to the data.
    """
    _check_num_timesteps(num_timesteps)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, num_timesteps={num_timesteps}], got {num_steps!r}"
        )
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; allowed: {list(SPACINGS)}")
    if num_steps == 1:
        steps = np.asarray([num_timesteps - 1], np.int64)
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    elif spacing == "leading":
        steps = np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        # A float stride can leave a (K+1)-th point just above 0 (T=1000, K=61): keep K.
        stride = num_timesteps / num_steps
        steps = np.round(np.arange(num_timesteps, 0, -stride)[:num_steps]).astype(np.int64)
        steps = steps[::-1] - 1
    return steps


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Betas of the sub-chain through `timesteps` (Improved DDPM, Sec. 4).

    alpha_bar of the sub-chain equals the original alpha_bar at the kept steps, so
    beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} (with alpha_bar_{t_{-1}} = 1).
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))[np.asarray(timesteps)]
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


# --- Continuous-time schedules, as log-SNR functions of t in [0, 1] ------------------------


def vp_log_snr(t: jnp.ndarray, *, beta_min: float = 0.1, beta_max: float = 20.0) -> jnp.ndarray:
    """VP SDE of Song et al. 2021 (Eq. 33): log alpha^2(t) = -(beta_min t + (bmax-bmin) t^2 / 2).

    lambda(t) = log(alpha^2 / (1 - alpha^2)) = -log(expm1(beta_min t + (bmax - bmin) t^2 / 2)).
    """
    integral = beta_min * t + 0.5 * (beta_max - beta_min) * t**2
    return -jnp.log(jnp.expm1(integral))


def cosine_log_snr(
    t: jnp.ndarray, *, log_snr_min: float = -15.0, log_snr_max: float = 15.0
) -> jnp.ndarray:
    """Cosine schedule in log-SNR form, lambda(t) = -2 log tan(a t + b) (Hoogeboom et al. 2023).

    alpha = cos(pi t / 2) gives lambda = -2 log tan(pi t / 2); a and b truncate it to
    [log_snr_min, log_snr_max] at t = 1 and t = 0.
    """
    b = math.atan(math.exp(-0.5 * log_snr_max))
    a = math.atan(math.exp(-0.5 * log_snr_min)) - b
    return -2.0 * jnp.log(jnp.tan(a * t + b))


def ve_sigma(t: jnp.ndarray, *, sigma_min: float = 0.01, sigma_max: float = 50.0) -> jnp.ndarray:
    """VE SDE noise level sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021)."""
    return sigma_min * (sigma_max / sigma_min) ** t


def ve_log_snr(t: jnp.ndarray, *, sigma_min: float = 0.01, sigma_max: float = 50.0) -> jnp.ndarray:
    """VE / EDM process x = x0 + sigma eps has log-SNR -2 log sigma (Karras et al. 2022)."""
    return -2.0 * jnp.log(ve_sigma(t, sigma_min=sigma_min, sigma_max=sigma_max))


LOG_SNR_SCHEDULES: dict[str, Callable[..., jnp.ndarray]] = {
    "vp": vp_log_snr,
    "cosine": cosine_log_snr,
    "ve": ve_log_snr,
}


def get_log_snr_fn(name: str, **kwargs) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The named continuous schedule as a function t -> log-SNR."""
    if name not in LOG_SNR_SCHEDULES:
        raise ValueError(
            f"Unknown continuous schedule {name!r}; allowed: {sorted(LOG_SNR_SCHEDULES)}"
        )
    schedule = LOG_SNR_SCHEDULES[name]
    return lambda t: schedule(t, **kwargs)


def alpha_sigma_from_log_snr(log_snr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Variance-preserving (alpha, sigma): alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def karras_sigmas(
    num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """EDM noise levels, Eq. 5 of Karras et al. 2022, decreasing, with a final 0 appended.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return np.concatenate([sigmas, [0.0]])
