"""An autoencoder run (`config.task = "autoencoder"`): the KL autoencoder of latent
diffusion trained through the same loop, checkpoints and logs as a diffusion model.

    state = train(config, workdir)          # --mode=train

The train state's parameters are {"autoencoder", "logvar"[, "discriminator"]}, with one
optimizer (`optim`) over all of them; `latent.autoencoder_loss` is the loss, with LPIPS
(`evaluation.lpips`) only when `autoencoder_loss.lpips_weights` names a converted weights
file (checked before any compute; the log says which, or that there is none). Reconstruction
grids of `sampling.num_images` test images (inputs above reconstructions) are written every
`training.sample_every` steps and at the end (WORKDIR/samples.png); `training.eval_every`
logs the test split's PSNR. At the end the autoencoder is exported to WORKDIR/autoencoder,
for `latent.autoencoder` of a latent diffusion run (configs/ldm_digits.py). --mode=eval and
--mode=sample are `runs.autoencoder_eval`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import data
from diffusion_jax.convert import diffusers_vae
from diffusion_jax.evaluation import lpips, lpips_weights, reconstruction
from diffusion_jax.latent import autoencoder_loss
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL
from diffusion_jax.models.autoencoders import init_params as init_autoencoder_params
from diffusion_jax.models.autoencoders.discriminator import PatchDiscriminator
from diffusion_jax.models.layers import COMPUTE_DTYPES
from diffusion_jax.runs import build, restore, validate
from diffusion_jax.runs import train as train_run
from diffusion_jax.runtime import compilation, images, metrics_writer, parallel, storage
from diffusion_jax.training import loop, optimizer, preemption, train_step
from diffusion_jax.training import train_state as train_state_lib
from diffusion_jax.training.train_state import TrainState

EXPORT_DIR = "autoencoder"


def autoencoder_config(config: ml_collections.ConfigDict) -> AutoencoderConfig:
    """The architecture of the `autoencoder` section, checked against the data."""
    section = config.autoencoder.to_dict()
    section.pop("dtype")
    try:
        architecture = AutoencoderConfig(**section)
    except ValueError as error:
        raise ValueError(f"autoencoder.{error}") from None
    if architecture.in_channels != config.data.num_channels:
        raise ValueError(
            f"autoencoder.in_channels={architecture.in_channels} differs from "
            f"data.num_channels={config.data.num_channels}; allowed: the same"
        )
    if config.data.image_size % architecture.downsampling_factor:
        raise ValueError(
            f"data.image_size={config.data.image_size} is not divisible by the autoencoder's "
            f"downsampling factor {architecture.downsampling_factor} (autoencoder."
            "block_out_channels); allowed: multiples of it"
        )
    return architecture


def loss_options(config: ml_collections.ConfigDict) -> autoencoder_loss.AutoencoderLoss:
    section = config.autoencoder_loss
    fields = {f.name for f in dataclasses.fields(autoencoder_loss.AutoencoderLoss)}
    try:
        return autoencoder_loss.AutoencoderLoss(**{k: section[k] for k in fields})
    except ValueError as error:
        raise ValueError(f"autoencoder_loss.{error}") from None


def perceptual_weights(config: ml_collections.ConfigDict) -> str | None:
    """`autoencoder_loss.lpips_weights`, checked to name a file; None when it is empty or
    `perceptual_weight` is 0 (no perceptual term)."""
    section = config.autoencoder_loss
    path = section.lpips_weights
    if not path or section.perceptual_weight == 0:
        return None
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(
            f"autoencoder_loss.lpips_weights={path!r}: no such file. Convert LPIPS's VGG16 "
            f"weights once with `python -m diffusion_jax.convert.lpips --out {path} --vgg "
            "VGG16.pth`, or set autoencoder_loss.lpips_weights='' for no perceptual term"
        )
    if config.data.num_channels not in (1, 3):
        raise ValueError(
            f"autoencoder_loss.lpips_weights={path!r} with data.num_channels="
            f"{config.data.num_channels}; LPIPS takes RGB or grey images (1 or 3 channels)"
        )
    return path


def make_perceptual_fn(config: ml_collections.ConfigDict) -> autoencoder_loss.PerceptualFn | None:
    """LPIPS (Zhang et al. 2018) with the weights of `autoencoder_loss.lpips_weights`, read
    and checked now, before any compute; None without them."""
    path = perceptual_weights(config)
    if path is None:
        return None
    try:
        params = lpips_weights.load_lpips(path)
    except ValueError as error:
        raise ValueError(f"autoencoder_loss.lpips_weights={path!r}: {error}") from None
    return functools.partial(lpips.lpips_distance, params)


@dataclasses.dataclass(frozen=True)
class Networks:
    architecture: AutoencoderConfig
    autoencoder: AutoencoderKL
    discriminator: PatchDiscriminator | None
    loss: autoencoder_loss.AutoencoderLoss


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    architecture = autoencoder_config(config)
    if config.autoencoder.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"autoencoder.dtype={config.autoencoder.dtype!r}; allowed: {tuple(COMPUTE_DTYPES)}"
        )
    dtype = COMPUTE_DTYPES[config.autoencoder.dtype]
    loss = loss_options(config)
    discriminator = None
    if loss.adversarial:
        section = config.autoencoder_loss
        discriminator = PatchDiscriminator(section.disc_channels, section.disc_layers, dtype)
    return Networks(architecture, AutoencoderKL(architecture, dtype), discriminator, loss)


def make_create_fn(config: ml_collections.ConfigDict, networks: Networks, tx):
    """`create(rng) -> TrainState` at step 0."""
    size, channels = config.data.image_size, config.data.num_channels

    def create(rng):
        ae_rng, disc_rng = jax.random.split(rng)
        params = {
            "autoencoder": init_autoencoder_params(networks.architecture, ae_rng),
            "logvar": jnp.zeros((), jnp.float32),
        }
        if networks.discriminator is not None:
            x = jnp.zeros((1, size, size, channels), jnp.float32)
            params["discriminator"] = networks.discriminator.init(disc_rng, x)["params"]
        return train_state_lib.create_train_state(
            params, tx, num_ema=len(config.training.ema_decays)
        )

    return create


def make_reconstruct_fn(networks: Networks):
    """`reconstruct(params, x) -> x_hat`: the decoded posterior mode of each image."""
    model = networks.autoencoder

    def reconstruct(params, x):
        return model.apply({"params": params["autoencoder"]}, x)[0]

    return reconstruct


def test_images(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
    """The first `count` images of `data.eval_split` (this process's share of them)."""
    iterator = data.make_eval_dataset(
        config.data, split=config.data.eval_split, seed=0, global_batch_size=count
    )
    batch = next(iter(iterator))
    iterator.close()
    return batch["x"]


def reconstruction_grid(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Rows of inputs, each above the row of its reconstructions, as one uint8 image."""
    columns = int(np.ceil(np.sqrt(len(inputs))))
    rows = []
    for start in range(0, len(inputs), columns):
        rows.extend([inputs[start : start + columns], outputs[start : start + columns]])
    padded = [np.concatenate([r, np.full((columns - len(r), *r.shape[1:]), -1.0)]) for r in rows]
    scale = max(1, 64 // inputs.shape[1])
    return images.image_grid(np.concatenate(padded), columns=columns, scale=scale)


def make_reconstruction_hook(config, networks, strategy, writer, workdir: epath.Path):
    """`hook(state, step, final=False) -> path` writing reconstruction grids."""
    reconstruct = jax.jit(make_reconstruct_fn(networks))
    inputs = test_images(config, config.sampling.num_images)

    def write_reconstructions(state: TrainState, step: int, *, final: bool = False):
        params = restore.inference_params(state, config, strategy)
        outputs = parallel.to_host(
            reconstruct(params, strategy.inference_batch({"x": inputs})["x"])
        )
        if jax.process_index() != 0:
            return None
        grid = reconstruction_grid(inputs, np.clip(outputs, -1, 1))
        path = workdir / "samples" / f"step_{step:07d}.png"
        images.write_png(path, grid)
        if final:
            path = workdir / "samples.png"
            images.write_png(path, grid)
        writer.write_image(step, "reconstructions", grid)
        logging.info("Wrote reconstructions of step %d to %s", step, path)
        return path

    return write_reconstructions


def make_psnr_hook(config, networks, strategy, writer):
    """`hook(state, step) -> float`: mean PSNR of `eval.num_batches` test batches."""
    reconstruct = make_reconstruct_fn(networks)
    psnr_fn = compilation.CompiledTogether(
        jax.jit(
            lambda params, batch: reconstruction.psnr(batch["x"], reconstruct(params, batch["x"]))
        ),
        "psnr",
    )

    def evaluate_psnr(state: TrainState, step: int) -> float:
        iterator = data.make_eval_dataset(
            config.data,
            split=config.data.eval_split,
            seed=config.training.seed,
            global_batch_size=config.eval.batch_size,
        )
        params = restore.inference_params(state, config, strategy)
        values = [
            parallel.to_host(psnr_fn(params, strategy.inference_batch(batch)))
            for _, batch in zip(range(config.eval.num_batches), iterator)
        ]
        iterator.close()
        value = float(np.mean(np.concatenate(values)))
        writer.write_scalars(step, {"eval_psnr": value})
        logging.info("Step %d: PSNR %.2f dB on %s", step, value, config.data.eval_split)
        return value

    return evaluate_psnr


def setup_trainer(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    perceptual_fn: autoencoder_loss.PerceptualFn | None = None,
) -> loop.Trainer:
    """The autoencoder's networks, optimizer, data, checkpoints, state and hooks;
    `perceptual_fn` (`make_perceptual_fn`) is the loss's LPIPS, None for none."""
    workdir = storage.as_path(workdir)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(config.training.batch_size, strategy.num_devices)
    networks = build_networks(config)
    tx, lr_schedule = optimizer.make_optimizer(config.optim, num_steps=config.training.num_steps)
    init_rng, train_rng = jax.random.split(jax.random.key(config.training.seed))
    create_fn = make_create_fn(config, networks, tx)
    iterator = build.make_train_iterator(config)
    manager = restore.checkpoint_manager(config, workdir)
    state = restore.restore_or_init(strategy, manager, create_fn, init_rng, iterator)
    loss_fn = autoencoder_loss.make_autoencoder_loss_fn(
        networks.autoencoder, networks.loss, networks.discriminator, perceptual_fn
    )
    step_fn = train_step.make_train_step(
        loss_fn,
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        ema_warmup=config.training.ema_warmup,
        axis_name=parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None,
        loss_takes_step=True,
    )
    writer = metrics_writer.MetricsWriter(
        workdir,
        enabled=jax.process_index() == 0,
        start_step=int(strategy.checkpointable(state).step),
    )
    return loop.Trainer(
        options=train_run.loop_options(config),
        strategy=strategy,
        state=state,
        train_step=strategy.compile_train_step(step_fn, jax.eval_shape(create_fn, init_rng)),
        data_iterator=iterator,
        manager=manager,
        writer=writer,
        stop_flag=preemption.StopFlag(),
        rng=train_rng,
        on_sample=make_reconstruction_hook(config, networks, strategy, writer, workdir),
        on_eval=make_psnr_hook(config, networks, strategy, writer),
    )


def export_autoencoder(config, trainer: loop.Trainer, out: epath.Path) -> None:
    """The trained autoencoder (parameters of `sampling.ema_index`) as a converted folder,
    the form `latent.autoencoder` and `convert.diffusers_vae.load_autoencoder` read."""
    params = restore.inference_params(trainer.state, config, trainer.strategy)["autoencoder"]
    diffusers_vae.save_converted(out, autoencoder_config(config), jax.device_get(params))
    logging.info("Exported the autoencoder of step %d to %s", trainer.host_step, out)


def describe_loss(loss: autoencoder_loss.AutoencoderLoss, lpips_path: str | None) -> str:
    """The loss's terms in words, for the log; `lpips_path`: `perceptual_weights(config)`."""
    terms = [f"{loss.reconstruction} reconstruction"]
    if lpips_path is not None:
        terms.append(f"{loss.perceptual_weight:g} x LPIPS (VGG16, weights {lpips_path})")
    terms.append(f"{loss.kl_weight:g} x KL")
    if loss.adversarial:
        terms.append(f"PatchGAN hinge loss (adaptive weight x {loss.disc_weight:g}) from step "
                     f"{loss.disc_start}")  # fmt: skip
    if lpips_path is not None:
        return " + ".join(terms)
    reason = "perceptual_weight is 0" if loss.perceptual_weight == 0 else "lpips_weights is empty"
    return " + ".join(terms) + f"; no perceptual (LPIPS) term (autoencoder_loss.{reason})"


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train the autoencoder (resuming from the latest checkpoint in `workdir`)."""
    validate.check_loop(config)
    perceptual_fn = make_perceptual_fn(config)  # a bad weights file stops the run here
    logging.info(
        "Autoencoder loss: %s", describe_loss(loss_options(config), perceptual_weights(config))
    )
    trainer = setup_trainer(config, workdir, perceptual_fn=perceptual_fn)
    grid = None
    try:
        if loop.train_loop(trainer):
            grid = trainer.on_sample(trainer.state, trainer.host_step, final=True)
            export_autoencoder(config, trainer, storage.as_path(workdir) / EXPORT_DIR)
    finally:
        trainer.close()
    train_run.write_summary(trainer, workdir, grid, eval_name="PSNR (dB)")
    return trainer.state
