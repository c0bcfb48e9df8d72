"""The forward process and reverse-step coefficients, against independent computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import parameterization, schedules
from diffusion_jax.diffusion import process as process_lib


@pytest.fixture(scope="module")
def linear_process():
    return process_lib.make_process("linear", 1000)


def test_posterior_equals_bayes_rule_in_float64(linear_process):
    """q(x_{t-1} | x_t, x_0) from q(x_{t-1} | x_0) q(x_t | x_{t-1}), by completing the square."""
    betas = schedules.get_betas("linear", 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 10, 250, 500, 998, 999])
    x0, x_t = rng.normal(size=(2, len(t), 3))
    prior_var = 1 - alphas_cumprod[t - 1]
    precision = 1 / prior_var + (1 - betas[t]) / betas[t]
    variance = 1 / precision
    mean = variance[:, None] * (
        (np.sqrt(alphas_cumprod[t - 1]) / prior_var)[:, None] * x0
        + (np.sqrt(1 - betas[t]) / betas[t])[:, None] * x_t
    )
    got_mean, got_var, got_log_var = process_lib.q_posterior_mean_variance(
        linear_process, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t)
    )
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var[:, 0], variance, rtol=1e-5)
    np.testing.assert_allclose(got_log_var[:, 0], np.log(variance), rtol=1e-5)


def test_posterior_at_step_zero_is_x0_and_log_variance_clipped(linear_process):
    x0, x_t = jnp.ones((1, 2)), 5 * jnp.ones((1, 2))
    mean, variance, log_variance = process_lib.q_posterior_mean_variance(
        linear_process, x0, x_t, jnp.array([0])
    )
    np.testing.assert_allclose(mean, x0, rtol=1e-6)
    assert float(variance[0, 0]) == 0.0
    np.testing.assert_allclose(log_variance[0, 0], np.log(linear_process.posterior_variance[1]))


def test_q_sample_moments(linear_process):
    x0 = jnp.full((20000, 1), 0.7)
    t = jnp.full((20000,), 300)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = process_lib.q_sample(linear_process, x0, t, noise)
    alpha_bar = float(linear_process.alphas_cumprod[300])
    stderr = np.sqrt((1 - alpha_bar) / 20000)
    assert abs(float(x_t.mean()) - np.sqrt(alpha_bar) * 0.7) < 5 * stderr
    np.testing.assert_allclose(float(x_t.var()), 1 - alpha_bar, rtol=0.05)


@pytest.mark.parametrize("source", parameterization.PREDICTIONS)
@pytest.mark.parametrize("target", parameterization.PREDICTIONS)
def test_conversions_round_trip(source, target):
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(2, 5, 3))
    log_snr = rng.uniform(-6, 6, size=(5, 1))
    alpha, sigma = schedules.alpha_sigma_from_log_snr(jnp.asarray(log_snr))
    x_t = alpha * x0 + sigma * eps
    source_value = parameterization.from_x0_eps(x0, eps, alpha, sigma, source)
    converted = parameterization.convert(
        source_value, x_t, alpha, sigma, source=source, target=target
    )
    expected = parameterization.from_x0_eps(x0, eps, alpha, sigma, target)
    np.testing.assert_allclose(converted, expected, rtol=2e-4, atol=2e-4)
    back = parameterization.convert(converted, x_t, alpha, sigma, source=target, target=source)
    np.testing.assert_allclose(back, source_value, rtol=2e-4, atol=2e-4)


def test_conversions_hold_for_ve_and_flow_processes():
    """The formulas need only x_t = alpha x0 + sigma eps, not alpha^2 + sigma^2 = 1."""
    x0, eps = np.random.default_rng(2).normal(size=(2, 4))
    for alpha, sigma in [(1.0, 3.0), (0.3, 0.7)]:  # VE with sigma = 3; a rectified-flow time
        x_t = alpha * x0 + sigma * eps
        for prediction in parameterization.PREDICTIONS:
            value = parameterization.from_x0_eps(x0, eps, alpha, sigma, prediction)
            got_x0, got_eps = parameterization.to_x0_eps(value, x_t, alpha, sigma, prediction)
            np.testing.assert_allclose(got_x0, x0, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(got_eps, eps, rtol=1e-10, atol=1e-10)


def test_v_definition_and_flow_velocity():
    alpha, sigma = np.cos(0.4), np.sin(0.4)
    x0, eps = 0.3, -1.2
    assert parameterization.from_x0_eps(x0, eps, alpha, sigma, "v") == pytest.approx(
        alpha * eps - sigma * x0
    )
    assert parameterization.from_x0_eps(x0, eps, alpha, sigma, "velocity") == pytest.approx(
        eps - x0
    )
    assert parameterization.from_x0_eps(x0, eps, alpha, sigma, "score") == pytest.approx(
        -eps / sigma
    )


def test_p_mean_variance_with_the_true_eps_recovers_the_posterior(linear_process):
    rng = np.random.default_rng(3)
    x0, eps = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 4, 6)))
    t = jnp.array([1, 100, 500, 900])
    x_t = process_lib.q_sample(linear_process, x0, t, eps)
    out = process_lib.p_mean_variance(linear_process, eps, x_t, t, prediction="eps")
    mean, _, log_var = process_lib.q_posterior_mean_variance(linear_process, x0, x_t, t)
    np.testing.assert_allclose(out["mean"], mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["pred_x0"], x0, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["log_variance"], log_var)


def test_variance_types(linear_process):
    t = jnp.array([0, 1, 500, 999])
    x_t = jnp.zeros((4, 2))
    small_log = linear_process.posterior_log_variance_clipped[t]
    large = np.array(linear_process.betas)
    large[0] = linear_process.posterior_variance[1]
    expected = {"fixed_small": small_log, "fixed_large": np.log(large[np.asarray(t)])}
    for variance_type, log_var in expected.items():
        out = process_lib.p_mean_variance(linear_process, x_t, x_t, t, variance_type=variance_type)
        np.testing.assert_allclose(out["log_variance"][:, 0], log_var, rtol=1e-6)
    # learned_range, Eq. 15 of Nichol & Dhariwal: v = 1 gives beta, v = 0 gives beta_tilde.
    for value, log_var in [(1.0, np.log(linear_process.betas[t])), (-1.0, small_log)]:
        output = jnp.concatenate([x_t, jnp.full_like(x_t, value)], axis=-1)
        out = process_lib.p_mean_variance(
            linear_process, output, x_t, t, variance_type="learned_range"
        )
        np.testing.assert_allclose(out["log_variance"][:, 0], log_var, rtol=1e-6)
    output = jnp.concatenate([x_t, jnp.full_like(x_t, -3.0)], axis=-1)
    out = process_lib.p_mean_variance(linear_process, output, x_t, t, variance_type="learned")
    np.testing.assert_allclose(out["log_variance"], -3.0)


def test_respaced_process_keeps_original_times_and_alphas_cumprod():
    betas = schedules.get_betas("linear", 1000)
    respaced = process_lib.respace(betas, 50, "trailing")
    full = process_lib.DiffusionProcess.from_betas(betas)
    steps = schedules.spaced_timesteps(1000, 50, "trailing")
    np.testing.assert_array_equal(respaced.model_timesteps, steps)
    np.testing.assert_allclose(respaced.alphas_cumprod, full.alphas_cumprod[steps], rtol=1e-6)
    np.testing.assert_allclose(
        process_lib.model_time(respaced, jnp.array([0, 49])), [steps[0], steps[-1]]
    )


def test_q_sample_compiles_once_and_agrees_under_transforms(linear_process):
    # (chex reads the qualname: a test name with "pmap." in it looks transformed to it.)
    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(process, x0, t, noise):
        return process_lib.q_sample(process, x0, t, noise)

    x0 = jnp.ones((8, 4, 4, 3))
    for seed in range(3):
        t = jax.random.randint(jax.random.key(seed), (8,), 0, 1000)
        reference = sample(linear_process, x0, t, x0)
    per_example = jax.vmap(
        lambda x, s, n: process_lib.q_sample(linear_process, x[None], s[None], n[None])[0]
    )(x0, t, x0)
    np.testing.assert_allclose(per_example, reference, rtol=1e-6)
    devices = jax.local_device_count()
    pmapped = jax.pmap(process_lib.q_sample, in_axes=(None, 0, 0, 0))(
        linear_process,
        x0.reshape(devices, -1, 4, 4, 3),
        t.reshape(devices, -1),
        x0.reshape(devices, -1, 4, 4, 3),
    )
    np.testing.assert_allclose(pmapped.reshape(reference.shape), reference, rtol=1e-6)


def test_bad_variance_type_and_prediction():
    process = process_lib.make_process("linear", 10 * 100)
    with pytest.raises(ValueError, match="allowed"):
        process_lib.p_mean_variance(process, jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0]),
                                    variance_type="fixed")  # fmt: skip
    with pytest.raises(ValueError, match="allowed"):
        parameterization.convert(jnp.zeros(2), jnp.zeros(2), 1.0, 1.0, source="noise", target="x0")
    with pytest.raises(ValueError, match="num_steps"):
        process_lib.respace(schedules.get_betas("linear", 100), 101)


def test_one_step_chain_has_finite_coefficients_for_every_variance_type():
    """A one-step respacing (K = 1) has no beta_tilde_1 to clip to: beta_0 stands in."""
    process = process_lib.respace(schedules.get_betas("linear", 1000), 1)
    x = jnp.ones((2, 3))
    for variance_type in ("fixed_small", "fixed_large"):
        out = process_lib.p_mean_variance(
            process, x, x, jnp.zeros(2, jnp.int32), variance_type=variance_type
        )
        # beta_0 of the one step T-1 -> 0 is 1 - alpha_bar_999 ~ 1 - 4e-5: absolute tolerance
        # for a log near 0 (its float32 beta resolves 6e-8).
        np.testing.assert_allclose(
            out["log_variance"][:, 0], np.log(process.betas[0]), rtol=1e-6, atol=1e-7
        )
