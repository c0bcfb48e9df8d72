"""Drawing samples from a trained network with the sampler of `config.sampling`.

`make_generate_fn(config, model)` returns a pure `generate(params, rng, offset=0) -> x [N, ...]`,
images offset, ..., offset + N - 1 of a run; it reads the network the way its loss trained it:
- discrete process ("simple", "hybrid", "vlb"): the `DiffusionProcess`, prediction
  `diffusion.target`, variance `diffusion.variance_type`;
- "flow_matching": the rectified-flow schedule, a velocity prediction at t * flow_time_scale;
- "edm": the VE schedule sigma(t) in [edm_sigma_min, edm_sigma_max], the network wrapped in
  the preconditioned denoiser D(x; sigma) of Karras et al. 2022 (Eq. 7), an x0 prediction.
Class-conditional models sample the class `sampling.label`, or for -1 all K classes in turn
(the n-th image of a run, over all its batches, has label n % K), with classifier-free
guidance `sampling.guidance_scale` (Ho & Salimans 2022).

`sample(config, workdir)` is the `--mode=sample` entry: it restores the latest checkpoint
and writes `workdir/samples/sample_<step>.npz` ("samples" and, for a class-conditional
model, "labels") and a PNG of them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import compilation, losses, metrics_writer, models, samplers
from diffusion_jax import process as process_lib
from diffusion_jax.samplers import noise_schedule

DISCRETE_LOSSES = ("simple", "hybrid", "vlb")


def make_process(diffusion: ml_collections.ConfigDict) -> process_lib.DiffusionProcess:
    """The discrete process of `diffusion.schedule` with `diffusion.num_timesteps` steps."""
    return process_lib.make_process(
        diffusion.schedule, diffusion.num_timesteps, zero_terminal_snr=diffusion.zero_terminal_snr
    )


def network_fn(model, *, train: bool) -> Callable:
    """`apply_fn(params, x, t, label, rng) -> output`, the losses' view of the network."""

    def apply_fn(params, x, t, label, rng):
        rngs = {"dropout": rng} if train else {}
        return model.apply({"params": params}, x, t, label=label, train=train, rngs=rngs)

    return apply_fn


def sampling_schedule(diffusion: ml_collections.ConfigDict):
    """(schedule, prediction) that the samplers read the trained network with."""
    if diffusion.loss_type in DISCRETE_LOSSES:
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


def _sampler(config: ml_collections.ConfigDict, schedule, prediction: str):
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
    conditional = config.model.num_classes > 0
    return samplers.make_sampler(
        sampling.sampler,
        schedule=schedule,
        num_steps=sampling.num_steps,
        guidance_scale=sampling.guidance_scale if conditional else None,
        null_cond=config.model.num_classes if conditional else None,
        **options,
    )


def sample_labels(config: ml_collections.ConfigDict, count: int, offset=0) -> jnp.ndarray | None:
    """Labels of images offset, ..., offset + count - 1 of a run: `sampling.label`, or image
    n's n % K (0, 1, ..., K-1, 0, ... across batches). `offset` may be traced."""
    num_classes = config.model.num_classes
    if num_classes == 0:
        return None
    if config.sampling.label >= 0:
        return jnp.full((count,), config.sampling.label, jnp.int32)
    return (offset + jnp.arange(count, dtype=jnp.int32)) % num_classes


def make_generate_fn(config: ml_collections.ConfigDict, model, *, count: int) -> Callable:
    """`generate(params, rng, offset=0) -> x [count, ...]` with the configured sampler (jit
    it): images offset, ..., offset + count - 1 of a run. Pass `offset` as an array, so that
    one compiled program serves every batch."""
    schedule, prediction = sampling_schedule(config.diffusion)
    sample = _sampler(config, schedule, prediction)
    shape = (count, *models.sample_shape(config.model))

    def generate(params, rng, offset=0):
        noise_rng, sample_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, shape, jnp.float32)
        labels = sample_labels(config, count, offset)
        x0, _ = sample(model_fn_of(config, model, params, schedule), noise, sample_rng, labels)
        return x0

    return generate


def draw_samples(config: ml_collections.ConfigDict, generate: Callable, params):
    """(samples, labels): `sampling.num_images` images of `generate` in batches of
    `sampling.batch_size`, each batch told its offset (image n's label is n % K: classes
    balanced across batches); labels None for an unconditional model."""
    count, batch_size = config.sampling.num_images, config.sampling.batch_size
    rng = jax.random.key(config.sampling.seed)
    batches = []
    for index in range(-(-count // batch_size)):
        offset = jnp.asarray(index * batch_size, jnp.int32)
        batch = generate(params, jax.random.fold_in(rng, index), offset)
        batches.append(np.asarray(jax.device_get(batch)))
    labels = sample_labels(config, count)
    return np.concatenate(batches)[:count], None if labels is None else np.asarray(labels)


def write_samples(
    directory: str | pathlib.Path, name: str, samples: np.ndarray, *, reference=None
) -> pathlib.Path:
    """`name`.png: an image grid (images) or a scatter plot (2-D points); returns its path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2:
        picture = metrics_writer.scatter_image(samples, reference=reference)
    else:
        # Small images are enlarged to at least 32 pixels, to be seen in an image viewer.
        picture = metrics_writer.image_grid(samples, scale=max(1, -(-32 // samples.shape[1])))
    path = directory / f"{name}.png"
    metrics_writer.write_png(path, picture)
    return path


def sample(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
    """--mode=sample: `sampling.num_images` samples from the latest checkpoint's EMA params."""
    from diffusion_jax import train  # the train state and its restore live there

    model, state, step = train.restore_for_inference(config, workdir)
    params = train.inference_params(state, config)
    generate = compilation.CompiledTogether(
        jax.jit(make_generate_fn(config, model, count=config.sampling.batch_size)),
        "generate",
    )
    samples, labels = draw_samples(config, generate, params)
    directory = pathlib.Path(workdir) / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples} if labels is None else {"samples": samples, "labels": labels}
    np.savez(directory / f"sample_{step}.npz", **arrays)
    path = write_samples(directory, f"sample_{step}", samples)
    logging.info("Wrote %d samples of step %d to %s", len(samples), step, path)
    return path
