"""Training losses: optimal values on Gaussian data, weightings, stop-gradients, pmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import losses, parameterization, schedules, vlb
from diffusion_jax.diffusion import process as process_lib
from tests import gaussian_data

STD = 1.0


@pytest.fixture(scope="module")
def process():
    return process_lib.make_process("linear", 1000)


def _gaussian_batch(n=20000, dim=4, seed=0):
    return {"x": STD * jax.random.normal(jax.random.key(seed), (n, dim))}


def test_simple_loss_of_optimal_eps_model_equals_its_closed_form(process):
    """E||eps - eps*||^2 = alpha^2 s^2 / (alpha^2 s^2 + sigma^2), averaged over uniform t."""

    def apply_fn(params, x_t, network_time, label, rng):
        step = network_time.astype(jnp.int32)[:, None]
        alpha, sigma = (
            process.sqrt_alphas_cumprod[step],
            process.sqrt_one_minus_alphas_cumprod[step],
        )
        return gaussian_data.optimal_eps(x_t, alpha, sigma, mean=0.0, std=STD)

    loss_fn = losses.make_diffusion_loss_fn(process, apply_fn)
    loss, aux = jax.jit(loss_fn)(None, _gaussian_batch(), jax.random.key(1))
    alpha_sq = process.alphas_cumprod[aux["t"]]
    expected = alpha_sq * STD**2 / (alpha_sq * STD**2 + 1 - alpha_sq)
    np.testing.assert_allclose(float(loss), float(jnp.mean(expected)), rtol=0.02)


def test_flow_matching_loss_of_optimal_velocity_is_pi_over_two():
    """For N(0, 1) data the optimal u = eps - x0 leaves 1 / ((1-t)^2 + t^2); its mean is pi/2."""

    def apply_fn(params, x_t, network_time, label, rng):
        t = (network_time / 1000.0)[:, None]
        return x_t * (t - (1 - t)) / ((1 - t) ** 2 + t**2)

    loss_fn = losses.make_flow_matching_loss_fn(apply_fn)
    loss, _ = jax.jit(loss_fn)(None, _gaussian_batch(40000, 4), jax.random.key(2))
    np.testing.assert_allclose(float(loss), np.pi / 2, rtol=0.03)


def test_edm_loss_of_the_exact_denoiser_is_one_when_sigma_data_is_the_data_std():
    """lambda(sigma) E||D* - x0||^2 = 1 when D* is exact and sigma_data = std (Eq. 8, Table 1)."""
    sigma_data = 0.5

    def apply_fn(params, scaled_x, c_noise, label, rng):
        sigma = jnp.exp(4.0 * c_noise)[:, None]
        c_skip, c_out, c_in, _ = parameterization.edm_preconditioning(sigma, sigma_data=sigma_data)
        x = scaled_x / c_in
        denoised = x * sigma_data**2 / (sigma_data**2 + sigma**2)
        return (denoised - c_skip * x) / c_out

    loss_fn = losses.make_edm_loss_fn(apply_fn, sigma_data=sigma_data)
    batch = {"x": sigma_data * jax.random.normal(jax.random.key(3), (20000, 4))}
    loss, _ = jax.jit(loss_fn)(None, batch, jax.random.key(4))
    np.testing.assert_allclose(float(loss), 1.0, rtol=0.02)


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS[1:])
def test_weightings_define_one_objective_whatever_the_target(process, weighting):
    """A weighting is of the x0 error, so eps, x0 and v predictions of one x0_hat score the same."""
    rng = np.random.default_rng(0)
    x0, noise, x0_hat = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(3, 6, 5)))
    t = jnp.array([0, 3, 100, 500, 900, 999])
    alpha, sigma = process_lib.alpha_sigma(process, t, 2)
    x_t = alpha * x0 + sigma * noise
    eps_hat = (x_t - alpha * x0_hat) / sigma
    values = [
        losses.simple_loss(
            process, parameterization.from_x0_eps(x0_hat, eps_hat, alpha, sigma, target),
            x0, noise, t, target=target, weighting=weighting, snr_gamma=5.0,
        )
        for target in losses.TARGETS
    ]  # fmt: skip
    np.testing.assert_allclose(values[0], values[1], rtol=2e-3)
    np.testing.assert_allclose(values[0], values[2], rtol=2e-3)


def test_min_snr_and_truncated_weights_closed_forms():
    snr = jnp.array([0.01, 1.0, 5.0, 100.0])
    np.testing.assert_allclose(
        losses.target_weight(snr, target="eps", weighting="min_snr", snr_gamma=5.0),
        np.minimum(snr, 5.0) / snr,
    )
    np.testing.assert_allclose(
        losses.target_weight(snr, target="v", weighting="min_snr", snr_gamma=5.0),
        np.minimum(snr, 5.0) / (snr + 1),
    )
    np.testing.assert_allclose(
        losses.target_weight(snr, target="x0", weighting="truncated_snr"), np.maximum(snr, 1.0)
    )
    np.testing.assert_allclose(losses.target_weight(snr, target="v", weighting="constant"), 1.0)


def _learned_variance_setup(process, loss_type):
    def apply_fn(params, x_t, network_time, label, rng):
        return jnp.concatenate([params["prediction"] * x_t, params["variance"] * x_t], axis=-1)

    params = {"prediction": jnp.full((4,), 0.3), "variance": jnp.full((4,), 0.2)}
    loss_fn = losses.make_diffusion_loss_fn(
        process, apply_fn, loss_type=loss_type, variance_type="learned_range"
    )
    return loss_fn, params


def test_hybrid_loss_trains_the_mean_only_through_the_simple_loss(process):
    batch = _gaussian_batch(64, 4)
    hybrid_fn, params = _learned_variance_setup(process, "hybrid")
    vlb_fn, _ = _learned_variance_setup(process, "vlb")
    rng = jax.random.key(5)
    hybrid_grad = jax.grad(lambda p: hybrid_fn(p, batch, rng)[0])(params)
    vlb_grad = jax.grad(lambda p: vlb_fn(p, batch, rng)[0])(params)

    def simple_only(p):
        _, aux = hybrid_fn(p, batch, rng)
        t = aux["t"]
        noise = jax.random.normal(jax.random.split(rng, 3)[1], batch["x"].shape)
        x_t = process_lib.q_sample(process, batch["x"], t, noise)
        return jnp.mean(losses.simple_loss(process, p["prediction"] * x_t, batch["x"], noise, t))

    np.testing.assert_allclose(
        hybrid_grad["prediction"], jax.grad(simple_only)(params)["prediction"], rtol=1e-5
    )
    assert np.all(np.abs(hybrid_grad["variance"]) > 0)
    assert np.all(np.abs(vlb_grad["prediction"]) > 0)  # the pure VLB does train the mean


@pytest.mark.parametrize("step", [0, 999])
@pytest.mark.parametrize("target", losses.TARGETS)
@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_losses_finite_and_differentiable_at_the_end_steps(process, step, target, weighting):
    x0 = jnp.linspace(-1, 1, 8).reshape(2, 4)
    noise = jnp.cos(jnp.arange(8.0)).reshape(2, 4)
    t = jnp.full((2,), step)
    x_t = process_lib.q_sample(process, x0, t, noise)

    def total(scale):
        output = jnp.concatenate([scale * x_t, jnp.tanh(scale * x_t)], axis=-1)
        prediction, _ = process_lib.split_output(output, "learned_range")
        simple = losses.simple_loss(
            process, prediction, x0, noise, t, target=target, weighting=weighting
        )
        bits = vlb.vlb_term_bits(
            process, output, x0, x_t, t, prediction=target, variance_type="learned_range"
        )
        return jnp.sum(simple + bits)

    value, grad = jax.value_and_grad(total)(0.5)
    assert np.isfinite(float(value)) and np.isfinite(float(grad))


def test_loss_under_pmap_with_mean_over_devices_equals_single_device(process):
    devices = jax.local_device_count()
    assert devices == 8, "tests/conftest.py sets 8 fake CPU devices"
    rng = np.random.default_rng(6)
    x0, noise, prediction = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(3, 32, 4, 4, 3)))
    t = jnp.asarray(rng.integers(0, 1000, 32))

    def loss(prediction, x0, noise, t):
        simple = losses.simple_loss(process, prediction, x0, noise, t, weighting="min_snr")
        x_t = process_lib.q_sample(process, x0, t, noise)
        return jnp.mean(simple + vlb.vlb_term_bits(process, prediction, x0, x_t, t))

    single = jax.jit(loss)(prediction, x0, noise, t)
    shard = lambda a: a.reshape((devices, -1) + a.shape[1:])
    per_device = jax.pmap(lambda *args: jax.lax.pmean(loss(*args), "devices"), axis_name="devices")(
        shard(prediction), shard(x0), shard(noise), shard(t)
    )
    np.testing.assert_allclose(np.asarray(per_device), float(single), rtol=1e-5)


def test_loss_fn_compiles_once(process):
    def apply_fn(params, x_t, network_time, label, rng):
        return params * x_t

    loss_fn = losses.make_diffusion_loss_fn(process, apply_fn, target="v", weighting="min_snr")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, batch, rng):
        return jax.value_and_grad(lambda p: loss_fn(p, batch, rng)[0])(params)

    for seed in range(3):
        value, grad = step(jnp.float32(0.5), _gaussian_batch(16, 3, seed), jax.random.key(seed))
        assert np.isfinite(float(value)) and np.isfinite(float(grad))


def test_label_dropout_replaces_labels_with_the_null_class():
    seen = {}

    def inner(params, batch, rng, loss_history=None):
        seen["label"] = batch["label"]
        return jnp.float32(0.0), {}

    dropped = losses.with_label_dropout(inner, rate=0.25, null_label=10)
    dropped(
        None, {"x": jnp.zeros((4000, 2)), "label": jnp.zeros(4000, jnp.int32)}, jax.random.key(0)
    )
    fraction = float(jnp.mean(seen["label"] == 10))
    assert set(np.unique(seen["label"])) == {0, 10}
    assert abs(fraction - 0.25) < 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="l1"), "diffusion.loss_type"),
        (dict(target="score"), "diffusion.target"),
        (dict(weighting="p2"), "diffusion.loss_weighting"),
        (dict(variance_type="learned_range"), "must be 'hybrid' or 'vlb'"),
        (dict(variance_type="small"), "diffusion.variance_type"),
    ],
)
def test_bad_loss_options_raise(process, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loss_fn = losses.make_diffusion_loss_fn(process, lambda *a: a[1], **kwargs)
        loss_fn(None, _gaussian_batch(2, 2), jax.random.key(0))


@pytest.mark.parametrize("schedule,num_timesteps", [("linear", 1000), ("cosine", 4000)])
def test_snr_weight_is_float64_accurate_at_small_t(schedule, num_timesteps):
    """The weight of an x0 error under "snr" is alpha_bar / (1 - alpha_bar) to float32's
    precision even at t = 0, where 1 - alpha_bar in float32 loses 1e-4 to 3e-3 of it."""
    process = process_lib.make_process(schedule, num_timesteps)
    alphas_cumprod = np.cumprod(1.0 - schedules.get_betas(schedule, num_timesteps))
    t = jnp.arange(8)
    x0 = jnp.zeros((8, 2))
    noise = jnp.zeros((8, 2))
    unit_error = jnp.ones((8, 2))  # prediction - x0 = 1 everywhere
    weights = losses.simple_loss(process, unit_error, x0, noise, t, target="x0", weighting="snr")
    expected = alphas_cumprod[:8] / (1.0 - alphas_cumprod[:8])
    np.testing.assert_allclose(weights, expected, rtol=3e-6)


def test_eps_target_is_refused_on_a_zero_terminal_snr_schedule():
    """alpha_T = 0 makes x0 = (x_T - sigma eps) / alpha undefined: the bound is infinite at
    t = T (Lin et al. 2024, Sec. 3.2 train such schedules with v-prediction)."""
    process = process_lib.make_process("linear", 100, zero_terminal_snr=True)
    apply_fn = lambda params, x_t, network_time, label, rng: params * x_t
    with pytest.raises(ValueError, match=r"diffusion.target='eps'.*zero_terminal_snr.*'v', 'x0'"):
        losses.make_diffusion_loss_fn(process, apply_fn, loss_type="simple", target="eps")


def test_v_target_bound_is_finite_at_the_zero_snr_step():
    """With v-prediction, the last step of a zero-terminal-SNR chain has a finite bound term:
    the exact v at x_T = eps is -x0, so the posterior mean is exact and L_T is the KL of two
    equal Gaussians, 0."""
    process = process_lib.make_process("linear", 100, zero_terminal_snr=True)
    x0 = jax.random.uniform(jax.random.key(0), (4, 3), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.key(1), (4, 3))
    t = jnp.full((4,), 99)
    x_t = process_lib.q_sample(process, x0, t, noise)
    v = parameterization.from_x0_eps(x0, noise, 0.0, 1.0, "v")
    bits = vlb.vlb_term_bits(process, v, x0, x_t, t, prediction="v", variance_type="fixed_small")
    np.testing.assert_allclose(bits, 0.0, atol=1e-6)


def test_hybrid_loss_without_a_learned_variance_is_refused(process):
    """Its VLB term would have no gradient: the run would silently train L_simple."""
    apply_fn = lambda params, x_t, network_time, label, rng: params * x_t
    with pytest.raises(ValueError, match=r"'hybrid'.*variance_type='fixed_small'.*'learned'"):
        losses.make_diffusion_loss_fn(process, apply_fn, loss_type="hybrid")
