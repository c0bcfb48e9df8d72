"""The text-conditional denoiser of latent diffusion (Rombach et al. 2022, Sec. 3.3): a
conditional U-Net whose spatial transformers cross-attend to the hidden states of a CLIP
text encoder (Radford et al. 2021) of the caption's token ids, both in one parameter tree.

    model = TextConditionalUNet(unet_config, text_config, train_text_encoder=False)
    eps = model.apply({"params": params}, x, t, label=input_ids)   # input_ids [B, L] int32

The parameters are {"text_encoder": CLIPTextModel's, "unet": UNet2DConditionModel's}, so
that a converted encoder (`convert.transformers_clip`) drops in under "text_encoder". With
``train_text_encoder=False`` the text states are a constant of the loss (no gradient flows
into the encoder, and XLA drops its backward pass); the optimizer leaves it out as well
(`runs.text_conditioning`). The empty caption's states are the null condition of
classifier-free guidance (Ho & Salimans 2022), as in Stable Diffusion.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.conditional_unet import UNet2DConditionModel, UNetConditionConfig
from diffusion_jax.models.layers import Dtype
from diffusion_jax.models.text import CLIPTextConfig, CLIPTextModel


class TextConditionalUNet(nn.Module):
    """eps (or x0, v) [B, H, W, C] of x [B, H, W, C] at network time t [B] given the token ids
    `label` [B, L] (L <= max_position_embeddings) of the captions."""

    unet_config: UNetConditionConfig
    text_config: CLIPTextConfig
    train_text_encoder: bool = True
    dtype: Dtype = jnp.float32
    num_classes: int = 0  # no class labels: `label` holds token ids

    @property
    def max_length(self) -> int:
        return self.text_config.max_position_embeddings

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, label: jax.Array | None = None,
                 train: bool = False) -> jax.Array:  # fmt: skip
        if label is None or jnp.ndim(label) != 2:
            raise ValueError(
                "a text-conditional model needs the captions' token ids [B, L] as its "
                f"condition, got {None if label is None else jnp.shape(label)}"
            )
        encoder = CLIPTextModel(self.text_config, self.dtype, name="text_encoder")
        # the last hidden states after the final LayerNorm, Stable Diffusion's context
        context = encoder.hidden_layer(jnp.asarray(label, jnp.int32))  # [B, L, D]
        if not self.train_text_encoder:  # a constant of the loss
            context = jax.lax.stop_gradient(context)
        unet = UNet2DConditionModel(self.unet_config, dtype=self.dtype, name="unet")
        return unet(x, t, context)
