"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022, Sec. 3.3; the
denoiser of Stable Diffusion), layer for layer as diffusers' `UNet2DConditionModel`.

    model = UNet2DConditionModel(config)                       # config.UNetConditionConfig
    eps = model.apply({"params": params}, latents, t, text)    # [B, h, w, 4], [B], [B, 77, D]

time_proj (the sinusoidal embedding of t, Ho et al. 2020) and time_embedding (linear_1, SiLU,
linear_2), plus an optional class embedding; conv_in; the down blocks, each storing skip
states; the middle block; the up blocks, consuming the skip states last first (Ronneberger
et al. 2015); conv_norm_out, SiLU, conv_out. The text states enter every spatial transformer
through cross-attention. Module names are diffusers' parameter names with list indices
joined by "_" (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`` is
``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q``), so that
`convert.torch_layout` maps every weight generically.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.conditional_unet import blocks
from diffusion_jax.models.conditional_unet.config import MID, UNetConditionConfig
from diffusion_jax.models.layers import Dtype, zeros_init
from diffusion_jax.models.linear import Dense


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' `get_timestep_embedding(timesteps, dim, flip_sin_to_cos,
    downscale_freq_shift=freq_shift)`: frequencies max_period^(-k / (half - freq_shift)) for
    k < half = dim // 2, [sin, cos] of t times them ([cos, sin] when flipped), a zero column
    for odd `dim`. timesteps [B] (may be fractional) -> [B, dim] float32."""
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))  # [B, dim]


class TimestepEmbedding(nn.Module):
    """linear_2(SiLU(linear_1(x))): [B, D_in] -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class UNet2DConditionModel(nn.Module):
    """eps (or v) [B, H, W, out_channels] of a noisy latent `sample` [B, H, W, in_channels] at
    `timesteps` ([B] or a scalar, broadcast to the batch) given text states
    `encoder_hidden_states` [B, M, cross_attention_dim] (module docstring), float32.

    `class_labels` [B] (ints < num_class_embeds) is required exactly when the config has a
    class embedding. ``dtype`` is the compute dtype (parameters stay float32);
    ``query_chunk_size`` attends long sequences in query chunks (`transformer.attention`).
    """

    config: UNetConditionConfig
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    def _embedding(self, timesteps, class_labels, batch: int) -> jax.Array:
        """The time (+ class) embedding [B, time_embed_dim] the ResNet blocks add."""
        config = self.config
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(
            timesteps,
            config.block_out_channels[0],
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
        )
        emb = TimestepEmbedding(config.time_embed_dim, self.dtype, name="time_embedding")(t_emb)
        if (class_labels is None) != (config.num_class_embeds is None):
            raise ValueError(
                f"class_labels {'missing' if class_labels is None else 'given'} but "
                f"num_class_embeds={config.num_class_embeds}: labels are needed exactly when "
                "the config has a class embedding"
            )
        if class_labels is not None:
            embed = nn.Embed(config.num_class_embeds, config.time_embed_dim, dtype=self.dtype,
                             name="class_embedding")  # fmt: skip
            emb = emb + embed(jnp.asarray(class_labels).reshape(batch))
        return emb

    def _down(self, x, emb, context):
        skips = [x]
        for level, kind in enumerate(self.config.down_block_types):
            block = blocks.DOWN_BLOCKS[kind](self.config, level, self.query_chunk_size,
                                             self.dtype, name=f"down_blocks_{level}")  # fmt: skip
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        return x, skips

    def _up(self, x, skips, emb, context):
        levels = self.config.num_levels
        layers = self.config.per_level("layers_per_block")
        for i, kind in enumerate(self.config.up_block_types):
            level = levels - 1 - i
            count = layers[level] + 1
            block_skips, skips = skips[-count:], skips[:-count]
            # the next block's skip size: 2x, or diffusers' output_size for odd shapes
            output_size = skips[-1].shape[1:3] if level != 0 else None
            block = blocks.UP_BLOCKS[kind](self.config, level, self.query_chunk_size,
                                           self.dtype, name=f"up_blocks_{i}")  # fmt: skip
            x = block(x, tuple(block_skips), emb, context, output_size)
        return x

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        class_labels: jax.Array | None = None,
    ) -> jax.Array:
        config = self.config
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embedding(timesteps, class_labels, sample.shape[0])  # [B, T]
        context = encoder_hidden_states.astype(self.dtype)  # [B, M, D]
        x = blocks.conv3x3(config.block_out_channels[0], self.dtype, "conv_in")(sample)
        x, skips = self._down(x, emb, context)
        if config.mid_block_type == MID:
            last = config.num_levels - 1
            x = blocks.UNetMidBlock2DCrossAttn(config, last, self.query_chunk_size, self.dtype,
                                               name="mid_block")(x, emb, context)  # fmt: skip
        x = self._up(x, skips, emb, context)  # [B, H, W, C_0]
        x = nn.silu(blocks.group_norm(config, self.dtype, "conv_norm_out")(x))
        # conv_out starts at zero, so a new model predicts 0 (LDM's zero_module)
        x = blocks.conv3x3(config.out_channels, self.dtype, "conv_out", init=zeros_init)(x)
        return x.astype(jnp.float32)  # [B, H, W, out_channels]
