"""What every sampler shares: the model seen as a denoiser (x_0, eps), option checks, noise.

A model function is `model_fn(x, t, cond) -> output` with x [B, ...], t the network's time
(float32 [B]) and cond whatever the network is conditioned on (None if unconditional). A sampler
is `sample(model_fn, noise, rng, cond=None) -> (x0, info)`: `noise` is a standard normal draw of
the shape of the samples, the sampler starts from x_T = sigma_T * noise (N(0, I) up to
1 - sigma_T ~ 1e-5 for VP schedules, sigma_max * noise for VE / EDM), and `info` holds "nfe",
the number of network evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import parameterization
from diffusion_jax.diffusion.process import VARIANCE_TYPES, check_variance_type

ModelFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
SampleFn = Callable[..., tuple[jnp.ndarray, dict[str, jnp.ndarray]]]
X0EpsFn = Callable[..., tuple[jnp.ndarray, jnp.ndarray]]

__all__ = ["VARIANCE_TYPES", "ModelFn", "SampleFn", "make_x0_eps_fn"]


def dynamic_threshold(
    x0: jnp.ndarray, *, percentile: float = 0.995, max_value: float = 1.0
) -> jnp.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3) of a batch x0 [B, ...].

    s = max(quantile(|x0|, percentile), max_value) per sample; x0 is clipped to [-s, s] and
    scaled by max_value / s into [-max_value, max_value] (Imagen: max_value = 1), so a
    prediction already inside that range is left as is.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) * (max_value / s)


def make_x0_eps_fn(
    *,
    prediction: str,
    variance_type: str = "fixed_small",
    clip_x0: bool = False,
    thresholding: bool = False,
    threshold_percentile: float = 0.995,
    threshold_max: float = 1.0,
) -> X0EpsFn:
    """The model read as `fn(model_fn, x, model_t, alpha, sigma, cond) -> (x0, eps)`.

    alpha and sigma are broadcastable against x.

    A learned-variance output [..., 2C] keeps its first C channels. Clipping x0 to [-1, 1] or
    dynamic thresholding changes x0, and eps is recomputed from it so that (x0, eps) still
    explain x = alpha x0 + sigma eps.
    """
    parameterization.check_prediction(prediction)
    check_variance_type(variance_type)
    learned = variance_type in ("learned", "learned_range")

    def x0_eps_fn(model_fn, x, model_t, alpha, sigma, cond):
        output = model_fn(x, model_t, cond)
        if learned:
            output = jnp.split(output, 2, axis=-1)[0]
        x0, eps = parameterization.to_x0_eps(output, x, alpha, sigma, prediction)
        if not (clip_x0 or thresholding):
            return x0, eps
        if thresholding:
            x0 = dynamic_threshold(x0, percentile=threshold_percentile, max_value=threshold_max)
        else:
            x0 = jnp.clip(x0, -1.0, 1.0)
        safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
        eps = jnp.where(sigma > 0, (x - alpha * x0) / safe_sigma, eps)
        return x0, eps

    return x0_eps_fn


def batch_time(t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """A scalar time as the network's float32 [B]."""
    return jnp.full((x.shape[0],), t, jnp.float32)


def step_noise(rng: jax.Array, step: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """The fresh noise of loop step `step`: one key per step, folded in from the sampler key."""
    return jax.random.normal(jax.random.fold_in(rng, step), x.shape, x.dtype)


def check_num_steps(num_steps: Any, *, minimum: int, name: str) -> None:
    is_integer = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
    if not is_integer or num_steps < minimum:
        raise ValueError(
            f"num_steps for sampler {name!r} must be an integer >= {minimum}, got {num_steps!r}"
        )


def check_choice(value: Any, allowed: tuple, *, option: str) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {option} {value!r}; allowed: {list(allowed)}")


def check_prediction_at(
    prediction: str, alpha_first: float, sigma_last: float, *, name: str
) -> None:
    """Raise if the prediction cannot be turned into (x0, eps) where the sampler evaluates it.

    eps and score give x0 = (x - sigma eps) / alpha, undefined where alpha = 0 (pure noise, e.g.
    rectified flow at t = 1 or a zero-terminal-SNR schedule); x0 gives eps = (x - alpha x0) /
    sigma, undefined where sigma = 0. v and velocity are defined everywhere.
    """
    parameterization.check_prediction(prediction)
    if prediction in ("eps", "score") and not alpha_first > 0:
        raise ValueError(
            f"Sampler {name!r} cannot use prediction {prediction!r} on this schedule: alpha = 0 "
            "where sampling starts, so x0 = (x - sigma eps) / alpha is undefined. Allowed there: "
            "'x0', 'v', 'velocity' (or start at t_max < 1)."
        )
    if prediction == "x0" and not sigma_last > 0:
        raise ValueError(
            f"Sampler {name!r} cannot use prediction 'x0' here: sigma = 0 at its last evaluation, "
            "so eps = (x - alpha x0) / sigma is undefined. Allowed there: 'eps', 'v', 'velocity', "
            "'score' (or end at t_min > 0)."
        )


def x0_eps_at(x0_eps_fn: X0EpsFn, schedule, model_fn: ModelFn, x, t, cond):
    """(x0, eps) of the model at x and the continuous time t (a scalar) of a NoiseSchedule."""
    alpha, sigma = schedule.alpha_sigma(t)
    return x0_eps_fn(model_fn, x, batch_time(schedule.model_time(t), x), alpha, sigma, cond)


def check_finite_log_snr(schedule, *, name: str) -> None:
    """Samplers that step in log-SNR need it finite at both ends of [t_min, t_max]."""
    ends = jnp.asarray([schedule.t_max, schedule.t_min], jnp.float32)
    if not bool(jnp.all(jnp.isfinite(schedule.log_snr(ends)))):
        raise ValueError(
            f"Sampler {name!r} steps in log-SNR, which is infinite at t_min={schedule.t_min} or "
            f"t_max={schedule.t_max} of this schedule; choose 0 < t_min < t_max < 1 for a flow "
            "schedule, or use 'flow_euler', 'flow_heun' or 'ode'."
        )
