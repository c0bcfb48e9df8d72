"""Latent diffusion (Rombach et al. 2022): the `latent` config section turns a diffusion
run into one over the latents of a trained autoencoder, decoded back to images.

    space = load_latent_space(config, scale)     # None for a pixel-space run
    step_fn = encoding_train_step(step_fn, space, base_rng)
    images = space.decode(latents)

The diffusion latent is (z - shift_factor) * scale, with z ~ q(z | x) (or its mean). The
scale is LDM's scale-by-std, 1 / std of the latents of the first training batch (Sec. 4.3.2
and App. D.1; SD's 0.18215 was found so), computed once when the run starts and kept in the
train state (`TrainState.latent_scale`), so a resumed run and its samples use the same one;
or, without `latent.scale_by_std`, the autoencoder's `scaling_factor`. The encoder runs
inside the compiled train step; its parameters are constants of it (never trained).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax.convert import diffusers_vae
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from diffusion_jax.runs import build
from diffusion_jax.runtime import storage

# the stream of the posterior samples, apart from the diffusion loss's (fold_in(rng, step))
POSTERIOR_STREAM = 0x1A7E
SCALE_STREAM = 0x5CA1E  # the posterior samples of the scale-by-std batch


def uses_latents(config: ml_collections.ConfigDict) -> bool:
    return bool(config.latent.autoencoder)


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """The autoencoder, its parameters and the scale of the diffusion latents."""

    config: AutoencoderConfig
    params: Any
    scale: float
    sample_posterior: bool = True

    @property
    def model(self) -> AutoencoderKL:
        return AutoencoderKL(self.config)

    def encode(self, x: jax.Array, rng: jax.Array) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] -> diffusion latents [B, H/f, W/f, L]."""
        model = self.model
        moments = model.apply({"params": self.params}, x, method=model.encode)
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.sample(rng) if self.sample_posterior else posterior.mode()
        return (z - self.config.shift_factor) * self.scale

    def decode(self, latents: jax.Array) -> jax.Array:
        """Diffusion latents -> images (about [-1, 1])."""
        model = self.model
        z = latents / self.scale + self.config.shift_factor
        return model.apply({"params": self.params}, z, method=model.decode)


def load_autoencoder(config: ml_collections.ConfigDict) -> tuple[AutoencoderConfig, Any]:
    """The autoencoder of `latent.autoencoder`, checked against the data and the model."""
    path = storage.as_path(config.latent.autoencoder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"latent.autoencoder={config.latent.autoencoder!r} is not a folder; allowed: an "
            "autoencoder run's WORKDIR/autoencoder, a converted or a diffusers VAE folder"
        )
    ae_config, params = diffusers_vae.load_autoencoder(path)
    check_model_fits(config, ae_config)
    return ae_config, params


def check_model_fits(config: ml_collections.ConfigDict, ae_config: AutoencoderConfig) -> None:
    """The diffusion model's input is the autoencoder's latent of the data's images."""
    size = config.data.image_size // ae_config.downsampling_factor
    expected = {
        "model.image_size": size,
        "model.in_channels": ae_config.latent_channels,
        "model.out_channels": ae_config.latent_channels,
    }
    found = {
        "model.image_size": config.model.image_size,
        "model.in_channels": config.model.in_channels,
        "model.out_channels": config.model.out_channels,
    }
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(
                f"{key}={found[key]} does not fit the latents of latent.autoencoder (data."
                f"image_size={config.data.image_size} / {ae_config.downsampling_factor} = "
                f"{size} pixels, {ae_config.latent_channels} channels); allowed: {key}={value}"
            )
    if config.data.num_channels != ae_config.in_channels:
        raise ValueError(
            f"data.num_channels={config.data.num_channels} differs from the autoencoder's "
            f"in_channels={ae_config.in_channels} (latent.autoencoder)"
        )
    if config.parallel.strategy == "pmap":
        raise ValueError("latent diffusion runs under jit: parallel.strategy must be 'data' or "
                         "'fsdp', not 'pmap'")  # fmt: skip
    for key, value in (("training.eval_every", config.training.eval_every),
                       ("eval.likelihoods", tuple(config.eval.likelihoods))):  # fmt: skip
        if value:
            raise ValueError(
                f"{key}={value}: the bits/dim of a latent model would be those of its latents, "
                f"not of images, and are not computed; allowed: {key}=0 or ()"
            )


def first_batch_scale(config, ae_config: AutoencoderConfig, params, rng) -> float:
    """1 / std of the latents of the first training batch (a fresh iterator: the run's own
    keeps its position)."""
    iterator = build.make_train_iterator(config)
    batch = next(iter(iterator))
    iterator.close()
    unscaled = LatentSpace(ae_config, params, 1.0, config.latent.sample_posterior)
    z = jax.jit(unscaled.encode)(jnp.asarray(batch["x"]), rng) + ae_config.shift_factor
    local = np.asarray(z, np.float64).reshape(-1)
    # the global batch's std from every process's sums
    sums = np.array([local.size, local.sum(), np.square(local).sum()])
    if jax.process_count() > 1:
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
    count, total, total_square = sums
    std = np.sqrt(total_square / count - (total / count) ** 2)
    return float(1.0 / std)


def initial_scale(config, ae_config: AutoencoderConfig, params, rng) -> float:
    if not config.latent.scale_by_std:
        return float(ae_config.scaling_factor)
    scale = first_batch_scale(config, ae_config, params, rng)
    logging.info("Latent scale by std of the first batch: %.6g", scale)
    return scale


def encoding_train_step(step_fn: Callable, space: LatentSpace, rng: jax.Array) -> Callable:
    """`step(state, batch, rng)` that trains `step_fn` on the batch's diffusion latents; the
    posterior sample of step s uses fold_in(fold_in(rng, POSTERIOR_STREAM), s)."""
    posterior_rng = jax.random.fold_in(rng, POSTERIOR_STREAM)

    def latent_step(state, batch, rng):
        latents = space.encode(batch["x"], jax.random.fold_in(posterior_rng, state.step))
        return step_fn(state, {**batch, "x": latents}, rng)

    return latent_step


def latent_space_of(config, ae_config, params, state) -> LatentSpace:
    """The latent space with the scale a (restored) train state holds."""
    scale = float(jax.device_get(state.latent_scale))
    return LatentSpace(ae_config, params, scale, config.latent.sample_posterior)


def replicated(tree, mesh):
    """`tree` on every device of `mesh` (the encoder's constants in a sharded program)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def decoder_for(config: ml_collections.ConfigDict, state, mesh) -> Callable | None:
    """`decode(latents) -> images` of a latent run's restored state; None in pixel space."""
    if not uses_latents(config):
        return None
    ae_config, params = load_autoencoder(config)
    return latent_space_of(config, ae_config, replicated(params, mesh), state).decode
