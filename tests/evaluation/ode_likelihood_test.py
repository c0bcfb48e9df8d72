"""Probability-flow ODE likelihood against closed forms: Gaussian data and a Gaussian mixture.

With the exact score the ODE carries p_{t_min} onto p_{t_max} exactly, so
log p_{t_min}(x) = log p_{t_max}(z) + I: the density of the noised data is known in closed
form at both ends, and the only errors left are the solver's and Hutchinson's.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import gaussian_mixture, noise_schedule
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.evaluation import ode_likelihood
from tests import gaussian_data

MEAN = np.asarray([0.3, -0.5, 0.1], np.float32)
STD = 0.4
VP = noise_schedule.continuous_schedule("vp", t_min=1e-3, t_max=1.0)


def gaussian_log_prob(x, alpha, sigma):
    """log N(x; alpha MEAN, (alpha^2 STD^2 + sigma^2) I) summed over dimensions, [B]."""
    variance = alpha**2 * STD**2 + sigma**2
    return jnp.sum(
        -0.5 * (x - alpha * MEAN) ** 2 / variance - 0.5 * jnp.log(2 * jnp.pi * variance), -1
    )


def gaussian_model_fn(schedule):
    """The exact eps-prediction for N(MEAN, STD^2 I) data (the network's time in, eps out)."""

    def model_fn(x, model_t, cond=None):
        alpha, sigma = schedule.alpha_sigma(schedule.t_from_model_time(model_t))
        alpha, sigma = alpha[:, None], sigma[:, None]
        return gaussian_data.optimal_eps(x, alpha, sigma, mean=MEAN, std=STD)

    return model_fn


def gaussian_points(num: int, seed: int = 0) -> jnp.ndarray:
    return MEAN + STD * jax.random.normal(jax.random.key(seed), (num, 3))


def transport_error(result, x, schedule):
    """log p_{t_max}(z) + delta - log p_{t_min}(x) [B], both densities in closed form; the ODE
    makes it 0 (log p_{t_min}(x) = log p_{t_max}(z) + delta)."""
    alpha_min, sigma_min = schedule.alpha_sigma(jnp.float32(schedule.t_min))
    alpha_max, sigma_max = schedule.alpha_sigma(jnp.float32(schedule.t_max))
    start = gaussian_log_prob(x, alpha_min, sigma_min)
    end = gaussian_log_prob(result["z"], alpha_max, sigma_max)
    return end + result["delta_log_prob"] - start


DDPM = process_lib.make_process("linear", 1000)


@pytest.mark.parametrize(
    "schedule, step_to_kinks, atol, max_nfe",
    [(VP, False, 1e-4, 1000), (DDPM, True, 1e-3, 8000)],
    ids=["vp_continuous", "ddpm_discrete_onto_its_steps"],
)
def test_exact_divergence_matches_closed_form(schedule, step_to_kinks, atol, max_nfe):
    fn = ode_likelihood.make_ode_log_likelihood_fn(
        schedule, divergence="exact", step_to_kinks=step_to_kinks
    )
    view = noise_schedule.as_noise_schedule(schedule)
    x = gaussian_points(16)
    result = jax.jit(fn, static_argnums=0)(gaussian_model_fn(view), x, jax.random.key(1))
    np.testing.assert_allclose(transport_error(result, x, view), 0.0, atol=atol)
    # The N(0, sigma_T^2 I) prior is not p_T: alpha_T ~ 7e-3 leaves ~ alpha_T |MEAN . z| ~ 1e-2.
    alpha, sigma = view.alpha_sigma(jnp.float32(view.t_min))
    expected = gaussian_log_prob(x, alpha, sigma)
    np.testing.assert_allclose(result["log_likelihood"], expected, atol=3e-2)
    # 6 evaluations a step, 1 for the first, 1 more after each kink landed on.
    kinks = view.kink_times().size if step_to_kinks else 0
    assert 20 < int(result["nfe"]) < max_nfe and (int(result["nfe"]) - 1 - kinks) % 6 == 0


def test_stepping_over_a_discrete_schedules_kinks_trades_accuracy_for_evaluations():
    """DDPM's log alpha is piecewise linear in t: across its steps the field's slope jumps,
    which the embedded error estimate misses (measured: 4.9e-3 nats over 3 dimensions with
    721 evaluations, against 3.3e-4 with 6993 when the steps land on the kinks)."""
    view = noise_schedule.as_noise_schedule(DDPM)
    x = gaussian_points(16)
    errors, evaluations = {}, {}
    for step_to_kinks in (False, True):
        fn = ode_likelihood.make_ode_log_likelihood_fn(
            DDPM, divergence="exact", step_to_kinks=step_to_kinks
        )
        result = jax.jit(fn, static_argnums=0)(gaussian_model_fn(view), x, jax.random.key(1))
        errors[step_to_kinks] = float(jnp.max(jnp.abs(transport_error(result, x, view))))
        evaluations[step_to_kinks] = int(result["nfe"])
    assert errors[True] < 1e-3 < errors[False] < 1e-2, errors
    assert evaluations[False] < 1000 < 6 * 999 <= evaluations[True], evaluations


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    """z^T diag(d) z = sum d_i when z_i = +-1: for isotropic Gaussian data no estimator noise."""
    x = gaussian_points(8)
    model_fn = gaussian_model_fn(VP)
    results = [
        jax.jit(ode_likelihood.make_ode_log_likelihood_fn(VP, divergence=kind), static_argnums=0)(
            model_fn, x, jax.random.key(2)
        )
        for kind in ("exact", "rademacher")
    ]
    np.testing.assert_allclose(
        results[1]["log_likelihood"], results[0]["log_likelihood"], atol=1e-3
    )


def test_hutchinson_on_a_mixture_is_unbiased_within_its_error():
    """2-D mixture, non-diagonal Jacobian: the Hutchinson mean over probes hits the exact value."""
    mixture = gaussian_mixture.example_mixture()
    schedule = noise_schedule.continuous_schedule("vp", t_min=1e-2, t_max=1.0)
    model_fn = gaussian_mixture.exact_model_fn(
        mixture, lambda t: schedule.alpha_sigma(schedule.t_from_model_time(t))
    )
    # A point near each component and one between them (mixture.sample passes its shape
    # positionally to jax.random.categorical, which reads it as the axis).
    points = jnp.asarray([[-1.1, -0.4], [0.9, 0.1], [0.1, 1.1], [0.0, 0.3]])
    alpha, sigma = schedule.alpha_sigma(jnp.float32(schedule.t_min))
    expected = mixture.log_prob(points, alpha, sigma)  # [4]

    exact_fn = ode_likelihood.make_ode_log_likelihood_fn(schedule, divergence="exact")
    exact = jax.jit(exact_fn, static_argnums=0)(model_fn, points, jax.random.key(4))
    np.testing.assert_allclose(exact["log_likelihood"], expected, atol=5e-3)

    num_probes = 128
    repeated = jnp.repeat(points, num_probes, axis=0)  # one probe per row
    for kind in ("gaussian", "rademacher"):
        fn = ode_likelihood.make_ode_log_likelihood_fn(schedule, divergence=kind, rtol=1e-4)
        estimate = jax.jit(fn, static_argnums=0)(model_fn, repeated, jax.random.key(5))
        values = np.asarray(estimate["log_likelihood"]).reshape(4, num_probes)
        error = values.std(axis=1, ddof=1) / np.sqrt(num_probes)
        assert np.all(values.std(axis=1) > 1e-3), kind  # the estimator really is noisy here
        np.testing.assert_array_less(np.abs(values.mean(axis=1) - expected), 4 * error + 5e-3)


def test_dequantization_offset_and_bits_per_dim():
    """Uniform dequantization keeps each value in its bin; the offset is log2(L) - 1."""
    assert ode_likelihood.dequantization_offset_bits(256) == 7.0  # score_sde's log2(1/2) + 8
    levels = jnp.arange(256, dtype=jnp.float32)
    x = levels / 127.5 - 1.0  # the 8-bit grid of the data pipeline
    dequantized = ode_likelihood.uniform_dequantize(x, jax.random.key(6), num_bins=256)
    bins = jnp.floor((dequantized + 1.0) * 128.0)
    np.testing.assert_array_equal(bins, levels)

    # A model of uniform data on [-1, 1]^D would give -log2 p = D, i.e. 1 bit/dim of density,
    # and 1 + 7 = 8 bits/dim for 8-bit data: the bound is tight for a uniform discrete law.
    log_density = jnp.full((1,), -3 * np.log(2.0))
    bits = -log_density / (3 * np.log(2.0)) + ode_likelihood.dequantization_offset_bits(256)
    np.testing.assert_allclose(bits, 8.0)


def test_bits_per_dim_fn_continuous_and_compiles_once():
    fn = ode_likelihood.make_ode_bits_per_dim_fn(VP, num_bins=None, divergence="exact")
    model_fn = gaussian_model_fn(VP)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def bpd(x, rng):
        return fn(model_fn, x, rng)

    x = gaussian_points(8)
    first = bpd(x, jax.random.key(7))
    bpd(gaussian_points(8, seed=1), jax.random.key(8))
    alpha, sigma = VP.alpha_sigma(jnp.float32(VP.t_min))
    expected = -gaussian_log_prob(x, alpha, sigma) / (3 * np.log(2.0))
    np.testing.assert_allclose(first["bits_per_dim"], expected, atol=1e-2)  # the prior's 1e-2 nats


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"divergence": "trace"}, "divergence"),
        ({"solver": "euler"}, "solver"),
        ({"rtol": 0.0}, "rtol"),
        ({"num_bins": 1}, "num_bins"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ode_likelihood.make_ode_bits_per_dim_fn(VP, **options)
