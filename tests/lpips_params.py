"""Random LPIPS parameters for tests: Flax's default VGG16 initialisation and uniform
[0, 1) lin weights (non-negative, as trained LPIPS weights are). Only for tests: the
library never stands random weights in for LPIPS's."""

import jax
import jax.numpy as jnp

from diffusion_jax.evaluation import lpips


def random_params(seed: int = 0) -> dict:
    vgg_rng, lin_rng = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, lpips.MIN_SIZE, lpips.MIN_SIZE, 3), jnp.float32)
    vgg = lpips.VGG16Features().init(vgg_rng, x)["params"]
    keys = jax.random.split(lin_rng, len(lpips.TAPS))
    lin = {
        tap: jax.random.uniform(key, (channels,))
        for tap, channels, key in zip(lpips.TAPS, lpips.TAP_CHANNELS, keys)
    }
    return {"vgg": vgg, "lin": lin}
