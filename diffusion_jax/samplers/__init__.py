"""Samplers: one signature for all, a registry for the names used in configs.

    sample = make_sampler("dpm_solver++", schedule=process, num_steps=20, prediction="eps")
    x0, info = jax.jit(sample, static_argnums=0)(model_fn, noise, rng, cond)

`model_fn(x, t, cond) -> output` is the network (t: its float32 time [B]); `noise` is a
standard normal draw [B, ...] (the sampler starts at x_T = sigma_T * noise); info["nfe"] is the
number of network evaluations. `schedule` is a discrete `DiffusionProcess` or a
`noise_schedule.NoiseSchedule` (continuous VP / VE, rectified flow); the continuous-time
samplers read a DiffusionProcess in DPM-Solver's discrete-time convention.

Options common to all: prediction ("eps", "x0", "v", "score", "velocity"), variance_type (a
learned-variance output keeps its first half of channels), clip_x0, and guidance_scale with
null_cond (classifier-free guidance around the model). Per sampler (see each factory):
- ddpm: spacing ("linspace" | "leading" | "trailing" respacing when num_steps < T), variance_type
  ("fixed_small" | "fixed_large" | "learned" | "learned_range").
- ddim: eta in [0, 1], spacing, thresholding. Inversion: `ancestral.make_ddim_inversion`.
- dpm_solver (noise prediction; default single-step order 3) and dpm_solver++ (data
  prediction; default multistep order 2 = 2M; order=3 gives 3M, multistep=False 2S): order,
  multistep, time_spacing ("log_snr" | "time_uniform" | "time_quadratic"), lower_order_final,
  thresholding (+ threshold_percentile, threshold_max), denoise_final.
- edm_euler, edm_heun: sigma_min, sigma_max (default: the schedule's range), rho, s_churn,
  s_tmin, s_tmax, s_noise.
- euler_maruyama, pc: time_spacing, denoise_final; pc also corrector_steps (default 1), snr.
- ode: solver ("tsit5" | "dopri5"), rtol, atol, max_steps, denoise_final.
- flow_euler, flow_heun: time_spacing (default "time_uniform"); prediction defaults to
  "velocity".

Samplers on a sigma grid (`sigma_grid`, one helper for all). Grid options, every one of them:
sigmas ("schedule" | "karras" | "exponential" | "beta"; rho for Karras), spacing (diffusers'
timestep spacing on a discrete process: "linspace" | "leading" | "trailing") with
steps_offset, final_sigma ("zero" | "sigma_min" | "last"), time_spacing (the levels of
sigmas="schedule" on a continuous schedule). dpm_solver++ (multistep) and edm_euler / edm_heun
take them too (sigmas=...), pndm / ddim / ddpm take spacing.
- euler, heun: k-diffusion's Euler / Heun (EDM's step, `edm`) on the grid; s_churn etc.
- euler_ancestral: eta, s_noise. lms: order (1-4; weights by host-side quadrature).
- dpm2, dpm2_ancestral: DPM-Solver-2 in sigma space (eta, s_noise for the ancestral one).
- dpm_solver++_sde: DPM-Solver++ 2M SDE (order=2) / 3M SDE (order=3), second_difference
  ("taylor" | "reference": diffusers' 3M), lower_order_final, s_noise, thresholding.
- dpm_solver++_2s_sde: single-step DPM-Solver++(2S) SDE (diffusers' DPMSolverSDEScheduler,
  matched in distribution: its Brownian increments come from the sampler's key).
- unipc: order (1-3), variant ("bh1" | "bh2"), predict_x0 (data or noise form),
  lower_order_final, disable_corrector (step indices, as diffusers), thresholding.
- deis: order (1-3; DEIS-logrho), lower_order_final.
- pndm: skip_prk_steps (PLMS as Stable Diffusion), set_alpha_to_one, spacing, steps_offset.
A diffusers `scheduler_config.json` dict maps to (name, options, process) with
`diffusers_config.from_diffusers_config`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from diffusion_jax.diffusion.noise_schedule import (
    ContinuousSchedule,
    DiscreteSchedule,
    FlowSchedule,
    NoiseSchedule,
    as_noise_schedule,
    continuous_schedule,
)
from diffusion_jax.samplers import (
    ancestral,
    common,
    deis,
    diffusers_config,
    dpm2,
    dpm_solver,
    dpm_solver_sde,
    edm,
    euler_ancestral,
    flow,
    lms,
    ode,
    pndm,
    sde,
    sigma_grid,
    unipc,
)
from diffusion_jax.samplers.ancestral import make_ddim_inversion
from diffusion_jax.samplers.common import ModelFn, SampleFn
from diffusion_jax.samplers.guidance import classifier_free_guidance

SAMPLERS: dict[str, Callable[..., SampleFn]] = {
    "ddpm": ancestral.make_ddpm_sampler,
    "ddim": ancestral.make_ddim_sampler,
    "dpm_solver": functools.partial(dpm_solver.make_dpm_solver, algorithm="noise"),
    "dpm_solver++": functools.partial(
        dpm_solver.make_dpm_solver, algorithm="data", order=2, multistep=True
    ),
    "edm_euler": functools.partial(edm.make_edm_sampler, heun=False),
    "edm_heun": functools.partial(edm.make_edm_sampler, heun=True),
    "euler_maruyama": functools.partial(sde.make_sde_sampler, corrector_steps=0),
    "pc": functools.partial(sde.make_sde_sampler, corrector_steps=1),
    "ode": ode.make_ode_sampler,
    "flow_euler": functools.partial(flow.make_flow_sampler, heun=False),
    "flow_heun": functools.partial(flow.make_flow_sampler, heun=True),
    "euler": functools.partial(edm.make_edm_sampler, heun=False, sigmas="schedule"),
    "heun": functools.partial(edm.make_edm_sampler, heun=True, sigmas="schedule"),
    "euler_ancestral": euler_ancestral.make_euler_ancestral_sampler,
    "lms": lms.make_lms_sampler,
    "dpm2": functools.partial(dpm2.make_dpm2_sampler, ancestral=False),
    "dpm2_ancestral": functools.partial(dpm2.make_dpm2_sampler, ancestral=True),
    "dpm_solver++_sde": functools.partial(
        dpm_solver_sde.make_dpm_solver_multistep, stochastic=True
    ),
    "dpm_solver++_2s_sde": dpm_solver_sde.make_dpm_solver_singlestep_sde,
    "unipc": unipc.make_unipc_sampler,
    "deis": deis.make_deis_sampler,
    "pndm": pndm.make_pndm_sampler,
}
# Options fixed by the registry name: passing them would change which sampler it is.
_FIXED = {"algorithm", "heun", "ancestral", "stochastic"}


def get_sampler(name: str) -> Callable[..., SampleFn]:
    """The factory registered under `name` (config.sampling.sampler)."""
    if name not in SAMPLERS:
        raise ValueError(
            f"Unknown sampler {name!r} (sampling.sampler); allowed: {sorted(SAMPLERS)}"
        )
    return SAMPLERS[name]


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options `make_sampler(name, ...)` accepts besides schedule and num_steps."""
    parameters = inspect.signature(get_sampler(name)).parameters
    return tuple(p for p in parameters if p not in ("schedule", "num_steps") and p not in _FIXED)


def make_sampler(
    name: str,
    *,
    schedule,
    num_steps: int,
    guidance_scale: float | None = None,
    null_cond=None,
    **options,
) -> SampleFn:
    """`sample(model_fn, noise, rng, cond=None) -> (x0, info)` of the named sampler.

    With guidance_scale, the model is wrapped in classifier-free guidance with the null
    condition `null_cond` (one network call of batch 2B per evaluation).
    """
    allowed = sampler_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Sampler {name!r} has no option(s) {unknown}; allowed: {list(allowed)}")
    sample = get_sampler(name)(schedule, num_steps=num_steps, **options)
    if guidance_scale is None:
        return sample
    if null_cond is None:
        raise ValueError("guidance_scale needs null_cond, the null condition (e.g. num_classes)")
    learned = options.get("variance_type", "fixed_small") in ("learned", "learned_range")

    def guided_sample(model_fn, noise, rng, cond=None):
        guided_fn = classifier_free_guidance(
            model_fn, scale=guidance_scale, null_cond=null_cond, learned_variance=learned
        )
        return sample(guided_fn, noise, rng, cond)

    return guided_sample


__all__ = [
    "SAMPLERS",
    "ContinuousSchedule",
    "DiscreteSchedule",
    "FlowSchedule",
    "ModelFn",
    "NoiseSchedule",
    "SampleFn",
    "as_noise_schedule",
    "classifier_free_guidance",
    "common",
    "continuous_schedule",
    "diffusers_config",
    "get_sampler",
    "make_ddim_inversion",
    "make_sampler",
    "sampler_options",
    "sigma_grid",
]
