"""Attention: scaled dot-product attention, and a multi-head attention layer over a sequence
that attends to itself (self-attention) or to a context such as text states (cross-attention).

Parameter names follow diffusers' `Attention` (`to_q`, `to_k`, `to_v`, without bias unless
`qkv_bias` as in its autoencoders, and `to_out_0` with bias), so that its weights map onto
ours one to one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import Dtype


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1).

    q is [B, L, heads, head_dim], k and v [B, M, heads, head_dim] in the compute dtype; `mask`
    (bool, broadcastable to [B, heads, L, M]) keeps the keys where it is True. The logits and
    the softmax are float32 (``jax.nn.dot_product_attention`` does so), which keeps bfloat16
    training stable; on GPUs XLA may choose a fused kernel.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, L, heads, head_dim]


class MultiHeadAttention(nn.Module):
    """Multi-head attention of x [B, L, C] over `context` [B, M, D] (cross-attention), or over
    x itself when no context is given (self-attention); output [B, L, C]."""

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        project = lambda name: nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)

        def heads(y: jax.Array) -> jax.Array:  # [B, L, inner] -> [B, L, heads, head_dim]
            return y.reshape(*y.shape[:2], self.num_heads, self.head_dim)

        q = heads(project("to_q")(x))
        k = heads(project("to_k")(context))
        v = heads(project("to_v")(context))
        out = attention(q, k, v, mask=mask).reshape(*x.shape[:2], inner)  # [B, L, inner]
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)
