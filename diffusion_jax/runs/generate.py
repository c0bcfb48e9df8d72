"""Sampling a trained network with the sampler of `config.sampling`.

`make_generate_fn(config, model, count=N)` returns a pure `generate(params, rng, offset=0) ->
x [N, ...]`, images offset, ..., offset + N - 1 of a run; it reads the network the way its
loss trained it:
- discrete process ("simple", "hybrid", "vlb"): the `DiffusionProcess`, prediction
  `diffusion.target`, variance `diffusion.variance_type`;
- "flow_matching": the rectified-flow schedule, a velocity prediction at t * flow_time_scale;
- "edm": the VE schedule sigma(t) in [edm_sigma_min, edm_sigma_max], the network wrapped in
  the preconditioned denoiser D(x; sigma) of Karras et al. 2022 (Eq. 7), an x0 prediction.
Class-conditional models sample the class `sampling.label`, or for -1 all K classes in turn
(the n-th image of a run, over all its batches, has label n % K), with classifier-free
guidance `sampling.guidance_scale` (Ho & Salimans 2022). Text-conditional models sample the
P prompts `sampling.prompts` in turn (image n has prompt n % P), guided against the empty
caption.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import models, samplers
from diffusion_jax.diffusion import losses, noise_schedule
from diffusion_jax.runs import text_conditioning
from diffusion_jax.runs.build import make_process, network_fn
from diffusion_jax.runtime import progress


def sampling_schedule(diffusion: ml_collections.ConfigDict):
    """(schedule, prediction) that the samplers read the trained network with."""
    if diffusion.loss_type in losses.DISCRETE_LOSSES:
        return make_process(diffusion), diffusion.target
    if diffusion.loss_type == "flow_matching":
        return noise_schedule.FlowSchedule(model_time_scale=diffusion.flow_time_scale), "velocity"
    schedule = noise_schedule.continuous_schedule(
        "ve",
        t_min=0.0,
        t_max=1.0,
        sigma_min=diffusion.edm_sigma_min,
        sigma_max=diffusion.edm_sigma_max,
    )
    return schedule, "x0"


def model_fn_of(config: ml_collections.ConfigDict, model, params, schedule) -> Callable:
    """model_fn(x, t, cond) of the samplers; for EDM the denoiser D(x; sigma)."""
    apply_fn = network_fn(model, train=False)
    if config.diffusion.loss_type != "edm":
        return lambda x, t, cond: apply_fn(params, x, t, cond, None)

    def denoiser(x, t, cond):
        sigma = jnp.exp(-0.5 * schedule.log_snr(schedule.t_from_model_time(t)))
        return losses.edm_denoiser(
            apply_fn, params, x, sigma, cond, None, sigma_data=config.diffusion.edm_sigma_data
        )

    return denoiser


def make_sampler(config: ml_collections.ConfigDict, schedule, prediction: str):
    sampling = config.sampling
    candidates = {
        "prediction": prediction,
        "variance_type": config.diffusion.variance_type,
        "clip_x0": sampling.clip_x0,
        "eta": sampling.eta,
        "spacing": sampling.spacing,
    }
    allowed = samplers.sampler_options(sampling.sampler)
    options = {key: value for key, value in candidates.items() if key in allowed}
    guided = is_conditional(config) and sampling.guidance_scale != 1.0
    return samplers.make_sampler(
        sampling.sampler,
        schedule=schedule,
        num_steps=sampling.num_steps,
        # scale 1 is the conditional model: one network call per step, not a batch of 2B
        guidance_scale=sampling.guidance_scale if guided else None,
        null_cond=null_condition(config),
        **options,
    )


def is_conditional(config: ml_collections.ConfigDict) -> bool:
    return config.model.num_classes > 0 or text_conditioning.uses_text(config)


def null_condition(config: ml_collections.ConfigDict):
    """The null condition of guidance: label K, the empty caption's ids; None if unconditional."""
    if text_conditioning.uses_text(config):
        return text_conditioning.null_ids(text_conditioning.make_tokenizer(config))
    return config.model.num_classes if config.model.num_classes > 0 else None


def sample_labels(config: ml_collections.ConfigDict, count: int, offset=0) -> jnp.ndarray | None:
    """Labels of images offset, ..., offset + count - 1 of a run: `sampling.label`, or image
    n's n % K (0, 1, ..., K-1, 0, ... across batches); of a text-conditional model the
    token ids [count, L] of prompt n % P. `offset` may be traced."""
    num_classes = config.model.num_classes
    if text_conditioning.uses_text(config):
        ids = jnp.asarray(text_conditioning.prompt_ids(config, config.sampling.prompts))
        return ids[(offset + jnp.arange(count)) % len(ids)]
    if num_classes == 0:
        return None
    if config.sampling.label >= 0:
        return jnp.full((count,), config.sampling.label, jnp.int32)
    return (offset + jnp.arange(count, dtype=jnp.int32)) % num_classes


def make_generate_fn(
    config: ml_collections.ConfigDict, model, *, count: int, decode: Callable | None = None
) -> Callable:
    """`generate(params, rng, offset=0) -> x [count, ...]` with the configured sampler (jit
    it): images offset, ..., offset + count - 1 of a run. Pass `offset` as an array, so that
    one compiled program serves every batch. A latent run's samples are decoded by `decode`
    (`runs.latent`)."""
    schedule, prediction = sampling_schedule(config.diffusion)
    sample = make_sampler(config, schedule, prediction)
    shape = (count, *models.sample_shape(config.model))

    def generate(params, rng, offset=0):
        noise_rng, sample_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, shape, jnp.float32)
        labels = sample_labels(config, count, offset)
        x0, _ = sample(model_fn_of(config, model, params, schedule), noise, sample_rng, labels)
        return x0 if decode is None else decode(x0)

    return generate


def draw_samples(config: ml_collections.ConfigDict, generate: Callable, params):
    """(samples, labels): `sampling.num_images` images of `generate` in batches of
    `sampling.batch_size`, each batch told its offset (image n's label is n % K: classes
    balanced across batches); labels None for an unconditional model."""
    count, batch_size = config.sampling.num_images, config.sampling.batch_size
    rng = jax.random.key(config.sampling.seed)
    bar = progress.ProgressBar(
        "sampling", count, unit="img", lines_off_terminal=10, enabled=config.training.progress_bar
    )
    batches = []
    for index in range(-(-count // batch_size)):
        offset = jnp.asarray(index * batch_size, jnp.int32)
        batch = generate(params, jax.random.fold_in(rng, index), offset)
        batches.append(np.asarray(jax.device_get(batch)))
        bar.update(min((index + 1) * batch_size, count))
    bar.close()
    labels = None if text_conditioning.uses_text(config) else sample_labels(config, count)
    return np.concatenate(batches)[:count], None if labels is None else np.asarray(labels)
