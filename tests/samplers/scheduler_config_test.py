"""Scheduler configurations (scheduler_config.json dicts) read as our samplers and processes."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.samplers.diffusers_config import from_diffusers_config

# Stable Diffusion 1.5's scheduler_config.json.
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def test_stable_diffusion_config_is_plms_on_its_scaled_linear_betas():
    name, options, process = from_diffusers_config(SD15_PNDM)
    assert name == "pndm"
    assert options == {
        "prediction": "eps", "skip_prk_steps": True, "set_alpha_to_one": False,
        "spacing": "leading", "steps_offset": 1,
    }  # fmt: skip
    expected = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(process.betas, expected, rtol=1e-6)
    samplers.make_sampler(name, schedule=process, num_steps=50, **options)


@pytest.mark.parametrize(
    "config, name, expected",
    [
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
          "algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"},
         "dpm_solver++_sde", {"sigmas": "karras", "prediction": "v", "order": 2}),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1", "solver_order": 3,
          "disable_corrector": [8]},
         "unipc", {"variant": "bh1", "order": 3, "disable_corrector": (8,)}),
        ({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"},
         "euler", {"spacing": "trailing", "sigmas": "schedule"}),
        ({"_class_name": "DEISMultistepScheduler", "use_beta_sigmas": True},
         "deis", {"sigmas": "beta"}),
    ],
)  # fmt: skip
def test_configs_map_to_names_and_options(config, name, expected):
    chosen, options, process = from_diffusers_config(config)
    assert chosen == name
    assert expected.items() <= options.items()
    samplers.make_sampler(chosen, schedule=process, num_steps=10, **options)


def test_config_process_matches_our_linear_process():
    _, _, process = from_diffusers_config({"_class_name": "DDIMScheduler"})
    np.testing.assert_allclose(
        process.alphas_cumprod, process_lib.make_process("linear", 1000).alphas_cumprod, rtol=1e-6
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "'_class_name'.*allowed"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
         "'algorithm_type'.*'dpmsolver\\+\\+', 'sde-dpmsolver\\+\\+'"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"},
         "'solver_type'.*midpoint"),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh3"}, "bh1"),
        ({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "sqrt"}, "beta_schedule"),
        ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow_prediction"},
         "prediction_type"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
          "use_beta_sigmas": True}, "more than one"),
        ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"},
         "'interpolation_type'.*'linear'"),
        ({"_class_name": "PNDMScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"_class_name": "HeunDiscreteScheduler", "final_sigmas_type": "one"},
         "final_sigmas_type"),
    ],
)  # fmt: skip
def test_unsupported_fields_name_the_key_and_the_allowed_values(config, message):
    with pytest.raises(ValueError, match=message):
        from_diffusers_config(config)
