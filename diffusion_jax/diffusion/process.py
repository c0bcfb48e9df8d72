"""The discrete Gaussian diffusion process of Ho et al. 2020: forward process and reverse means.

`DiffusionProcess` is a pytree holding the arrays a discrete process needs, precomputed
once in float64 and stored in float32. It passes through jit, vmap and pmap like any array.
Steps are 0-indexed, t = 0..K-1; a respaced process keeps in `model_timesteps` the index of
each step in the original chain, which is the time the network was trained on.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import parameterization, schedules

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


@flax.struct.dataclass
class DiffusionProcess:
    """Precomputed coefficients of q(x_t | x_0) and q(x_{t-1} | x_t, x_0), all of shape [K]."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray  # alpha_bar_t
    alphas_cumprod_prev: jnp.ndarray  # alpha_bar_{t-1}, 1 at t = 0
    sqrt_alphas_cumprod: jnp.ndarray  # alpha_t in x_t = alpha_t x_0 + sigma_t eps
    sqrt_one_minus_alphas_cumprod: jnp.ndarray  # sigma_t
    log_betas: jnp.ndarray
    posterior_variance: jnp.ndarray  # beta_tilde_t, Eq. 7 of Ho et al. 2020
    posterior_log_variance_clipped: jnp.ndarray  # log beta_tilde, with t = 0 set to t = 1
    posterior_mean_coef1: jnp.ndarray  # multiplies x_0 in mu_tilde (Eq. 7)
    posterior_mean_coef2: jnp.ndarray  # multiplies x_t in mu_tilde (Eq. 7)
    model_timesteps: jnp.ndarray  # int32, the network's time for each step

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(
        cls, betas: np.ndarray, *, model_timesteps: np.ndarray | None = None
    ) -> DiffusionProcess:
        """Precompute every coefficient from the betas (float64 on the host)."""
        schedules.check_betas(betas)
        betas = np.asarray(betas, np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde_0 = 0: its log is clipped to the next value, as in Ho et al.'s code
        # (to beta_0 on a one-step chain, which has no next value).
        first_variance = posterior_variance[1] if len(betas) > 1 else betas[0]
        clipped = np.concatenate([[first_variance], posterior_variance[1:]])
        if model_timesteps is None:
            model_timesteps = np.arange(len(betas))
        arrays = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_betas=np.log(betas),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(clipped),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(1.0 - betas)
            / (1.0 - alphas_cumprod),
        )
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
        return cls(**arrays, model_timesteps=jnp.asarray(model_timesteps, jnp.int32))


def make_process(
    schedule: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **schedule_kwargs
) -> DiffusionProcess:
    """The process of a named beta schedule with `num_timesteps` steps."""
    betas = schedules.get_betas(
        schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr, **schedule_kwargs
    )
    return DiffusionProcess.from_betas(betas)


def respace(betas: np.ndarray, num_steps: int, spacing: str = "linspace") -> DiffusionProcess:
    """A K-step process through K of the T original steps (Improved DDPM, Sec. 4).

    Its alpha_bar equal the original ones at the kept steps, so the ancestral sampler and
    the variational bound run on K steps with the network called at the original times.
    """
    timesteps = schedules.spaced_timesteps(len(betas), num_steps, spacing)
    return DiffusionProcess.from_betas(
        schedules.respace_betas(betas, timesteps), model_timesteps=timesteps
    )


def gather(coefficients: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """coefficients[t] for a batch of steps t [B], shaped [B, 1, ..., 1] to broadcast on ndim."""
    values = coefficients[t]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def alpha_sigma(
    process: DiffusionProcess, t: jnp.ndarray, ndim: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps, broadcastable against x."""
    return (
        gather(process.sqrt_alphas_cumprod, t, ndim),
        gather(process.sqrt_one_minus_alphas_cumprod, t, ndim),
    )


def model_time(process: DiffusionProcess, t: jnp.ndarray) -> jnp.ndarray:
    """The float time the network sees for step t (the original index after respacing)."""
    return process.model_timesteps[t].astype(jnp.float32)


def q_sample(
    process: DiffusionProcess, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Eq. 4 of Ho et al."""
    alpha, sigma = alpha_sigma(process, t, x0.ndim)
    return alpha * x0 + sigma * noise


def q_mean_variance(
    process: DiffusionProcess, x0: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and variance of q(x_t | x_0) (Eq. 4)."""
    alpha, sigma = alpha_sigma(process, t, x0.ndim)
    return alpha * x0, jnp.broadcast_to(sigma**2, x0.shape)


def q_posterior_mean_variance(
    process: DiffusionProcess, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), Eqs. 6-7 of Ho et al."""
    mean = (
        gather(process.posterior_mean_coef1, t, x_t.ndim) * x0
        + gather(process.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    variance = gather(process.posterior_variance, t, x_t.ndim)
    log_variance = gather(process.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance


def check_variance_type(variance_type: str) -> None:
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(
            f"Unknown variance type {variance_type!r} (diffusion.variance_type); "
            f"allowed: {list(VARIANCE_TYPES)}"
        )


def split_output(model_output: jnp.ndarray, variance_type: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Split a learned-variance output [..., 2C] into (prediction, variance values) [..., C]."""
    if variance_type in ("learned", "learned_range"):
        prediction, variance_values = jnp.split(model_output, 2, axis=-1)
        return prediction, variance_values
    return model_output, None


def model_log_variance(
    process: DiffusionProcess,
    variance_values: jnp.ndarray | None,
    t: jnp.ndarray,
    *,
    variance_type: str,
    ndim: int,
) -> jnp.ndarray:
    """log Sigma_theta(x_t, t) of the reverse step for each variance type.

    fixed_small: log beta_tilde_t (clipped at t = 0); fixed_large: log beta_t, with beta_tilde_1
    at t = 0 as in Ho et al.'s code; learned: the output is the log variance; learned_range:
    Eq. 15 of Nichol & Dhariwal 2021, exp(v log beta_t + (1 - v) log beta_tilde_t) with the
    output in [-1, 1] mapped to v = (output + 1) / 2.
    """
    check_variance_type(variance_type)
    min_log = gather(process.posterior_log_variance_clipped, t, ndim)
    if variance_type == "fixed_small":
        return min_log
    if variance_type == "fixed_large":
        # beta_t, except beta_tilde_1 at t = 0 (the clipped posterior value there).
        large = process.betas.at[0].set(jnp.exp(process.posterior_log_variance_clipped[0]))
        return gather(jnp.log(large), t, ndim)
    if variance_type == "learned":
        return variance_values
    max_log = gather(process.log_betas, t, ndim)
    fraction = (variance_values + 1.0) / 2.0
    return fraction * max_log + (1.0 - fraction) * min_log


def p_mean_variance(
    process: DiffusionProcess,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str = "eps",
    variance_type: str = "fixed_small",
    clip_x0: bool = False,
) -> dict[str, jnp.ndarray]:
    """The reverse step p(x_{t-1} | x_t) = N(mean, exp(log_variance)) read off a model output.

    The mean is mu_tilde(x_t, x0_hat) (Eq. 7 of Ho et al.), with x0_hat from the prediction
    (Eq. 11 for eps); `clip_x0` clips x0_hat to [-1, 1] first.
    Returns mean, log_variance and pred_x0, each broadcastable to x_t.shape.
    """
    prediction_values, variance_values = split_output(model_output, variance_type)
    alpha, sigma = alpha_sigma(process, t, x_t.ndim)
    pred_x0, _ = parameterization.to_x0_eps(prediction_values, x_t, alpha, sigma, prediction)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(process, pred_x0, x_t, t)
    log_variance = model_log_variance(
        process, variance_values, t, variance_type=variance_type, ndim=x_t.ndim
    )
    return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}
