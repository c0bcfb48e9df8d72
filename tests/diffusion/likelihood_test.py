"""The variational bound of the exact optimal model on Gaussian data, and the decoder."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import likelihood, schedules, vlb
from diffusion_jax.diffusion import process as process_lib
from tests import gaussian_data

MEAN, STD = 0.3, 0.5


def _respaced(num_steps):
    return process_lib.respace(schedules.get_betas("linear", 1000), num_steps, "linspace")


def _exact_model(process):
    """The optimal eps-model of the Gaussian data, called with the network's time."""
    alphas = process.sqrt_alphas_cumprod
    sigmas = process.sqrt_one_minus_alphas_cumprod
    lookup = (
        jnp.zeros(1000, jnp.int32)
        .at[process.model_timesteps]
        .set(jnp.arange(process.num_timesteps))
    )

    def model_fn(x_t, network_time):
        step = lookup[network_time.astype(jnp.int32)][:, None]
        return gaussian_data.optimal_eps(x_t, alphas[step], sigmas[step], mean=MEAN, std=STD)

    return model_fn


def _analytic_negative_elbo_nats(betas):
    """Expected -ELBO per dim of the optimal model, with fixed-small variance (float64).

    Each KL has equal variances, so it is coef1^2 Var(x_0 | x_t) / (2 beta_tilde); the decoder
    is N(x_0; E[x_0 | x_t], beta_tilde_1); the prior is KL(N(a x_0, s^2) || N(0, 1)).
    """
    alphas_cumprod = np.cumprod(1 - betas)
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    beta_tilde = betas * (1 - previous) / (1 - alphas_cumprod)
    coef1 = betas * np.sqrt(previous) / (1 - alphas_cumprod)
    var_x0 = STD**2 * (1 - alphas_cumprod) / (alphas_cumprod * STD**2 + 1 - alphas_cumprod)
    kl_terms = coef1[1:] ** 2 * var_x0[1:] / (2 * beta_tilde[1:])
    decoder = 0.5 * np.log(2 * np.pi * beta_tilde[1]) + var_x0[0] / (2 * beta_tilde[1])
    a_sq, s_sq = alphas_cumprod[-1], 1 - alphas_cumprod[-1]
    prior = 0.5 * (s_sq + a_sq * (MEAN**2 + STD**2) - 1 - np.log(s_sq))
    return decoder + kl_terms.sum() + prior


@pytest.fixture(scope="module")
def data():
    return MEAN + STD * jax.random.normal(jax.random.key(0), (4096, 8))


@pytest.mark.parametrize("num_steps", [10, 100, 1000])
def test_negative_elbo_of_optimal_model_matches_closed_form(data, num_steps):
    process = _respaced(num_steps)
    result = jax.jit(
        lambda x, key: likelihood.bits_per_dim(
            process, _exact_model(process), x, key, decoder="gaussian"
        )
    )(data, jax.random.key(1))
    measured_nats = float(jnp.mean(result["total"])) * np.log(2)
    betas = schedules.respace_betas(
        schedules.get_betas("linear", 1000), schedules.spaced_timesteps(1000, num_steps)
    )
    np.testing.assert_allclose(measured_nats, _analytic_negative_elbo_nats(betas), rtol=0.02)


def test_negative_elbo_bounds_true_nll_and_gap_shrinks_with_steps():
    true_nll = gaussian_data.gaussian_nll_nats(STD)
    gaps = []
    for num_steps in (10, 50, 200, 1000):
        betas = schedules.respace_betas(
            schedules.get_betas("linear", 1000), schedules.spaced_timesteps(1000, num_steps)
        )
        gaps.append(_analytic_negative_elbo_nats(betas) - true_nll)
    # Figures (nats/dim): about 454.6, 29.0, 3.48, 0.570 for K = 10, 50, 200, 1000.
    assert all(gap > 0 for gap in gaps), gaps
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1.0


def test_per_term_output_and_decoder_at_step_zero(data):
    process = _respaced(20)
    result = likelihood.bits_per_dim(process, _exact_model(process), data[:64], jax.random.key(2))
    assert result["terms"].shape == (64, 20)
    np.testing.assert_allclose(
        result["total"], result["prior"] + result["terms"].sum(axis=1), rtol=1e-5
    )
    assert np.all(np.asarray(result["terms"])[:, 1:] >= -1e-6)  # KLs are non-negative


def test_discretized_decoder_sums_to_one_over_256_bins():
    bins = (2 * jnp.arange(256) - 255) / 255.0  # [256]
    for mean, log_scale in [(0.0, -3.0), (0.97, -5.0), (-1.2, 0.5), (0.3, -9.0)]:
        log_probs = vlb.discretized_gaussian_log_likelihood(
            bins, means=jnp.full(256, mean), log_scales=jnp.full(256, log_scale)
        )
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_probs))), 1.0, rtol=1e-4)


def test_discretized_decoder_matches_integral_of_the_density():
    from scipy.stats import norm

    x, mean, scale = (2 * 140 - 255) / 255.0, 0.1, 0.05  # the centre of bin k = 140
    expected = norm.cdf(x + 1 / 255, mean, scale) - norm.cdf(x - 1 / 255, mean, scale)
    got = vlb.discretized_gaussian_log_likelihood(
        jnp.array([x]), means=jnp.array([mean]), log_scales=jnp.log(jnp.array([scale]))
    )
    np.testing.assert_allclose(np.exp(float(got[0])), expected, rtol=1e-4)


def test_bits_per_dim_compiles_once():
    process = _respaced(10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def bpd(x, key):
        return likelihood.bits_per_dim(process, _exact_model(process), x, key)["total"]

    for seed in range(3):
        x = jax.random.uniform(jax.random.key(seed), (4, 3), minval=-1, maxval=1)
        assert np.all(np.isfinite(bpd(x, jax.random.key(seed))))


def test_normal_kl_against_closed_form():
    kl = vlb.normal_kl(1.0, jnp.log(4.0), 0.0, 0.0)
    np.testing.assert_allclose(kl, 0.5 * (4.0 + 1.0 - 1.0 - np.log(4.0)), rtol=1e-6)
    assert float(vlb.normal_kl(0.3, -1.0, 0.3, -1.0)) == 0.0
