"""Text encoders for text-to-image diffusion: CLIP's text transformer (Radford et al. 2021)
as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, its configs and the
presets of Stable Diffusion's, and CLIP's BPE tokenizer (Sennrich et al. 2016)."""

import jax
import jax.numpy as jnp

from diffusion_jax.models.text.clip import CLIPTextModel, CLIPTextOutput, eos_positions
from diffusion_jax.models.text.clip_config import PRESETS, CLIPTextConfig
from diffusion_jax.models.text.tokenizer import CLIPTokenizer

__all__ = [
    "PRESETS",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "CLIPTokenizer",
    "eos_positions",
    "init_params",
    "param_shapes",
]


def init_params(config: CLIPTextConfig, rng):
    """Float32 parameters of `CLIPTextModel(config)` (those of any sequence length)."""
    input_ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    model = CLIPTextModel(config)
    return jax.jit(lambda key: model.init(key, input_ids)["params"])(rng)


def param_shapes(config: CLIPTextConfig):
    """The `jax.ShapeDtypeStruct` tree of `init_params(config, ...)`, without allocating."""
    return jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
