"""Parity with diffusers' schedulers (PyTorch extra): the same method, the same start, the same
noise draws, driven by the same exact Gaussian-mixture model, gives the same sample to 1e-5.

Both loops run in float64 (jax_enable_x64; torch float64 samples), with the schedulers' own
float32 sigma tables on both sides, so what is compared is the algorithm, not rounding. The
model sees the network input diffusers gives it (`scale_model_input`) at diffusers' timestep.
Noise of the stochastic schedulers is diffusers' `randn_tensor` replaced by our per-step draws
(`common.step_noise`), or passed as `variance_noise` where the scheduler takes it.
"""

from __future__ import annotations

import contextlib
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax import samplers  # noqa: E402
from diffusion_jax.diffusion import gaussian_mixture, noise_schedule  # noqa: E402
from diffusion_jax.diffusion import process as process_lib  # noqa: E402
from diffusion_jax.samplers import common  # noqa: E402

TOLERANCE = 1e-5
NUM_POINTS = 64
PROCESS = process_lib.make_process("linear", 1000)
SCHEDULE = noise_schedule.DiscreteSchedule(PROCESS)
MIXTURE = gaussian_mixture.example_mixture()
RNG = jax.random.key(7)


def model_fn(x, t, cond=None):
    """The exact eps model; alpha, sigma of the network time t from the discrete schedule."""
    alpha, sigma = SCHEDULE.alpha_sigma(SCHEDULE.t_from_model_time(jnp.asarray(t, jnp.float32)))
    return gaussian_mixture.exact_prediction(MIXTURE, x, alpha, sigma, "eps")


def scheduler(class_name, **config):
    """A diffusers scheduler on our process's betas, its alpha_bar table in float64 (its own
    float32 cumprod puts sigma 1e-4 (relative) off at the first steps, where 1 - alpha_bar is
    ~1e-4; our grids take alpha_bar from the betas in float64)."""
    betas = np.asarray(PROCESS.betas, np.float64)
    sched = getattr(diffusers, class_name)(num_train_timesteps=1000, trained_betas=betas, **config)
    sched.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
    return sched


@contextlib.contextmanager
def replaced_randn(module_name, noises):
    """diffusers' randn_tensor in `module_name` returns noises[0], noises[1], ... in turn."""
    module = importlib.import_module(f"diffusers.schedulers.{module_name}")
    original, queue = module.randn_tensor, list(noises)
    module.randn_tensor = lambda *args, **kwargs: torch.from_numpy(queue.pop(0))
    try:
        yield
    finally:
        module.randn_tensor = original


def our_noises(count, shape):
    return [
        np.asarray(common.step_noise(RNG, i, jnp.zeros(shape, jnp.float64))) for i in range(count)
    ]


def diffusers_loop(sched, x_start, num_steps, step_kwargs=None, float64_sigmas=False):
    sched.set_timesteps(num_steps)
    if float64_sigmas:
        sched.sigmas = sched.sigmas.double()
    sample = torch.from_numpy(np.asarray(x_start, np.float64))
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(sample, t)
        eps = np.asarray(
            model_fn(jnp.asarray(model_input.numpy()), jnp.full((NUM_POINTS,), float(t)))
        )
        kwargs = step_kwargs(i) if step_kwargs else {}
        sample = sched.step(torch.from_numpy(eps), t, sample, **kwargs).prev_sample
    return sample.numpy()


def ours(name, num_steps, noise, **options):
    sample = samplers.make_sampler(name, schedule=PROCESS, num_steps=num_steps, **options)
    x, _ = jax.jit(sample, static_argnums=0)(model_fn, noise, RNG)
    return np.asarray(x)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield jax.random.normal(jax.random.key(3), (NUM_POINTS, 2), jnp.float64)


# KDPM2 on Beta sigmas, KDPM2 ancestral on Karras / Beta sigmas: the grid has steps with
# sigma_next / sigma ~ 2e-3 (Beta: 5.33 -> 0.01), where diffusers' float32 tables lose digits
# (KDPM2a's sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels to ~1e-2 relative there), and
# the midpoint falls below the smallest training sigma, where the timestep is clipped.
LOOSE_CASES = {("dpm2", "beta"), ("dpm2_ancestral", "beta"), ("dpm2_ancestral", "karras")}
LOOSE_TOLERANCE = 2e-3


def assert_parity(x, reference, tolerance=TOLERANCE):
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(x, reference, atol=tolerance, rtol=0)


def tolerance_of(name, options):
    return LOOSE_TOLERANCE if (name, options.get("sigmas")) in LOOSE_CASES else TOLERANCE


SIGMA_OPTIONS = [
    ({}, {}),
    ({"sigmas": "karras"}, {"use_karras_sigmas": True}),
    ({"sigmas": "exponential"}, {"use_exponential_sigmas": True}),
    ({"sigmas": "beta"}, {"use_beta_sigmas": True}),
    ({"spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "leading", "steps_offset": 1}),
    ({"spacing": "trailing"}, {"timestep_spacing": "trailing"}),
]
# (our name, diffusers class, extra config, ve start: the start is sigma_0 * noise in x / alpha)
K_DIFFUSION_CASES = [
    ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("lms", "LMSDiscreteScheduler", {}),
    ("dpm2", "KDPM2DiscreteScheduler", {}),
]


def ve_start(name, noise, num_steps, options):
    grid = samplers.sigma_grid.make_sigma_grid(
        PROCESS, num_steps, round_karras=name.startswith("dpm2"),
        **{k: v for k, v in options.items() if k != "order"},
    )  # fmt: skip
    return np.asarray(grid.sigmas[0], np.float64) * np.asarray(noise)


@pytest.mark.parametrize("ours_options, config", SIGMA_OPTIONS)
@pytest.mark.parametrize("name, class_name, extra", K_DIFFUSION_CASES)
def test_sigma_space_samplers_match_diffusers(x64, name, class_name, extra, ours_options, config):
    noise, num_steps = x64, 12
    x = ours(name, num_steps, noise, **ours_options)
    reference = diffusers_loop(
        scheduler(class_name, **extra, **config), ve_start(name, noise, num_steps, ours_options),
        num_steps,
    )  # fmt: skip
    assert_parity(x, reference, tolerance_of(name, ours_options))


EULER_A = (
    "euler_ancestral",
    "EulerAncestralDiscreteScheduler",
    "scheduling_euler_ancestral_discrete",
)
KDPM2_A = (
    "dpm2_ancestral",
    "KDPM2AncestralDiscreteScheduler",
    "scheduling_k_dpm_2_ancestral_discrete",
)
# EulerAncestralDiscreteScheduler has no Karras / exponential / beta option.
ANCESTRAL_CASES = [EULER_A + options for options in SIGMA_OPTIONS[:1] + SIGMA_OPTIONS[4:]] + [
    KDPM2_A + options for options in SIGMA_OPTIONS
]


@pytest.mark.parametrize("name, class_name, module_name, ours_options, config", ANCESTRAL_CASES)
def test_ancestral_samplers_match_diffusers_with_the_same_noise(
    x64, name, class_name, module_name, ours_options, config
):
    noise, num_steps = x64, 12
    x = ours(name, num_steps, noise, **ours_options)
    start = ve_start(name, noise, num_steps, ours_options)
    draws = num_steps if name == "euler_ancestral" else num_steps - 1  # KDPM2a: none at the end
    with replaced_randn(module_name, our_noises(draws, noise.shape)):
        reference = diffusers_loop(scheduler(class_name, **config), start, num_steps)
    assert_parity(x, reference, tolerance_of(name, ours_options))


def vp_start(noise, num_steps, options, convention="multistep"):
    grid_options = {k: v for k, v in options.items() if k in ("sigmas", "spacing", "steps_offset")}
    grid = samplers.sigma_grid.make_sigma_grid(
        PROCESS, num_steps, convention=convention, round_karras=True, **grid_options
    )
    return np.asarray(grid.alpha_sigma(grid.sigmas[0])[1], np.float64) * np.asarray(noise)


DPM_CASES = [
    ("dpm_solver++", {"order": 2}, {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    ("dpm_solver++", {"order": 3, "second_difference": "reference"},
     {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    ("dpm_solver++_sde", {"order": 2}, {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}),
    ("dpm_solver++_sde", {"order": 3, "second_difference": "reference"},
     {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
]  # fmt: skip


@pytest.mark.parametrize("ours_options, config", SIGMA_OPTIONS)
@pytest.mark.parametrize("name, method_options, method_config", DPM_CASES)
def test_dpm_solver_multistep_matches_diffusers(
    x64, name, method_options, method_config, ours_options, config
):
    noise, num_steps = x64, 12
    options = {"sigmas": "schedule", **method_options, **ours_options}
    x = ours(name, num_steps, noise, **options)
    noises = our_noises(num_steps, noise.shape)
    sched = scheduler("DPMSolverMultistepScheduler", **method_config, **config)
    step_kwargs = (
        (lambda i: {"variance_noise": torch.from_numpy(noises[i])}) if "sde" in name else None
    )
    reference = diffusers_loop(sched, vp_start(noise, num_steps, options), num_steps, step_kwargs)
    assert_parity(x, reference)


UNIPC_METHODS = [
    ({"order": order, "variant": variant}, {"solver_order": order, "solver_type": variant})
    for order in (1, 2, 3)
    for variant in ("bh1", "bh2")
]
UNIPC_CASES = [method + grid for method in UNIPC_METHODS for grid in SIGMA_OPTIONS[:2]] + [
    UNIPC_METHODS[3] + grid for grid in SIGMA_OPTIONS[2:]
]


@pytest.mark.parametrize("method_options, method_config, ours_options, config", UNIPC_CASES)
def test_unipc_matches_diffusers(x64, method_options, method_config, ours_options, config):
    """bh1 ends at the smallest training sigma: diffusers' bh1 step to sigma = 0 is NaN
    (B(h) = hh = -inf times a zero correction); ours gives x0_hat there."""
    noise, num_steps = x64, 12
    options = {**method_options, **ours_options}
    if method_options["variant"] == "bh1":
        options, config = (
            {**options, "final_sigma": "sigma_min"},
            {**config, "final_sigmas_type": "sigma_min"},
        )
    x = ours("unipc", num_steps, noise, **options)
    sched = scheduler("UniPCMultistepScheduler", **method_config, **config)
    reference = diffusers_loop(sched, vp_start(noise, num_steps, options), num_steps)
    assert_parity(x, reference)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_noise_form_and_disabled_corrector_match_diffusers(x64, order):
    """Noise prediction ends at the smallest training sigma: diffusers' noise form is NaN on a
    step to sigma = 0 (0 * inf); ours is finite there too, but the comparison needs both.
    Order 3 agrees to 1e-4 only: its weights come from a float32 linear solve on both sides
    and multiply sigma_t B(h) ~ exp(h) in the noise form, where the rounding shows (4e-5)."""
    noise, num_steps = x64, 10
    options = {"order": order, "predict_x0": False, "final_sigma": "sigma_min"}
    x = ours("unipc", num_steps, noise, disable_corrector=(num_steps - 2,), **options)
    sched = scheduler(
        "UniPCMultistepScheduler", solver_order=order, predict_x0=False,
        final_sigmas_type="sigma_min", disable_corrector=[num_steps - 2],
    )  # fmt: skip
    reference = diffusers_loop(sched, vp_start(noise, num_steps, {}), num_steps)
    assert_parity(x, reference, TOLERANCE if order == 2 else 1e-4)


DEIS_CASES = [
    ({"order": o}, {"solver_order": o}) + grid for o in (1, 2, 3) for grid in SIGMA_OPTIONS[:2]
]
DEIS_CASES += [({"order": 3}, {"solver_order": 3}) + grid for grid in SIGMA_OPTIONS[2:]]


@pytest.mark.parametrize("method_options, method_config, ours_options, config", DEIS_CASES)
def test_deis_matches_diffusers(x64, method_options, method_config, ours_options, config):
    """DEIS's basis integrals cancel at small sigma: both sides compute them in float64 here
    (diffusers' float32 sigma table cast to float64), as ours does in x's dtype."""
    noise, num_steps = x64, 12
    options = {**method_options, **ours_options}
    x = ours("deis", num_steps, noise, **options)
    sched = scheduler("DEISMultistepScheduler", **method_config, **config)
    start = vp_start(noise, num_steps, options)
    reference = diffusers_loop(sched, start, num_steps, float64_sigmas=True)
    assert_parity(x, reference)


def alpha_bar_start(noise, first_timestep):
    alphas_cumprod = np.cumprod(1.0 - np.asarray(PROCESS.betas, np.float64))
    return np.sqrt(np.float32(1.0 - alphas_cumprod[first_timestep])) * np.asarray(noise)


@pytest.mark.parametrize(
    "num_steps, options, config",
    [
        (20, {"skip_prk_steps": True, "spacing": "leading", "steps_offset": 1},
         {"skip_prk_steps": True, "timestep_spacing": "leading", "steps_offset": 1}),
        (20, {}, {}),
        (15, {"spacing": "linspace"}, {"timestep_spacing": "linspace"}),
        (15, {"skip_prk_steps": True, "spacing": "trailing", "set_alpha_to_one": True},
         {"skip_prk_steps": True, "timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ],
)  # fmt: skip
def test_pndm_matches_diffusers(x64, num_steps, options, config):
    noise = x64
    x = ours("pndm", num_steps, noise, **options)
    sched = scheduler("PNDMScheduler", **config)
    sched.set_timesteps(num_steps)
    start = alpha_bar_start(noise, int(sched.timesteps[0]))
    assert_parity(x, diffusers_loop(sched, start, num_steps))


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps_offset, set_alpha_to_one", [(0, True), (1, False)])
def test_ddim_matches_diffusers(x64, eta, steps_offset, set_alpha_to_one):
    """Also with Stable Diffusion's scheduler settings (steps_offset 1, set_alpha_to_one off)."""
    noise, num_steps = x64, 20
    x = ours("ddim", num_steps, noise, eta=eta, spacing="leading", steps_offset=steps_offset,
             set_alpha_to_one=set_alpha_to_one)  # fmt: skip
    sched = scheduler(
        "DDIMScheduler", timestep_spacing="leading", clip_sample=False, steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
    )  # fmt: skip
    noises = our_noises(num_steps, noise.shape)
    start = alpha_bar_start(noise, 19 * (1000 // num_steps) + steps_offset)
    reference = diffusers_loop(
        sched, start, num_steps,
        lambda i: {"eta": eta, "variance_noise": torch.from_numpy(noises[i])},
    )  # fmt: skip
    assert_parity(x, reference)


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddpm_matches_diffusers(x64, steps_offset):
    noise, num_steps = x64, 25
    x = ours("ddpm", num_steps, noise, spacing="leading", steps_offset=steps_offset)
    sched = scheduler(
        "DDPMScheduler", timestep_spacing="leading", clip_sample=False, steps_offset=steps_offset
    )
    start = alpha_bar_start(noise, (num_steps - 1) * (1000 // num_steps) + steps_offset)
    # diffusers draws noise for every step with t > 0: with the offset also for the last one,
    # where its variance is 0 (the step before it is alpha_bar = 1)
    draws = our_noises(num_steps - 1 + steps_offset, noise.shape)
    with replaced_randn("scheduling_ddpm", draws):
        reference = diffusers_loop(sched, start, num_steps)
    assert_parity(x, reference)


CONFIG_CASES = [
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("LMSDiscreteScheduler", {"use_exponential_sigmas": True}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}),
    ("DEISMultistepScheduler", {"solver_order": 3}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}, {}),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 0.0}),
    (
        "DDIMScheduler",
        {"clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False},
        {"eta": 0.0},
    ),
    ("DDPMScheduler", {"clip_sample": False}, {}),
]
NOISE_MODULES = {
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "KDPM2AncestralDiscreteScheduler": "scheduling_k_dpm_2_ancestral_discrete",
    "DDPMScheduler": "scheduling_ddpm",
}


@pytest.mark.parametrize("class_name, config, step_options", CONFIG_CASES)
def test_a_scheduler_config_chooses_our_sampler_with_the_same_output(
    x64, class_name, config, step_options
):
    """The whole config (diffusers fills in its defaults) through `from_diffusers_config`."""
    noise, num_steps = x64, 10
    sched = scheduler(class_name, **config)
    full_config = {**dict(sched.config), "_class_name": class_name}
    name, options, process = samplers.diffusers_config.from_diffusers_config(full_config)
    sample = samplers.make_sampler(name, schedule=process, num_steps=num_steps, **options)
    x = np.asarray(jax.jit(sample, static_argnums=0)(model_fn, noise, RNG)[0])
    sched.set_timesteps(num_steps)
    first_sigma = float(sched.sigmas[0]) if hasattr(sched, "sigmas") else None
    if class_name in ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler"):
        start = alpha_bar_start(noise, int(sched.timesteps[0]))
    elif float(sched.init_noise_sigma) == 1.0:  # VP-space multistep schedulers
        start = first_sigma / np.sqrt(first_sigma**2 + 1.0) * np.asarray(noise)
    else:
        start = first_sigma * np.asarray(noise)
    noises = our_noises(num_steps, noise.shape)
    step_kwargs = None
    if class_name == "DDIMScheduler" or "sde" in config.get("algorithm_type", ""):
        step_kwargs = lambda i: {"variance_noise": torch.from_numpy(noises[i]), **step_options}  # noqa: E731
    context = (
        replaced_randn(NOISE_MODULES[class_name], noises)
        if class_name in NOISE_MODULES
        else contextlib.nullcontext()
    )
    with context:
        reference = diffusers_loop(sched, start, num_steps, step_kwargs)
    assert_parity(x, reference)
