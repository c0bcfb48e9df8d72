"""The text encoder of CLIP (Radford et al. 2021, Sec. 2.4), layer for layer as transformers'
`CLIPTextModel` and `CLIPTextModelWithProjection`: Stable Diffusion's text conditioning.

    model = CLIPTextModel(config)
    out = model.apply({"params": params}, input_ids)                # input_ids [B, 77] int32
    context = model.apply({"params": params}, input_ids, clip_skip=1, method=model.hidden_layer)

Token plus learned position embeddings; ``num_hidden_layers`` pre-LN layers
x + attn(LN(x)), x + MLP(LN(x)) with causal (masked) self-attention, so the state at
position i sees tokens <= i only; an MLP of quick-GELU x sigmoid(1.702 x) (OpenAI's) or
exact GELU (OpenCLIP's); a final LayerNorm. The pooled output is the final state at the
end-of-text token, projected by ``text_projection`` (no bias) when ``with_projection``.
Module names are transformers' parameter names with list indices joined by "_"
(``text_model.encoder.layers.0.self_attn.q_proj`` is ``text_model/encoder/layers_0/
self_attn/q_proj``), so that `convert.transformers_clip` maps its weights one to one.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import Dtype
from diffusion_jax.models.linear import Dense
from diffusion_jax.models.text.clip_config import CLIPTextConfig

LEGACY_EOS_TOKEN_ID = 2


class CLIPTextOutput(NamedTuple):
    """Float32 outputs of `CLIPTextModel` for input_ids [B, T]."""

    last_hidden_state: jax.Array  # [B, T, C], final LayerNorm applied
    pooled_output: jax.Array  # [B, C], last_hidden_state at the end-of-text token
    hidden_states: tuple[jax.Array, ...]  # L + 1 of [B, T, C]: embeddings, each layer (no LN)
    text_embeds: jax.Array | None  # [B, projection_dim] when with_projection, else None


def quick_gelu(x: jax.Array) -> jax.Array:
    """x sigmoid(1.702 x), the GELU approximation of OpenAI's CLIP (Hendrycks & Gimpel 2016)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] positions of the end-of-text token in input_ids [B, T], by transformers' rule:
    the argmax of the ids for legacy configs (eos_token_id 2: the eos id 49407 is the
    largest, so tokens added after it, e.g. by Textual Inversion, would be taken), else the
    first position holding ``eos_token_id`` (pads may equal it)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def _layer_norm(config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # PyTorch's two-pass variance: E[x^2] - E[x]^2 loses digits where the states' mean is large
    return nn.LayerNorm(config.layer_norm_eps, dtype, use_fast_variance=False, name=name)


def _embed(count: int, config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.Embed:
    init = nn.initializers.normal(0.02)  # transformers' initializer_range
    return nn.Embed(count, config.hidden_size, dtype, embedding_init=init, name=name)


class CLIPTextEmbeddings(nn.Module):
    """token_embedding[ids] + position_embedding[0..T): [B, T] -> [B, T, C]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        config, length = self.config, input_ids.shape[-1]
        if length > config.max_position_embeddings:
            raise ValueError(
                f"input_ids of {length} tokens; the model has max_position_embeddings="
                f"{config.max_position_embeddings}"
            )
        tokens = _embed(config.vocab_size, config, self.dtype, "token_embedding")(input_ids)
        positions = _embed(config.max_position_embeddings, config, self.dtype,
                           "position_embedding").embedding  # fmt: skip
        return tokens + positions[:length].astype(self.dtype)  # [B, T, C]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q, k, v and out projections."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        heads, width = config.num_attention_heads, config.hidden_size
        project = lambda name: Dense(width, dtype=self.dtype, name=name)
        split = lambda y: y.reshape(*y.shape[:2], heads, config.head_dim)  # [B, T, H, D]
        q, k, v = (split(project(f"{part}_proj")(x)) for part in "qkv")
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, H, D]
        return project("out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))), act being quick-GELU or exact GELU (``hidden_act``)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        h = Dense(config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = _ACTIVATIONS[config.hidden_act](h)
        return Dense(config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN1(x)), then + MLP(LN2(.)): [B, T, C] -> [B, T, C]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        x = x + CLIPAttention(config, self.dtype, name="self_attn")(
            _layer_norm(config, self.dtype, "layer_norm1")(x)
        )
        return x + CLIPMLP(config, self.dtype, name="mlp")(
            _layer_norm(config, self.dtype, "layer_norm2")(x)
        )


class CLIPEncoder(nn.Module):
    """The stack of layers; returns the states after the first ``num_layers`` of them."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        count = self.config.num_hidden_layers
        self.layers = [CLIPEncoderLayer(self.config, self.dtype) for _ in range(count)]

    def __call__(self, x: jax.Array, *, num_layers: int | None = None) -> list[jax.Array]:
        states = [x]  # [B, T, C] each: the input and each layer's output
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1]))
        return states


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm (transformers' ``text_model``)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = _layer_norm(self.config, self.dtype, "final_layer_norm")

    def __call__(self, input_ids: jax.Array, *, num_layers: int | None = None):
        """(hidden states, final LN of the last of them) after `num_layers` layers."""
        states = self.encoder(self.embeddings(input_ids), num_layers=num_layers)
        return states, self.final_layer_norm(states[-1])


class CLIPTextModel(nn.Module):
    """CLIP's text encoder (module docstring): transformers' `CLIPTextModel`, or its
    `CLIPTextModelWithProjection` when ``config.with_projection``. ``dtype`` is the
    compute dtype (bfloat16 for mixed precision); parameters and outputs are float32."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype)
        if self.config.with_projection:
            self.text_projection = nn.Dense(
                self.config.projection_dim, use_bias=False, dtype=self.dtype
            )

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """Every output of transformers' model for input_ids [B, T] (T <= 77)."""
        states, last = self.text_model(input_ids)
        index = eos_positions(input_ids, self.config.eos_token_id)  # [B]
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]  # [B, C]
        text_embeds = None
        if self.config.with_projection:
            text_embeds = self.text_projection(pooled).astype(jnp.float32)
        as_float = lambda x: x.astype(jnp.float32)
        return CLIPTextOutput(
            as_float(last), as_float(pooled), tuple(map(as_float, states)), text_embeds
        )

    def hidden_layer(self, input_ids: jax.Array, *, clip_skip: int = 0) -> jax.Array:
        """final_layer_norm(hidden_states[-(clip_skip + 1)]) [B, T, C], as diffusers'
        `encode_prompt` does (clip_skip=1: the penultimate layer, A1111's "Clip skip 2"),
        running only the layers it needs; clip_skip=0 is last_hidden_state."""
        layers = self.config.num_hidden_layers
        if not 0 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, num_hidden_layers={layers}]")
        _, normed = self.text_model(input_ids, num_layers=layers - clip_skip)
        return normed.astype(jnp.float32)
