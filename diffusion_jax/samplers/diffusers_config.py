"""diffusers' scheduler configurations as our samplers: a `scheduler_config.json` chooses ours.

    name, options, process = from_diffusers_config(json.load(open("scheduler_config.json")))
    sample = make_sampler(name, schedule=process, num_steps=25, **options)

`_class_name` picks the sampler (`CLASS_NAMES`); the betas fields give the discrete process; the
fields that change the method map to options. A field our sampler does not implement with the
value given raises ValueError naming the field and the values allowed; fields that are not
parameters of the class (configs often carry such leftovers) are ignored, as diffusers does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.process import DiffusionProcess

CLASS_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_ancestral",
    "DPMSolverMultistepScheduler": "dpm_solver++",
    "DPMSolverSDEScheduler": "dpm_solver++_2s_sde",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
GRID_SAMPLERS = (
    "euler", "euler_ancestral", "heun", "lms", "dpm2", "dpm2_ancestral", "dpm_solver++",
    "dpm_solver++_sde", "dpm_solver++_2s_sde", "unipc", "deis",
)  # fmt: skip
# Fields whose only supported value is the one given (diffusers' default for our method).
FIXED_VALUES = {
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "euler_at_final": False,
    "solver_p": None,
    "sigma_min": None,
    "sigma_max": None,
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
}


def _unsupported(key: str, value: Any, allowed) -> ValueError:
    return ValueError(
        f"diffusers scheduler field {key!r} = {value!r} is not supported here; allowed: {allowed}"
    )


def process_from_config(config: dict) -> DiffusionProcess:
    """The discrete process of num_train_timesteps, beta_start, beta_end, beta_schedule (or
    trained_betas) and rescale_betas_zero_snr, with diffusers' formulas."""
    num_timesteps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
    else:
        schedule = config.get("beta_schedule", "linear")
        start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
        if schedule == "linear":
            betas = np.linspace(start, end, num_timesteps, dtype=np.float64)
        elif schedule == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = schedules.cosine_betas(num_timesteps)
        else:
            raise _unsupported("beta_schedule", schedule, list(BETA_SCHEDULES))
    if config.get("rescale_betas_zero_snr", False):
        betas = schedules.rescale_zero_terminal_snr(betas)
    return DiffusionProcess.from_betas(betas)


def _sigma_spacing(config: dict) -> str:
    chosen = [k for k in ("karras", "exponential", "beta") if config.get(f"use_{k}_sigmas")]
    if len(chosen) > 1:
        raise ValueError(f"diffusers config sets more than one of use_*_sigmas: {chosen}")
    return chosen[0] if chosen else "schedule"


def _grid_options(name: str, config: dict) -> dict:
    options = {"sigmas": _sigma_spacing(config)}
    options["spacing"] = config.get("timestep_spacing", "linspace")
    options["steps_offset"] = int(config.get("steps_offset", 0))
    final = config.get("final_sigmas_type")
    if final is not None:
        if final not in ("zero", "sigma_min"):
            raise _unsupported("final_sigmas_type", final, ["zero", "sigma_min"])
        options["final_sigma"] = final
    return options


def _method_options(name: str, config: dict) -> tuple[str, dict]:
    """(registry name, options) of the fields that choose the method."""
    options: dict = {}
    if name in ("dpm_solver++", "unipc", "deis"):
        options["order"] = int(config.get("solver_order", 2))
        options["lower_order_final"] = bool(config.get("lower_order_final", True))
    if name == "dpm_solver++":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise _unsupported("algorithm_type", algorithm, ["dpmsolver++", "sde-dpmsolver++"])
        if config.get("solver_type", "midpoint") != "midpoint":
            raise _unsupported("solver_type", config["solver_type"], ["midpoint"])
        options["second_difference"] = "reference"  # as diffusers' 3M
        name = "dpm_solver++_sde" if algorithm == "sde-dpmsolver++" else name
    if name == "unipc":
        variant = config.get("solver_type", "bh2")
        if variant not in ("bh1", "bh2"):
            raise _unsupported("solver_type", variant, ["bh1", "bh2"])
        options["variant"] = variant
        options["predict_x0"] = bool(config.get("predict_x0", True))
        options["disable_corrector"] = tuple(config.get("disable_corrector") or ())
    if name == "deis":
        for key, allowed in (("algorithm_type", "deis"), ("solver_type", "logrho")):
            if config.get(key, allowed) != allowed:
                raise _unsupported(key, config[key], [allowed])
    if name == "pndm":
        options["skip_prk_steps"] = bool(config.get("skip_prk_steps", False))
        options["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", False))
    return name, options


def _chain_options(name: str, config: dict) -> dict:
    """DDPM / DDIM / PNDM: timestep spacing on the chain; DDIM ends at alpha_bar = 1."""
    options = {"spacing": config.get("timestep_spacing", "leading")}
    offset = int(config.get("steps_offset", 0))
    if offset != 0:
        options["steps_offset"] = offset
    if name == "ddim":
        options["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", True))
    if name == "ddpm":
        variance = config.get("variance_type") or "fixed_small"
        allowed = ["fixed_small", "fixed_large", "learned", "learned_range"]
        if variance not in allowed:
            raise _unsupported("variance_type", variance, allowed)
        options["variance_type"] = variance
    return options


def _common_options(name: str, config: dict) -> dict:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _unsupported("prediction_type", prediction, sorted(PREDICTION_TYPES))
    options = {"prediction": PREDICTION_TYPES[prediction]}
    if config.get("clip_sample", False) and name in ("ddpm", "ddim"):
        if config.get("clip_sample_range", 1.0) != 1.0:
            raise _unsupported("clip_sample_range", config["clip_sample_range"], [1.0])
        options["clip_x0"] = True
    if config.get("thresholding", False):
        if name not in ("ddim", "dpm_solver++", "dpm_solver++_sde", "unipc", "deis"):
            raise _unsupported("thresholding", True, [False])
        options["thresholding"] = True
    for key, value in FIXED_VALUES.items():
        if key == "variance_type" and name == "ddpm":
            continue
        if key in config and config[key] != value:
            raise _unsupported(key, config[key], [value])
    return options


def from_diffusers_config(config: dict) -> tuple[str, dict, DiffusionProcess]:
    """(registry name, options, process) of a diffusers scheduler config (see module doc)."""
    class_name = config.get("_class_name")
    if class_name not in CLASS_NAMES:
        raise _unsupported("_class_name", class_name, sorted(CLASS_NAMES))
    name = CLASS_NAMES[class_name]
    options = _common_options(name, config)
    name, method = _method_options(name, config)
    options.update(method)
    if name in GRID_SAMPLERS:
        options.update(_grid_options(name, config))
    else:
        options.update(_chain_options(name, config))
    if name in ("ddpm", "ddim", "pndm") and _sigma_spacing(config) != "schedule":
        raise _unsupported(f"use_{_sigma_spacing(config)}_sigmas", True, [False])
    return name, options, process_from_config(config)
