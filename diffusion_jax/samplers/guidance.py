"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any model function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.common import ModelFn


def classifier_free_guidance(
    model_fn: ModelFn, *, scale: float, null_cond, learned_variance: bool = False
) -> ModelFn:
    """The guided model out_null + scale (out_cond - out_null) (Eq. 6 of Ho & Salimans 2022).

    scale = 1 is the conditional model, 0 the unconditional one. The conditional and null
    inputs go through the network as one batch of 2B, so each call costs one evaluation.
    `null_cond` is the null condition (e.g. label num_classes), broadcast to cond's shape;
    cond may be a pytree. With `learned_variance` the second half of the output channels (a
    learned variance) is taken from the conditional output unguided, as in GLIDE.
    """

    def guided_fn(x, t, cond):
        if cond is None:
            raise ValueError(
                "classifier-free guidance needs a condition (e.g. class labels) to guide "
                "towards: cond is None, so the guidance scale would change nothing"
            )
        null = jax.tree.map(
            lambda c: jnp.broadcast_to(jnp.asarray(null_cond, c.dtype), c.shape), cond
        )
        both_cond = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null)
        output = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_cond)
        output_cond, output_null = jnp.split(output, 2)
        guided = output_null + scale * (output_cond - output_null)
        if learned_variance:
            mean_channels = output.shape[-1] // 2
            guided = jnp.concatenate(
                [guided[..., :mean_channels], output_cond[..., mean_channels:]], axis=-1
            )
        return guided

    return guided_fn
