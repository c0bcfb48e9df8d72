"""Autoencoders for latent diffusion: the KL autoencoder of Rombach et al. (2022) as
diffusers' `AutoencoderKL`, its posterior, the presets of published latent spaces, and
memory-bounded (tiled, sliced) encoding and decoding."""

import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoders.config import (
    PRESETS,
    AutoencoderConfig,
    from_diffusion_latent,
    to_diffusion_latent,
)
from diffusion_jax.models.autoencoders.kl import AutoencoderKL
from diffusion_jax.models.autoencoders.posterior import DiagonalGaussian

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "from_diffusion_latent",
    "init_params",
    "param_shapes",
    "to_diffusion_latent",
]


def init_params(config: AutoencoderConfig, rng, *, image_size: int | None = None):
    """Float32 parameters of `AutoencoderKL(config)` (the same for any image size; a small
    one, `image_size` defaulting to 2 x the downsampling factor, keeps the init cheap)."""
    size = image_size or 2 * config.downsampling_factor
    x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    model = AutoencoderKL(config)
    return jax.jit(lambda key: model.init(key, x)["params"])(rng)


def param_shapes(config: AutoencoderConfig):
    """The `jax.ShapeDtypeStruct` tree of `init_params(config, ...)`, computed without
    allocating the parameters."""
    return jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
