"""The variational bound of the exact optimal model on Gaussian data, and the decoder."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.datasets import load_digits

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


# --- Float32 precision against independent float64 (NumPy/SciPy) evaluations -------------

BINS = (2 * np.arange(256) - 255) / 255.0  # the 256 levels of 8-bit data in [-1, 1]
LOG_MIN_BIN_MASS = np.log(1e-12)  # the decoder's floor on a bin's mass


def _float64_discretized_log_likelihood(x, means, log_scales):
    """Eq. 13 of Ho et al. 2020 in float64 (SciPy), each bin's mass taken where it is accurate.

    A bin above the mean as the difference of two survival functions, one below it as the
    difference of two CDFs, one around it as 1 minus both tails (log1p, exact near log 1 = 0),
    the edge bins as log CDF and log survival function. Masses floored at 1e-12.
    """
    x, means, log_scales = (np.asarray(v, np.float64) for v in (x, means, log_scales))
    inv_std = np.exp(-log_scales)
    a = inv_std * (x - means - 1 / 255)
    b = inv_std * (x - means + 1 / 255)
    with np.errstate(divide="ignore"):
        interior = np.where(
            a > 0,
            np.log(norm.sf(a) - norm.sf(b)),
            np.where(
                b < 0,
                np.log(norm.cdf(b) - norm.cdf(a)),
                np.log1p(-(norm.cdf(a) + norm.sf(b))),
            ),
        )
    log_probs = np.where(x < -0.999, norm.logcdf(b), np.where(x > 0.999, norm.logsf(a), interior))
    return np.maximum(log_probs, LOG_MIN_BIN_MASS)


def _decoder_grid():
    """x: all 256 levels; means in [-1.1, 1.1] (also on bin edges); scales from 1e-3 to 1."""
    process = process_lib.make_process("linear", 1000)
    # fixed_large (= fixed_small) at t = 0: log beta_tilde_1, Ho et al.'s clipped posterior.
    fixed_large_t0 = 0.5 * process_lib.model_log_variance(
        process, None, jnp.array([0]), variance_type="fixed_large", ndim=1
    )
    log_scales = np.concatenate(
        [
            np.asarray(fixed_large_t0, np.float64),
            np.log([1e-3, 3e-3]),
            0.5 * np.log([1e-4, 0.02]),  # sqrt(beta_1), sqrt(beta_T) of the linear schedule
            [-3.0, 0.0],
        ]
    )
    means = np.concatenate(
        [
            np.linspace(-1.1, 1.1, 221),
            np.random.default_rng(0).uniform(-1.1, 1.1, 100),
            BINS + 1 / 255,  # on the bin edges
        ]
    )
    grid = np.meshgrid(BINS, means, log_scales, indexing="ij")
    return [v.astype(np.float32).ravel() for v in grid]


def test_discretized_decoder_matches_float64_on_a_grid():
    """Every term to 1e-4 relative of the float64 value (measured: 1.9e-5; 0.77 before the
    survival-function form, which floored bins more than 5 std above the mean, their two CDFs
    rounding to 1, at log 1e-12 = -27.6 instead of e.g. -15.6).

    The absolute 1e-12 nats only matters where the log-likelihood itself is below 1e-8 in
    magnitude (a bin holding all but 1e-8 of the mass, or an edge bin far from the mean); an
    error of 1e-12 nats/dim there moves no bits/dim figure.
    """
    x, means, log_scales = _decoder_grid()
    got = jax.jit(
        lambda x, m, s: vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=s)
    )(x, means, log_scales)
    assert got.dtype == jnp.float32
    got = np.asarray(got, np.float64)
    want = _float64_discretized_log_likelihood(x, means, log_scales)
    error = np.abs(got - want)
    bad = error > 1e-4 * np.abs(want) + 1e-12
    assert not np.any(bad), (
        f"{bad.sum()} of {bad.size} terms off; worst relative error "
        f"{np.max(error / np.maximum(np.abs(want), 1e-30)):.2e}; first: x={x[bad][:3]}, "
        f"means={means[bad][:3]}, log_scales={log_scales[bad][:3]}, "
        f"got {got[bad][:3]}, float64 {want[bad][:3]}"
    )


def test_discretized_decoder_gradients_match_float64():
    """d log P / d mean and d log P / d log_scale against the float64 derivative of Eq. 13.

    With a, b the standardized bin edges and phi the normal density, d log P / d mean =
    -(phi(b) - phi(a)) / (scale P) and d log P / d log_scale = -(b phi(b) - a phi(a)) / P (the
    edge bins with phi(-inf) = phi(inf) = 0); both 0 where the mass is floored.
    """
    x, means, log_scales = _decoder_grid()
    want = _float64_discretized_log_likelihood(x, means, log_scales)
    x64, m64, s64 = (v.astype(np.float64) for v in (x, means, log_scales))
    inv_std = np.exp(-s64)
    a = np.where(x64 < -0.999, -np.inf, inv_std * (x64 - m64 - 1 / 255))
    b = np.where(x64 > 0.999, np.inf, inv_std * (x64 - m64 + 1 / 255))
    phi_a, phi_b = norm.pdf(a), norm.pdf(b)
    a_phi_a = np.where(np.isfinite(a), a, 0.0) * phi_a
    b_phi_b = np.where(np.isfinite(b), b, 0.0) * phi_b
    mass = np.exp(want)
    floored = want <= LOG_MIN_BIN_MASS
    want_mean = np.where(floored, 0.0, -inv_std * (phi_b - phi_a) / mass)
    want_log_scale = np.where(floored, 0.0, -(b_phi_b - a_phi_a) / mass)

    def total(m, s):
        return jnp.sum(vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=s))

    got_mean, got_log_scale = jax.jit(jax.grad(total, argnums=(0, 1)))(means, log_scales)
    got_mean, got_log_scale = np.asarray(got_mean), np.asarray(got_log_scale)
    # Away from the floor's kink; the absolute part covers derivatives that cross 0 (bins
    # near the mean), relative to their scale inv_std (mean) or 1 (log_scale).
    away = np.abs(want - LOG_MIN_BIN_MASS) > 1e-3
    np.testing.assert_array_less(
        np.abs(got_mean - want_mean)[away], (1e-3 * np.abs(want_mean) + 1e-4 * inv_std)[away]
    )
    np.testing.assert_array_less(
        np.abs(got_log_scale - want_log_scale)[away], (1e-3 * np.abs(want_log_scale) + 1e-4)[away]
    )


def test_discretized_decoder_finite_with_finite_gradients_at_extreme_inputs():
    means = np.array([-1e3, -30.0, -1.1, -1.0, 0.0, 0.5 / 255, 0.999, 1.0, 30.0, 1e3])
    log_scales = np.array([-30.0, -12.0, -7.0, -1.0, 0.0, 5.0, 12.0, 30.0])
    grid = np.meshgrid(BINS, means, log_scales, indexing="ij")
    x, m, s = (v.astype(np.float32).ravel() for v in grid)

    def total(m, s):
        return jnp.sum(vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=s))

    log_probs = vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=s)
    assert np.all(np.isfinite(log_probs))
    assert np.all(np.asarray(log_probs) >= np.float32(LOG_MIN_BIN_MASS))
    assert np.all(np.asarray(log_probs) <= 0.0)
    for gradient in jax.grad(total, argnums=(0, 1))(m, s):
        assert np.all(np.isfinite(gradient))
    # The 256 probabilities sum to 1 (up to 255 floored bins at 1e-12 each).
    probs = np.exp(np.asarray(log_probs, np.float64)).reshape(256, len(means), len(log_scales))
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-4)


def _digits_x0(num_examples):
    """The first sklearn digits (8x8, grey levels 0..16) on the 8-bit grid of [-1, 1], [N, 64]."""
    levels = np.round(load_digits().images[:num_examples].reshape(num_examples, 64) * 255 / 16)
    return ((2 * levels - 255) / 255).astype(np.float32)


def _float64_vlb_terms(betas, x0, x_t, eps, t, variance_type):
    """L_t in bits/dim [N] in float64 from the float32 inputs: Eqs. 6-7, 11, 13 of Ho et al.

    The KL of two Gaussians with the variance part exp(d) - 1 - d as expm1(d) - d (exact in
    float64 also where d ~ 1e-6); fixed_large's log variance is log beta_t, log beta_tilde_1
    at t = 0, fixed_small's the clipped log beta_tilde_t.
    """
    x0, x_t, eps = (np.asarray(v, np.float64) for v in (x0, x_t, eps))
    alphas_cumprod = np.cumprod(1 - betas)
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    beta_tilde = betas * (1 - previous) / (1 - alphas_cumprod)
    true_log_var = np.log(np.concatenate([[beta_tilde[1]], beta_tilde[1:]]))
    model_log_var = {
        "fixed_small": true_log_var,
        "fixed_large": np.log(np.concatenate([[beta_tilde[1]], betas[1:]])),
    }[variance_type]
    coef1 = betas * np.sqrt(previous) / (1 - alphas_cumprod)
    coef2 = (1 - previous) * np.sqrt(1 - betas) / (1 - alphas_cumprod)
    alpha, sigma = np.sqrt(alphas_cumprod)[t, None], np.sqrt(1 - alphas_cumprod)[t, None]
    pred_x0 = (x_t - sigma * eps) / alpha
    true_mean = coef1[t, None] * x0 + coef2[t, None] * x_t
    model_mean = coef1[t, None] * pred_x0 + coef2[t, None] * x_t
    log_var1, log_var2 = true_log_var[t, None], model_log_var[t, None]
    d = log_var1 - log_var2
    kl = 0.5 * (np.expm1(d) - d + (true_mean - model_mean) ** 2 * np.exp(-log_var2))
    decoder = -_float64_discretized_log_likelihood(x0, model_mean, 0.5 * log_var2)
    return np.where(t == 0, decoder.mean(axis=1), kl.mean(axis=1)) / np.log(2)


def _all_terms(num_examples, eps_error, variance_type):
    """Every term of 1000-step linear-schedule bounds of digits, float32 and float64 [K, N].

    The model's eps is the true noise plus eps_error times a standard normal (0: the exact
    model). Returns (float32 terms, float64 terms, float32 prior, float64 prior, in bits/dim).
    """
    betas = schedules.get_betas("linear", 1000)
    process = process_lib.DiffusionProcess.from_betas(betas)
    x0 = np.tile(_digits_x0(num_examples), (1000, 1))
    t = np.repeat(np.arange(1000), num_examples)
    noise_key, error_key = jax.random.split(jax.random.key(0))
    noise = jax.random.normal(noise_key, x0.shape)
    x_t = process_lib.q_sample(process, x0, jnp.asarray(t), noise)
    eps = noise + eps_error * jax.random.normal(error_key, x0.shape)
    got = jax.jit(
        lambda eps, x0, x_t, t: vlb.vlb_term_bits(
            process, eps, x0, x_t, t, variance_type=variance_type
        )
    )(eps, x0, x_t, jnp.asarray(t))
    want = _float64_vlb_terms(betas, x0, x_t, eps, t, variance_type)
    x0 = x0[:num_examples].astype(np.float64)
    prior = vlb.prior_bits(process, x0.astype(np.float32))
    log_var = np.log(1 - np.prod(1 - betas))  # KL(N(alpha_T x0, sigma_T^2) || N(0, 1))
    prior_want = np.mean(0.5 * (np.expm1(log_var) - log_var + np.prod(1 - betas) * x0**2), 1)
    shape = (1000, num_examples)
    return (
        np.asarray(got, np.float64).reshape(shape),
        want.reshape(shape),
        np.asarray(prior, np.float64),
        prior_want / np.log(2),
    )


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_kl_terms_near_t_equal_T_match_float64(variance_type):
    """The KL terms of the last 50 of 1000 steps, ~1.5e-8 bits each for a slightly wrong model.

    Measured per term: relative error 1.8e-3 (before the expm1 form: up to 20, terms of 1.8e-7
    bits instead of 1.2e-8, as -1 + log_var2 rounded to 5e-7 in float32); the exact model,
    whose terms are ~1e-17 (fixed_small) or ~1e-12 (fixed_large) bits, errs by 4e-13 bits at
    most (1.7e-7 before). What is left comes from the two posterior means, ~1 each, whose
    difference coef1 (x0 - x0_hat) ~ 2e-5 keeps float32's 6e-8 absolute precision.
    """
    near_T = slice(950, 1000)
    got, want, _, _ = _all_terms(4, 1e-3, variance_type)
    np.testing.assert_allclose(got[near_T], want[near_T], rtol=1e-2, atol=0)
    got, want, _, _ = _all_terms(4, 0.0, variance_type)
    np.testing.assert_allclose(got[near_T], want[near_T], rtol=0, atol=2e-12)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_total_bits_per_dim_matches_float64(variance_type):
    """Prior + 1000 terms of digits to 2e-5 bits/dim of the float64 bound (measured: 5.5e-6;
    2.0e-4 before, on the fourth digit: the decoder's mean, off by 1.4 std rms at t = 0 for
    this model, put pixels in bins the old decoder floored)."""
    got, want, prior, prior_want = _all_terms(4, 1.0, variance_type)
    np.testing.assert_allclose(got.sum(0) + prior, want.sum(0) + prior_want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(prior, prior_want, rtol=1e-5)  # 3e-5 relative before expm1
