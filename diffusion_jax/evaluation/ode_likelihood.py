"""Exact likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

The probability-flow ODE dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat (the drift
f x - g^2 score / 2 of Eq. 13, written with the denoiser) moves p_t into p_s deterministically,
and along a solution the density obeys the instantaneous change of variables (Chen et al. 2018,
Theorem 1): d log p_t(x(t)) / dt = -div v(x(t), t). Integrating [x, I] with dI/dt = div v from
t_min to t_max gives

    log p_{t_min}(x) = log p_prior(x(t_max)) + I(t_max),   p_prior = N(0, sigma_{t_max}^2 I).

The divergence is either exact (D forward-mode products, for small D) or Hutchinson's unbiased
estimate E_z[z^T (dv/dx) z] with one Rademacher or Gaussian probe z per example, held fixed
along the solution (FFJORD, Grathwohl et al. 2019).

8-bit images are discrete, so their density is not a likelihood. Uniform dequantization
(Theis et al. 2016; score_sde's `likelihood.py`) turns the integer k in 0..L-1 into
u = (k + U) / L in [0, 1], U ~ U[0, 1)^D, and the model sees x = 2u - 1. Then
-log2 P(k) <= -log2 p_x(x) / D + log2(L) - 1 per dimension in expectation over U: log2 L
for the bin width 1/L of u, -1 for the factor 2 of x = 2u - 1 (for L = 256 the offset is 7, as
score_sde's `log2(grad inverse_scaler) + 8`). This is not the discrete variational bound of
`diffusion_jax.diffusion.likelihood` (DDPM's bits/dim): the two are different numbers; report which.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.samplers import common, ode

DIVERGENCES = ("exact", "rademacher", "gaussian")
SOLVERS = ode.SOLVERS
INITIAL_STEPS = 100  # the first step is 1/100 of the interval; the controller adapts it

# log_likelihood_fn(model_fn, x [B, ...], rng, cond=None) -> dict of arrays
LogLikelihoodFn = Callable[..., dict[str, jnp.ndarray]]


def _sum_over_dims(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def gaussian_prior_log_prob(z: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
    """log N(z; 0, sigma^2 I) summed over each example's dimensions: [B] in nats."""
    dims = np.prod(z.shape[1:])
    return -0.5 * _sum_over_dims(z**2) / sigma**2 - dims * (
        0.5 * np.log(2 * np.pi) + jnp.log(sigma)
    )


def draw_probe(rng: jax.Array, shape: tuple[int, ...], divergence: str) -> jnp.ndarray:
    """A Hutchinson probe with E[z z^T] = I: Rademacher (+-1) or standard normal."""
    if divergence == "rademacher":
        return jax.random.rademacher(rng, shape, jnp.float32)
    return jax.random.normal(rng, shape, jnp.float32)


def make_divergence_fn(divergence: str) -> Callable:
    """`div(fn, x [B, ...], probe) -> (fn(x), div_x fn [B])`, per example.

    fn must act on each example separately (no batch statistics), so that its Jacobian is
    block diagonal and a jvp with a batch of probes gives every example's z^T J z at once.
    """
    common.check_choice(divergence, DIVERGENCES, option="divergence")

    def hutchinson(fn, x, probe):
        value, jacobian_probe = jax.jvp(fn, (x,), (probe,))
        return value, _sum_over_dims(probe * jacobian_probe)

    def exact(fn, x, probe):
        del probe
        dims = int(np.prod(x.shape[1:]))
        basis = jnp.eye(dims, dtype=x.dtype).reshape(dims, 1, *x.shape[1:])  # [D, 1, ...]

        def diagonal_term(direction):
            tangent = jnp.broadcast_to(direction, x.shape)
            return _sum_over_dims(direction * jax.jvp(fn, (x,), (tangent,))[1])  # [B]

        return fn(x), jnp.sum(jax.lax.map(diagonal_term, basis), axis=0)

    return exact if divergence == "exact" else hutchinson


def make_ode_log_likelihood_fn(
    schedule,
    *,
    prediction: str = "eps",
    variance_type: str = "fixed_small",
    divergence: str = "rademacher",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    step_to_kinks: bool = False,
) -> LogLikelihoodFn:
    """`fn(model_fn, x, rng, cond=None)` -> log p_{t_min}(x) in nats by the probability-flow ODE.

    `schedule` is a NoiseSchedule or a discrete DiffusionProcess (read in DPM-Solver's
    discrete-time convention, t in [1/T, 1]); `model_fn(x, t, cond)` as the samplers see it.
    Returns "log_likelihood" [B] = "prior_log_prob" [B] + "delta_log_prob" [B], "z" (x at
    t_max) and "nfe", the evaluations of the augmented field (each one network jvp). The
    whole batch shares one adaptive step sequence (its error norm covers every example).
    `step_to_kinks` lands the steps on a discrete process's steps (`ode.step_size_controller`:
    ~20x more accurate on DDPM's schedule, at least 6 T evaluations).
    """
    common.check_choice(solver, tuple(SOLVERS), option="ode likelihood solver")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    schedule = noise_schedule.as_noise_schedule(schedule)
    x0_eps_fn = common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type)
    divergence_fn = make_divergence_fn(divergence)
    sigma_prior = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1]
    solve_options = dict(
        solver=solver, rtol=rtol, atol=atol, max_steps=max_steps, step_to_kinks=step_to_kinks
    )

    def log_likelihood(model_fn, x, rng, cond=None):
        probe = draw_probe(rng, x.shape, divergence)

        def augmented_field(t, state, args):
            (_, _), (dalpha, dsigma) = schedule.alpha_sigma_derivatives(t)

            def velocity(y):
                x0, eps = common.x0_eps_at(x0_eps_fn, schedule, model_fn, y, t, cond)
                return dalpha * x0 + dsigma * eps

            return divergence_fn(velocity, state[0], probe)  # (dx/dt, dI/dt = div v)

        (z, delta_log_prob), _, nfe = ode.solve_adaptive(
            augmented_field,
            (x, jnp.zeros((x.shape[0],), jnp.float32)),
            schedule=schedule,
            t0=schedule.t_min,
            t1=schedule.t_max,
            first_step=(schedule.t_max - schedule.t_min) / INITIAL_STEPS,
            **solve_options,
        )
        prior_log_prob = gaussian_prior_log_prob(z, sigma_prior)
        return {
            "log_likelihood": prior_log_prob + delta_log_prob,
            "prior_log_prob": prior_log_prob,
            "delta_log_prob": delta_log_prob,
            "z": z,
            "nfe": jnp.asarray(nfe, jnp.int32),
        }

    return log_likelihood


def uniform_dequantize(x: jnp.ndarray, rng: jax.Array, *, num_bins: int = 256) -> jnp.ndarray:
    """Data on the grid x = 2k / (L - 1) - 1, k = 0..L-1, to x = 2 (k + U) / L - 1, U ~ U[0, 1)."""
    levels = jnp.round((x + 1.0) * 0.5 * (num_bins - 1))
    noise = jax.random.uniform(rng, x.shape, jnp.float32)
    return 2.0 * (levels + noise) / num_bins - 1.0


def dequantization_offset_bits(num_bins: int) -> float:
    """Bits/dim to add to -log2 p_x(x) / D for the discrete data: log2(L) - 1 (7 for 8 bits)."""
    return float(np.log2(num_bins) - 1.0)


def make_ode_bits_per_dim_fn(
    schedule, *, num_bins: int | None = 256, **likelihood_options
) -> LogLikelihoodFn:
    """`fn(model_fn, x, rng, cond=None)` -> {"bits_per_dim" [B], "nfe", ...}.

    With `num_bins` L, x is discrete data on the L-level grid of [-1, 1] (256: 8-bit images):
    it is uniformly dequantized and "bits_per_dim" bounds -log2 P(k) / D of the discrete data
    (in expectation over the dequantization noise). With `num_bins=None`, x is continuous and
    "bits_per_dim" is -log2 p(x) / D of the density. Options: `make_ode_log_likelihood_fn`'s.
    """
    if num_bins is not None and not (isinstance(num_bins, int) and num_bins >= 2):
        raise ValueError(f"num_bins={num_bins!r}; allowed: an integer >= 2 or None (continuous)")
    log_likelihood_fn = make_ode_log_likelihood_fn(schedule, **likelihood_options)
    offset = 0.0 if num_bins is None else dequantization_offset_bits(num_bins)

    def bits_per_dim(model_fn, x, rng, cond=None):
        dequantize_rng, probe_rng = jax.random.split(rng)
        if num_bins is not None:
            x = uniform_dequantize(x, dequantize_rng, num_bins=num_bins)
        result = log_likelihood_fn(model_fn, x, probe_rng, cond)
        dims = np.prod(x.shape[1:])
        result["bits_per_dim"] = -result["log_likelihood"] / (dims * np.log(2.0)) + offset
        return result

    return bits_per_dim
