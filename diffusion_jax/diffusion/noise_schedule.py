"""Continuous-time view of a noise schedule, shared by the continuous-time samplers.

A schedule here is x_t = alpha_t x_0 + sigma_t eps for t in [t_min, t_max], described by its
log-SNR lambda(t) = log(alpha_t^2 / sigma_t^2), the inverse t(lambda), the process family that
turns lambda into (alpha, sigma), and the time the network is conditioned on. Families:
- "vp":   alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (Ho et al. 2020; Song et al. 2021);
- "ve":   alpha = 1, sigma = exp(-lambda / 2) (Song et al. 2021; Karras et al. 2022);
- "flow": alpha = 1 - t, sigma = t (rectified flow, Liu et al. 2023; Lipman et al. 2023).

A discrete `DiffusionProcess` (network trained on integer steps n = 0..T-1) is read with the
convention of DPM-Solver (Lu et al. 2022, Sec. 3.4 and App. D): step n sits at t_n = (n + 1) / T,
log alpha is piecewise linear in t between the steps, and the network sees t * T - 1, which is
n at the steps and a fractional step in between.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.process import DiffusionProcess

KINDS = ("vp", "ve", "flow")
TIME_SPACINGS = ("log_snr", "time_uniform", "time_quadratic")


def alpha_sigma_of_log_snr(kind: str, log_snr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(alpha, sigma) of the family `kind` at log-SNR lambda; exact at lambda = +-inf."""
    if kind == "vp":
        return schedules.alpha_sigma_from_log_snr(log_snr)
    if kind == "ve":
        return jnp.ones_like(log_snr), jnp.exp(-0.5 * log_snr)
    if kind == "flow":  # (1 - t) / t = exp(lambda / 2)
        return jax.nn.sigmoid(0.5 * log_snr), jax.nn.sigmoid(-0.5 * log_snr)
    raise ValueError(f"Unknown schedule kind {kind!r}; allowed: {list(KINDS)}")


class NoiseSchedule(abc.ABC):
    """lambda(t), its inverse, (alpha_t, sigma_t) and the network's time, for t in [t_min, t_max].

    Subclasses define `log_snr`, `t_from_log_snr`, `model_time` and `t_from_model_time`; all
    methods take and return jnp arrays of any shape and work under jit.
    """

    kind: str
    t_min: float
    t_max: float

    @abc.abstractmethod
    def log_snr(self, t: jnp.ndarray) -> jnp.ndarray:
        """lambda(t) = log(alpha_t^2 / sigma_t^2), decreasing in t."""

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr: jnp.ndarray) -> jnp.ndarray:
        """The time t with lambda(t) = log_snr."""

    def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
        return t

    def t_from_model_time(self, model_time: jnp.ndarray) -> jnp.ndarray:
        return model_time

    def kink_times(self) -> np.ndarray:
        """Times in (t_min, t_max) where d alpha / dt and d sigma / dt jump (none: smooth)."""
        return np.zeros((0,), np.float64)

    def alpha_sigma(self, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return alpha_sigma_of_log_snr(self.kind, self.log_snr(t))

    def alpha_sigma_derivatives(
        self, t: jnp.ndarray
    ) -> tuple[tuple[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]:
        """((alpha, sigma), (d alpha / dt, d sigma / dt)) by forward-mode differentiation."""
        return jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))


class DiscreteSchedule(NoiseSchedule):
    """A discrete VP process seen in continuous time (DPM-Solver's discrete-time convention)."""

    kind = "vp"

    def __init__(self, process: DiffusionProcess):
        alphas_cumprod = np.asarray(process.alphas_cumprod, np.float64)
        if alphas_cumprod[-1] <= 0.0:
            raise ValueError(
                "This process has zero terminal SNR (alpha_bar = 0 at its last step); the "
                "continuous-time samplers need alpha_bar > 0 there. Allowed with it: ddpm, ddim."
            )
        steps = np.asarray(process.model_timesteps, np.float64)
        self.num_timesteps = float(steps[-1] + 1)
        self.knot_times = jnp.asarray((steps + 1.0) / self.num_timesteps, jnp.float32)
        self.knot_log_alphas = jnp.asarray(0.5 * np.log(alphas_cumprod), jnp.float32)
        self.t_min = float((steps[0] + 1.0) / self.num_timesteps)
        self.t_max = float((steps[-1] + 1.0) / self.num_timesteps)

    def log_alpha(self, t: jnp.ndarray) -> jnp.ndarray:
        return jnp.interp(t, self.knot_times, self.knot_log_alphas)

    def kink_times(self) -> np.ndarray:
        """The inner steps: log alpha is piecewise linear, so its slope jumps there (by ~20%
        between the first steps of the linear DDPM schedule)."""
        return np.asarray(self.knot_times, np.float64)[1:-1]

    def log_snr(self, t: jnp.ndarray) -> jnp.ndarray:
        log_alpha = self.log_alpha(t)
        return 2.0 * log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha))

    def t_from_log_snr(self, log_snr: jnp.ndarray) -> jnp.ndarray:
        log_alpha = -0.5 * jax.nn.softplus(-log_snr)
        return jnp.interp(log_alpha, self.knot_log_alphas[::-1], self.knot_times[::-1])

    def alpha_sigma(self, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

    def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
        return t * self.num_timesteps - 1.0

    def t_from_model_time(self, model_time: jnp.ndarray) -> jnp.ndarray:
        return (model_time + 1.0) / self.num_timesteps


class ContinuousSchedule(NoiseSchedule):
    """A log-SNR function of t in [t_min, t_max]; the inverse by bisection (lambda decreases)."""

    def __init__(
        self,
        log_snr_fn,
        *,
        kind: str = "vp",
        t_min: float = 1e-3,
        t_max: float = 1.0,
        model_time_scale: float = 1.0,
    ):
        if kind not in ("vp", "ve"):
            raise ValueError(f"ContinuousSchedule kind must be 'vp' or 've', got {kind!r}")
        if not 0.0 <= t_min < t_max:
            raise ValueError(f"Need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.log_snr_fn, self.kind = log_snr_fn, kind
        self.t_min, self.t_max, self.model_time_scale = t_min, t_max, model_time_scale

    def log_snr(self, t: jnp.ndarray) -> jnp.ndarray:
        return self.log_snr_fn(t)

    def t_from_log_snr(self, log_snr: jnp.ndarray) -> jnp.ndarray:
        def bisect(_, bounds):
            low, high = bounds
            middle = 0.5 * (low + high)
            above = self.log_snr_fn(middle) > log_snr  # the root lies later in time
            return jnp.where(above, middle, low), jnp.where(above, high, middle)

        low = jnp.full(jnp.shape(log_snr), self.t_min, jnp.float32)
        high = jnp.full(jnp.shape(log_snr), self.t_max, jnp.float32)
        low, high = jax.lax.fori_loop(0, 40, bisect, (low, high))
        return 0.5 * (low + high)

    def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
        return t * self.model_time_scale

    def t_from_model_time(self, model_time: jnp.ndarray) -> jnp.ndarray:
        return model_time / self.model_time_scale


class FlowSchedule(NoiseSchedule):
    """Rectified flow x_t = (1 - t) x_0 + t eps; lambda = 2 log((1 - t) / t), infinite at 0, 1."""

    kind = "flow"

    def __init__(self, *, t_min: float = 0.0, t_max: float = 1.0, model_time_scale: float = 1.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"Need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max, self.model_time_scale = t_min, t_max, model_time_scale

    def log_snr(self, t: jnp.ndarray) -> jnp.ndarray:
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, log_snr: jnp.ndarray) -> jnp.ndarray:
        return jax.nn.sigmoid(-0.5 * log_snr)

    def alpha_sigma(self, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return 1.0 - t, t

    def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
        return t * self.model_time_scale

    def t_from_model_time(self, model_time: jnp.ndarray) -> jnp.ndarray:
        return model_time / self.model_time_scale


def continuous_schedule(name: str, *, t_min: float = 1e-3, t_max: float = 1.0, **kwargs):
    """The named log-SNR schedule of `schedules.LOG_SNR_SCHEDULES` ("ve" is the VE family)."""
    log_snr_fn = schedules.get_log_snr_fn(name, **kwargs)
    kind = "ve" if name == "ve" else "vp"
    return ContinuousSchedule(log_snr_fn, kind=kind, t_min=t_min, t_max=t_max)


def as_noise_schedule(schedule: NoiseSchedule | DiffusionProcess) -> NoiseSchedule:
    """A NoiseSchedule as is; a DiffusionProcess through the discrete-time convention."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, DiffusionProcess):
        return DiscreteSchedule(schedule)
    raise ValueError(
        f"schedule must be a DiffusionProcess or a NoiseSchedule, got {type(schedule).__name__}"
    )


def time_grid(schedule: NoiseSchedule, num_steps: int, spacing: str = "log_snr") -> jnp.ndarray:
    """num_steps + 1 decreasing times from t_max to t_min (DPM-Solver's skip types).

    "log_snr": uniform in lambda; "time_uniform": uniform in t; "time_quadratic": uniform in
    sqrt(t) (DPM-Solver, App. D.1).
    """
    if spacing == "log_snr":
        log_snrs = jnp.linspace(
            schedule.log_snr(jnp.float32(schedule.t_max)),
            schedule.log_snr(jnp.float32(schedule.t_min)),
            num_steps + 1,
        )
        grid = schedule.t_from_log_snr(log_snrs)
    elif spacing == "time_uniform":
        grid = jnp.linspace(schedule.t_max, schedule.t_min, num_steps + 1)
    elif spacing == "time_quadratic":
        grid = jnp.linspace(schedule.t_max**0.5, schedule.t_min**0.5, num_steps + 1) ** 2
    else:
        raise ValueError(f"Unknown time_spacing {spacing!r}; allowed: {list(TIME_SPACINGS)}")
    # The ends are exact, whatever the rounding of the inverse.
    return grid.at[0].set(schedule.t_max).at[-1].set(schedule.t_min).astype(jnp.float32)
