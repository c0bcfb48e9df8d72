"""The sampler of a text-to-image generation, chosen as diffusers users choose a scheduler,
and the initial latents of diffusers' pipeline in our samplers' terms.

    sample, name = make_pipeline_sampler(scheduler_config, "dpm_solver++", num_steps=25)

With no sampler named, the folder's own `scheduler_config.json` is the sampler (Stable
Diffusion 1.5 ships PNDM). A named sampler that has a diffusers class is that class built
from the folder's config, as `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`
does (the betas, prediction type, timestep spacing and offset carry over); any other sampler
of our registry runs on the folder's process with its prediction type and its defaults.

Initial latents. diffusers' pipeline draws `latents` ~ N(0, I) and starts its scheduler at
latents * init_noise_sigma; our samplers start at sigma_T * noise (`samplers.common`). To
start where diffusers does, `noise_from_latents` rescales: the network's first input (the
scheduler's `scale_model_input` of the start) is the same on both sides. That is latents
itself for diffusers' VP schedulers (DDIM, PNDM, DPM-Solver, UniPC, DEIS, DDPM), and for
the k-diffusion ones (Euler, Heun, LMS, KDPM2, DPM-Solver SDE) latents * sigma_0 /
sqrt(sigma_0^2 + 1), or latents with "leading" spacing, whose init_noise_sigma is
sqrt(sigma_0^2 + 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.samplers import diffusers_config

# Our registry names of diffusers' classes, and the config fields that pick the variant.
DIFFUSERS_CLASSES = {name: class_name for class_name, name in diffusers_config.CLASS_NAMES.items()}
DIFFUSERS_CLASSES["dpm_solver++_sde"] = "DPMSolverMultistepScheduler"
VARIANT_FIELDS = {
    "dpm_solver++": {"algorithm_type": "dpmsolver++"},
    "dpm_solver++_sde": {"algorithm_type": "sde-dpmsolver++"},
}
# diffusers' schedulers whose init_noise_sigma is the largest sigma (k-diffusion's family).
K_DIFFUSION_SAMPLERS = (
    "euler", "euler_ancestral", "heun", "lms", "dpm2", "dpm2_ancestral", "dpm_solver++_2s_sde",
)  # fmt: skip


def make_pipeline_sampler(
    scheduler_config: dict, name: str | None, *, num_steps: int, **options
) -> tuple[samplers.SampleFn, str, dict]:
    """(sample, registry name, options) of `name` (or the folder's scheduler) on the folder's
    process (module docstring); `options` override those of the config."""
    if name is None:
        config = scheduler_config
    elif name in DIFFUSERS_CLASSES:
        config = {**scheduler_config, "_class_name": DIFFUSERS_CLASSES[name],
                  **VARIANT_FIELDS.get(name, {})}  # fmt: skip
    else:
        samplers.get_sampler(name)  # an unknown name is named with the allowed ones
        process = diffusers_config.process_from_config(scheduler_config)
        prediction = scheduler_config.get("prediction_type", "epsilon")
        chosen = {"prediction": diffusers_config.PREDICTION_TYPES[prediction], **options}
        sample = samplers.make_sampler(name, schedule=process, num_steps=num_steps, **chosen)
        return sample, name, chosen
    name, chosen, process = diffusers_config.from_diffusers_config(config)
    chosen.update(options)
    sample = samplers.make_sampler(name, schedule=process, num_steps=num_steps, **chosen)
    return sample, name, chosen


def first_input_scale(sample: samplers.SampleFn) -> float:
    """c in the sampler's first network input c * noise (one run on a single number with a
    zero network: cheap)."""
    seen: list[float] = []

    def probe(x, t, cond):
        jax.debug.callback(lambda value: seen.append(float(value)), x[0, 0], ordered=True)
        return jnp.zeros_like(x)

    jax.block_until_ready(sample(probe, jnp.ones((1, 1), jnp.float32), jax.random.key(0))[0])
    jax.effects_barrier()
    return seen[0]


def noise_from_latents(latents: np.ndarray, sample: samplers.SampleFn, name: str, options):
    """Our samplers' `noise` that starts where diffusers' pipeline starts from `latents`
    (module docstring)."""
    ours = first_input_scale(sample)
    k_diffusion = name in K_DIFFUSION_SAMPLERS and options.get("spacing") != "leading"
    theirs = ours if k_diffusion else 1.0
    return np.asarray(latents, np.float32) * np.float32(theirs / ours)
