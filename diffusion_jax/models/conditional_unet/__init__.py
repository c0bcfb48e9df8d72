"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022, Sec. 3.3) as
diffusers' `UNet2DConditionModel`: its config (named as diffusers' config.json), the presets
of Stable Diffusion 1.x and 2.x, and the model."""

import jax
import jax.numpy as jnp

from diffusion_jax.models.conditional_unet.config import PRESETS, UNetConditionConfig
from diffusion_jax.models.conditional_unet.transformer import attention
from diffusion_jax.models.conditional_unet.unet import UNet2DConditionModel, timestep_embedding

__all__ = [
    "PRESETS",
    "UNet2DConditionModel",
    "UNetConditionConfig",
    "attention",
    "init_params",
    "param_shapes",
    "timestep_embedding",
]


def example_inputs(config: UNetConditionConfig, *, size: int | None = None):
    """(sample, timesteps, encoder_hidden_states, class_labels) of batch 1, zeros: the
    smallest call of `UNet2DConditionModel(config)` (`size` defaults to the downsampling
    factor, a 1 x 1 lowest resolution)."""
    size = size or config.downsampling_factor
    sample = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    text = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    labels = None if config.num_class_embeds is None else jnp.zeros((1,), jnp.int32)
    return sample, jnp.zeros((1,), jnp.float32), text, labels


def init_params(config: UNetConditionConfig, rng):
    """Float32 parameters of `UNet2DConditionModel(config)` (the same for any image size or
    text length; the init runs on the smallest inputs, `example_inputs`)."""
    model = UNet2DConditionModel(config)
    return jax.jit(lambda key: model.init(key, *example_inputs(config))["params"])(rng)


def param_shapes(config: UNetConditionConfig):
    """The `jax.ShapeDtypeStruct` tree of `init_params(config, ...)`, computed without
    allocating the parameters."""
    return jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
