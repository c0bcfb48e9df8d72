"""Samplers on the exact Gaussian-mixture model: distributions, identities, guidance, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import gaussian_mixture, noise_schedule
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.samplers import ancestral
from tests import gaussian_data

NUM_SAMPLES = 3000
PROCESS = process_lib.make_process("linear", 1000)
SCHEDULE = noise_schedule.DiscreteSchedule(PROCESS)
MIXTURE = gaussian_mixture.example_mixture()


def discrete_alpha_sigma(model_t):
    return SCHEDULE.alpha_sigma(SCHEDULE.t_from_model_time(model_t))


def model_for(prediction, schedule=None, **kwargs):
    if schedule is None:
        alpha_sigma_fn = discrete_alpha_sigma
    else:
        alpha_sigma_fn = lambda t: schedule.alpha_sigma(schedule.t_from_model_time(t))  # noqa: E731
    return gaussian_mixture.exact_model_fn(MIXTURE, alpha_sigma_fn, prediction, **kwargs)


def run(sample, model_fn, num=NUM_SAMPLES, seed=0, cond=None):
    noise = jax.random.normal(jax.random.key(seed), (num, 2))
    return jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(seed + 1), cond)


def assert_reproduces_mixture(x, *, extra_variance=0.0):
    """Weights, means and variances per component within ~4.5 standard errors."""
    assert bool(jnp.all(jnp.isfinite(x)))
    weights, means, covariances, counts = gaussian_mixture.component_statistics(MIXTURE, x)
    n = x.shape[0]
    weight_se = np.sqrt(MIXTURE.weights * (1 - MIXTURE.weights) / n)
    np.testing.assert_array_less(np.abs(weights - MIXTURE.weights), 4.5 * weight_se + 1e-3)
    variances = MIXTURE.variances + extra_variance
    mean_se = np.sqrt(variances / counts[:, None])
    np.testing.assert_array_less(np.abs(means - MIXTURE.means), 4.5 * mean_se + 2e-3)
    diagonal = np.diagonal(covariances, axis1=1, axis2=2)
    variance_se = variances * np.sqrt(2.0 / counts[:, None])
    np.testing.assert_array_less(np.abs(diagonal - variances), 4.5 * variance_se + 1e-3)
    off_diagonal = covariances[:, 0, 1]
    np.testing.assert_array_less(np.abs(off_diagonal), 4.5 * np.sqrt(variances.prod(-1) / counts))


FLOW = noise_schedule.FlowSchedule()
VP_CONTINUOUS = noise_schedule.continuous_schedule("vp")
# (name, schedule, prediction, options, variance of x left at t_min with no final denoising)
DISTRIBUTION_CASES = [
    ("ddpm", PROCESS, "eps", {}, 0.0),
    ("ddpm", PROCESS, "x0", {"variance_type": "fixed_large", "spacing": "trailing"}, 0.0),
    ("ddpm", PROCESS, "v", {"variance_type": "learned_range"}, 0.0),
    ("ddim", PROCESS, "eps", {}, 0.0),
    ("ddim", PROCESS, "v", {"eta": 0.5, "spacing": "leading"}, 0.0),
    ("dpm_solver", PROCESS, "eps", {}, 1e-4),
    ("dpm_solver++", PROCESS, "x0", {"order": 3, "denoise_final": True}, 0.0),
    ("dpm_solver++", VP_CONTINUOUS, "v", {"multistep": False, "denoise_final": True}, 0.0),
    ("edm_euler", PROCESS, "eps", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}, 0.0),
    ("edm_heun", PROCESS, "eps", {}, 0.0),
    ("euler_maruyama", VP_CONTINUOUS, "eps", {"denoise_final": True}, 0.0),
    ("pc", PROCESS, "eps", {"snr": 0.1, "denoise_final": True}, 0.0),
    ("ode", VP_CONTINUOUS, "eps", {"denoise_final": True}, 0.0),
    ("flow_euler", FLOW, "velocity", {}, 0.0),
    ("flow_heun", FLOW, "x0", {}, 0.0),
    ("euler_ancestral", PROCESS, "eps", {}, 0.0),
    ("euler_ancestral", PROCESS, "v", {"eta": 0.5, "sigmas": "karras"}, 0.0),
    ("dpm2_ancestral", PROCESS, "eps", {"spacing": "trailing"}, 0.0),
    ("dpm_solver++_sde", PROCESS, "eps", {}, 0.0),
    ("dpm_solver++_sde", PROCESS, "x0", {"order": 3, "sigmas": "exponential"}, 0.0),
    ("dpm_solver++_2s_sde", PROCESS, "eps", {"sigmas": "karras"}, 0.0),
    ("unipc", PROCESS, "eps", {"sigmas": "exponential", "variant": "bh1", "order": 3}, 0.0),
    ("deis", VP_CONTINUOUS, "eps", {"order": 3, "final_sigma": "zero"}, 0.0),
    ("pndm", PROCESS, "eps", {"skip_prk_steps": True, "steps_offset": 1}, 0.0),
    ("lms", VP_CONTINUOUS, "v", {"sigmas": "karras"}, 0.0),
    ("heun", PROCESS, "eps", {"spacing": "leading", "steps_offset": 1}, 0.0),
]
NUM_STEPS = {
    "ddpm": 250, "ddim": 100, "euler_maruyama": 500, "pc": 300, "edm_euler": 200,
    "euler_ancestral": 200, "dpm2_ancestral": 100, "dpm_solver++_sde": 100,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name, schedule, prediction, options, extra", DISTRIBUTION_CASES)
def test_samples_reproduce_the_mixture(name, schedule, prediction, options, extra):
    variance_output = 0.0 if options.get("variance_type") == "learned_range" else None
    model_fn = model_for(prediction, None if schedule is PROCESS else schedule,
                         variance_output=variance_output)  # fmt: skip
    sample = samplers.make_sampler(
        name, schedule=schedule, num_steps=NUM_STEPS.get(name, 50), prediction=prediction,
        **options,
    )  # fmt: skip
    x, _ = run(sample, model_fn)
    assert_reproduces_mixture(x, extra_variance=extra)


def test_ddim_eta_one_on_all_steps_equals_ddpm_fixed_small():
    model_fn = model_for("eps")
    ddim = samplers.make_sampler("ddim", schedule=PROCESS, num_steps=1000, eta=1.0)
    ddpm = samplers.make_sampler("ddpm", schedule=PROCESS, num_steps=1000)
    x_ddim, _ = run(ddim, model_fn, num=256)
    x_ddpm, _ = run(ddpm, model_fn, num=256)
    np.testing.assert_allclose(x_ddim, x_ddpm, atol=2e-4)


def test_learned_range_at_minus_one_is_fixed_small():
    fixed = samplers.make_sampler("ddpm", schedule=PROCESS, num_steps=50)
    learned = samplers.make_sampler(
        "ddpm", schedule=PROCESS, num_steps=50, variance_type="learned_range"
    )
    x_fixed, _ = run(fixed, model_for("eps"), num=64)
    x_learned, _ = run(learned, model_for("eps", variance_output=-1.0), num=64)
    np.testing.assert_allclose(x_fixed, x_learned, atol=1e-5)


def test_ddim_inversion_round_trip():
    model_fn = model_for("eps")
    sample = samplers.make_sampler("ddim", schedule=PROCESS, num_steps=200)
    invert = samplers.make_ddim_inversion(PROCESS, num_steps=200)
    noise = jax.random.normal(jax.random.key(3), (128, 2))
    x0, _ = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(0))
    latent, info = jax.jit(invert, static_argnums=0)(model_fn, x0)
    assert int(info["nfe"]) == 199
    # Both directions are first order: about 0.055 at 200 steps (RMS of unit-variance noise).
    assert float(jnp.sqrt(jnp.mean((latent - noise) ** 2))) < 0.08


def test_dpm_solver_order_one_is_ddim_on_the_same_steps():
    """DPM-Solver-1 is DDIM (Lu et al. 2022a, Sec. 4.1): same grid, same result."""
    model_fn = model_for("eps")
    ddim = samplers.make_sampler("ddim", schedule=PROCESS, num_steps=1000)
    dpm = samplers.make_sampler(
        "dpm_solver", schedule=PROCESS, num_steps=999, order=1, time_spacing="time_uniform",
        denoise_final=True,
    )  # fmt: skip
    x_ddim, _ = run(ddim, model_fn, num=128)
    x_dpm, _ = run(dpm, model_fn, num=128)
    np.testing.assert_allclose(x_ddim, x_dpm, atol=2e-3)


def test_guidance_scale_one_is_the_conditional_model_and_costs_one_batched_call():
    model_fn = model_for("eps")
    batch_sizes = []

    def recording_fn(x, t, cond):
        batch_sizes.append(x.shape[0])
        return model_fn(x, t, cond)

    labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.full((4,), 500.0)
    guided = samplers.classifier_free_guidance(recording_fn, scale=1.0, null_cond=3)
    np.testing.assert_allclose(guided(x, t, labels), model_fn(x, t, labels), atol=1e-6)
    assert batch_sizes == [8]
    unconditional = samplers.classifier_free_guidance(model_fn, scale=0.0, null_cond=3)
    np.testing.assert_allclose(unconditional(x, t, labels), model_fn(x, t, None), atol=1e-6)


def test_guided_sampling_with_scale_one_samples_the_component():
    model_fn = model_for("eps")
    sample = samplers.make_sampler(
        "dpm_solver++", schedule=PROCESS, num_steps=20, guidance_scale=1.0, null_cond=3,
        denoise_final=True,
    )  # fmt: skip
    labels = jnp.full((1000,), 2, jnp.int32)
    x, _ = run(sample, model_fn, num=1000, cond=labels)
    np.testing.assert_allclose(jnp.mean(x, axis=0), MIXTURE.means[2], atol=0.03)
    np.testing.assert_allclose(jnp.var(x, axis=0), MIXTURE.variances[2], rtol=0.2)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_same_key_same_samples_and_one_compilation(name):
    schedule = FLOW if name.startswith("flow") else PROCESS
    prediction = "velocity" if name.startswith("flow") else "eps"
    model_fn = model_for(prediction, FLOW if schedule is FLOW else None)
    sample = samplers.make_sampler(name, schedule=schedule, num_steps=4, prediction=prediction)
    chex.clear_trace_counter()  # samplers of one factory share the counter of `sample`
    traced = chex.assert_max_traces(sample, n=1)
    jitted = jax.jit(traced, static_argnums=0)
    noise = jax.random.normal(jax.random.key(0), (8, 2))
    first, info = jitted(model_fn, noise, jax.random.key(1))
    second, _ = jitted(model_fn, noise + 0.0, jax.random.key(1))
    np.testing.assert_array_equal(first, second)
    assert int(info["nfe"]) >= 1


def _equation_count(jaxpr) -> int:
    """Equations of a jaxpr and of every jaxpr nested in it (loop bodies, branches)."""
    count = 0
    for equation in jaxpr.eqns:
        count += 1
        for value in equation.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _equation_count(inner)
    return count


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_sampling_program_does_not_grow_with_the_number_of_steps(name):
    """One loop body whatever num_steps: the traced program (all nested jaxprs) has the same
    number of equations at 10 and 50 steps, so compile time does not grow with the steps."""
    schedule = FLOW if name.startswith("flow") else PROCESS
    prediction = "velocity" if name.startswith("flow") else "eps"
    model_fn = model_for(prediction, FLOW if schedule is FLOW else None)
    noise = jnp.zeros((4, 2))
    counts = []
    for num_steps in (10, 50):
        sample = samplers.make_sampler(
            name, schedule=schedule, num_steps=num_steps, prediction=prediction
        )
        closed = jax.make_jaxpr(sample, static_argnums=0)(model_fn, noise, jax.random.key(0))
        counts.append(_equation_count(closed.jaxpr))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize(
    "name, options",
    [
        ("unipc", {"sigmas": "karras"}), ("deis", {"sigmas": "exponential"}),
        ("euler", {"sigmas": "beta"}), ("dpm_solver++_sde", {"time_spacing": "time_uniform"}),
        ("lms", {}), ("dpm2", {"sigmas": "karras", "rho": 3.0}),
    ],
)  # fmt: skip
def test_grid_samplers_on_a_continuous_schedule_reach_the_data(name, options):
    """Every sigma spacing applies to a continuous schedule too (its sigma range)."""
    sample = samplers.make_sampler(name, schedule=VP_CONTINUOUS, num_steps=60, **options)
    x, _ = run(sample, model_for("eps", VP_CONTINUOUS), num=1000)
    mixture_mean = MIXTURE.weights @ MIXTURE.means
    np.testing.assert_allclose(jnp.mean(x, axis=0), mixture_mean, atol=0.08)
    components = gaussian_mixture.component_statistics(MIXTURE, x)[0]
    np.testing.assert_allclose(components, MIXTURE.weights, atol=0.06)


def test_sigma_grids_of_each_spacing():
    """Karras (Eq. 5 of Karras et al. 2022), exponential and Beta levels over the training
    range; diffusers' leading / trailing timesteps with steps_offset."""
    grid = samplers.sigma_grid.make_sigma_grid
    sigmas = {s: np.asarray(grid(PROCESS, 8, sigmas=s).sigmas) for s in ("karras", "exponential")}
    train = np.sqrt((1 - np.asarray(PROCESS.alphas_cumprod)) / np.asarray(PROCESS.alphas_cumprod))
    for levels in sigmas.values():
        np.testing.assert_allclose(levels[[0, -2, -1]], [train[-1], train[0], 0.0], rtol=1e-4)
    np.testing.assert_allclose(np.diff(np.log(sigmas["exponential"][:-1])), np.log(
        train[0] / train[-1]) / 7, rtol=1e-4)  # fmt: skip
    ramp = sigmas["karras"][:-1] ** (1 / 7)
    np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], rtol=1e-3)
    beta = np.asarray(grid(PROCESS, 9, sigmas="beta").sigmas)
    middle = train[0] + 0.5 * (train[-1] - train[0])  # Beta(0.6, 0.6) is symmetric
    np.testing.assert_allclose(beta[4], middle, rtol=1e-4)
    leading = grid(PROCESS, 10, spacing="leading", steps_offset=1).model_times
    np.testing.assert_array_equal(leading[:-1], np.arange(901, 0, -100))
    trailing = grid(PROCESS, 10, spacing="trailing").model_times
    np.testing.assert_array_equal(trailing[:-1], np.arange(999, 0, -100))


def test_nfe_counts():
    def nfe(name, num_steps, **options):
        sample = samplers.make_sampler(name, schedule=PROCESS, num_steps=num_steps, **options)
        return int(run(sample, model_for("eps"), num=2)[1]["nfe"])

    assert nfe("dpm_solver", 10, order=3) == 10
    assert nfe("dpm_solver", 7, order=2) == 7
    assert nfe("edm_heun", 18) == 35  # EDM's CIFAR-10 setting: 18 steps, 35 NFE
    assert nfe("pc", 10, corrector_steps=2) == 30
    assert nfe("heun", 10) == 19 and nfe("dpm2", 10) == 19 and nfe("dpm2_ancestral", 10) == 19
    assert nfe("dpm_solver++_2s_sde", 10) == 19 and nfe("heun", 10, final_sigma="sigma_min") == 20
    assert nfe("pndm", 10) == 19 and nfe("pndm", 10, skip_prk_steps=True) == 11
    for name in ("euler", "euler_ancestral", "lms", "unipc", "deis", "dpm_solver++_sde"):
        assert nfe(name, 10) == 10


@pytest.mark.parametrize("num_steps, step_to_kinks", [(50, False), (50, True), (4, True)])
def test_ode_nfe_is_the_number_of_network_calls(num_steps, step_to_kinks):
    """Counted at run time: each step onto one of T=50's 48 kinks costs one more evaluation
    (the stage shared with the next step is invalid after a jump)."""
    process = process_lib.make_process("linear", 50)
    schedule = noise_schedule.DiscreteSchedule(process)
    exact = gaussian_mixture.exact_model_fn(
        MIXTURE, lambda t: schedule.alpha_sigma(schedule.t_from_model_time(t)), "eps"
    )
    calls = []

    def counting_fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return exact(x, t, cond)

    sample = samplers.make_sampler(
        "ode", schedule=process, num_steps=num_steps, step_to_kinks=step_to_kinks
    )
    _, info = run(sample, counting_fn, num=8)
    jax.effects_barrier()
    assert int(info["nfe"]) == len(calls)
    assert int(info["num_steps"]) >= (49 if step_to_kinks else 1)


@pytest.mark.parametrize("spacing, steps_offset", [
    ("linspace", 0), ("leading", 0), ("trailing", 0), ("leading", 1)
])  # fmt: skip
def test_one_step_goes_from_noise_to_the_denoised_mean(spacing, steps_offset):
    """DDIM / DDPM with one step: x_0 = x0_hat(x_T) at t = T-1 (DDIM eq. 12 with alpha_prev =
    1), for the mixture ~ its mean (alpha_T ~ 0.006 leaves x_T almost no information). Stable
    Diffusion's steps_offset 1 does not move the single step past T-1."""
    for name in ("ddim", "ddpm"):
        sample = samplers.make_sampler(
            name, schedule=PROCESS, num_steps=1, spacing=spacing, steps_offset=steps_offset
        )
        x, _ = run(sample, model_for("eps"), num=256)
        mixture_mean = MIXTURE.weights @ MIXTURE.means
        np.testing.assert_allclose(jnp.mean(x, axis=0), mixture_mean, atol=0.05)


def test_flow_samplers_take_x0_predictions_to_the_data():
    """Neither evaluates the network at t = 0, where sigma = 0 would make eps undefined."""
    for name in ("flow_euler", "flow_heun"):
        sample = samplers.make_sampler(name, schedule=FLOW, num_steps=200, prediction="x0")
        x, _ = run(sample, model_for("x0", FLOW))
        assert_reproduces_mixture(x, extra_variance=0.0)


def test_guidance_without_a_condition_is_refused():
    sample = samplers.make_sampler(
        "ddim", schedule=PROCESS, num_steps=4, guidance_scale=3.0, null_cond=3
    )
    with pytest.raises(ValueError, match="cond is None"):
        run(sample, model_for("eps"), num=4)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("euler_a", {}, "allowed"),
        ("ddim", {"eta": 1.5}, "eta"),
        ("ddim", {"num_steps": 0}, "num_steps"),
        ("ddpm", {"num_steps": 1001}, "num_steps"),
        ("dpm_solver", {"order": 4}, "order"),
        ("dpm_solver", {"time_spacing": "cubic"}, "time_spacing"),
        ("ddim", {"spacing": "cubic"}, "spacing"),
        ("ddim", {"prediction": "noise"}, "prediction"),
        ("ddpm", {"variance_type": "learned_small"}, "variance"),
        ("ddim", {"order": 2}, "allowed"),
        ("ode", {"solver": "rk4"}, "solver"),
        ("ddim", {"num_steps": 2.0}, "num_steps"),
        ("unipc", {"variant": "bh3"}, "variant"),
        ("unipc", {"order": 4}, "order"),
        ("euler", {"sigmas": "cosine"}, "sigmas"),
        ("lms", {"spacing": "uniform"}, "spacing"),
        ("deis", {"final_sigma": "one"}, "final_sigma"),
        ("dpm_solver++_sde", {"second_difference": "exact"}, "second_difference"),
        ("pndm", {"sigmas": "karras"}, "allowed"),
        ("pndm", {"num_steps": 3}, "num_steps"),
        ("euler_ancestral", {"eta": -1.0}, "eta"),
        ("dpm_solver", {"sigmas": "karras"}, "multistep"),
        ("edm_heun", {"sigmas": "karras", "sigma_min": 0.1}, "sigma_min"),
    ],
)
def test_bad_input_raises_value_error(name, options, message):
    options = {"num_steps": 10, **options}
    with pytest.raises(ValueError, match=message):
        samplers.make_sampler(name, schedule=PROCESS, **options)


def test_impossible_combinations_name_what_is_allowed():
    with pytest.raises(ValueError, match="'eps'.*Allowed"):
        samplers.make_sampler("flow_euler", schedule=FLOW, num_steps=10, prediction="eps")
    with pytest.raises(ValueError, match="discrete DiffusionProcess"):
        samplers.make_sampler("ddim", schedule=VP_CONTINUOUS, num_steps=10)
    with pytest.raises(ValueError, match="log-SNR"):
        samplers.make_sampler("dpm_solver", schedule=FLOW, num_steps=10, prediction="velocity")
    for name in ("flow_euler", "flow_heun"):  # log-SNR is infinite at t = 0 and t = 1
        with pytest.raises(ValueError, match="log-SNR"):
            samplers.make_sampler(name, schedule=FLOW, num_steps=10, time_spacing="log_snr")
    samplers.make_sampler("ddim", schedule=PROCESS, num_steps=np.int64(10))
    zero_snr = process_lib.make_process("linear", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="'eps'"):
        samplers.make_sampler("ddim", schedule=zero_snr, num_steps=10, prediction="eps")
    samplers.make_sampler("ddim", schedule=zero_snr, num_steps=10, prediction="v")
    with pytest.raises(ValueError, match="zero terminal SNR.*ddim"):
        samplers.make_sampler("unipc", schedule=zero_snr, num_steps=10, prediction="v")


def test_discrete_schedule_matches_the_process_at_its_steps():
    steps = jnp.asarray([0, 10, 500, 999])
    alpha, sigma = SCHEDULE.alpha_sigma(SCHEDULE.t_from_model_time(steps.astype(jnp.float32)))
    np.testing.assert_allclose(alpha, PROCESS.sqrt_alphas_cumprod[steps], rtol=1e-5)
    np.testing.assert_allclose(sigma, PROCESS.sqrt_one_minus_alphas_cumprod[steps], rtol=1e-4)
    times = jnp.asarray([0.002, 0.3, 0.77])
    np.testing.assert_allclose(SCHEDULE.t_from_log_snr(SCHEDULE.log_snr(times)), times, atol=1e-5)
    np.testing.assert_allclose(
        VP_CONTINUOUS.t_from_log_snr(VP_CONTINUOUS.log_snr(times)), times, atol=1e-5
    )


def test_respaced_ddpm_uses_original_model_times():
    respaced = ancestral.respaced_process(PROCESS, 10, "trailing")
    np.testing.assert_array_equal(respaced.model_timesteps[-1], 999)
    np.testing.assert_allclose(
        respaced.alphas_cumprod, PROCESS.alphas_cumprod[respaced.model_timesteps], rtol=1e-5
    )


def test_ode_sampler_onto_a_discrete_schedules_steps_follows_the_exact_flow():
    """Gaussian data N(m, s^2 I): the probability-flow ODE is the affine map
    x_t = alpha_t m + (std_t / std_T) (x_T - alpha_T m), std_t^2 = alpha_t^2 s^2 + sigma_t^2.
    Stepping over DDPM's kinks leaves ~1e-3 (577 NFE); landing on them, 5e-5 (6993 NFE)."""
    mean, std = jnp.asarray([0.3, -0.5]), 0.4

    def model_fn(x, model_t, cond=None):
        alpha, sigma = SCHEDULE.alpha_sigma(SCHEDULE.t_from_model_time(model_t))
        return gaussian_data.optimal_eps(x, alpha[:, None], sigma[:, None], mean=mean, std=std)

    noise = jax.random.normal(jax.random.key(0), (64, 2))
    alpha_0, sigma_0 = SCHEDULE.alpha_sigma(jnp.float32(SCHEDULE.t_min))
    alpha_T, sigma_T = SCHEDULE.alpha_sigma(jnp.float32(SCHEDULE.t_max))
    std_0, std_T = jnp.hypot(alpha_0 * std, sigma_0), jnp.hypot(alpha_T * std, sigma_T)
    exact = alpha_0 * mean + std_0 / std_T * (sigma_T * noise - alpha_T * mean)
    errors = {}
    for step_to_kinks in (False, True):
        sample = samplers.make_sampler(
            "ode", schedule=PROCESS, num_steps=50, prediction="eps", step_to_kinks=step_to_kinks
        )
        x, _ = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(1))
        errors[step_to_kinks] = float(jnp.max(jnp.abs(x - exact)))
    assert errors[True] < 2e-4 < errors[False] < 1e-2, errors
