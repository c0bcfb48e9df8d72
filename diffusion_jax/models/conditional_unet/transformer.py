"""The spatial transformer of latent diffusion: self-attention over the H x W positions,
cross-attention to the text states and a GEGLU feed-forward (Rombach et al. 2022, Sec. 3.3:
"cross-attention layers ... softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t), K = W_K tau(y),
V = W_V tau(y)"), layer for layer as diffusers' `Transformer2DModel` with
`BasicTransformerBlock`s, as Stable Diffusion uses them.

Attention runs through ``jax.nn.dot_product_attention``: in bfloat16 its logits are float32
sums of bfloat16 products and its softmax is float32, the probabilities bfloat16.
``upcast_attention`` (SD 2.1) computes all of q, k, v, the logits and the softmax in float32
at full matmul precision, as diffusers upcasts query and key. ``query_chunk_size`` splits
long query sequences into chunks attended one at a time (`attention`), so the logits held at
once are [B, heads, chunk, M] instead of [B, heads, L, M] (Rabe & Staats 2021's query
chunking; the keys are not chunked).

On CPUs XLA's ``dot_product_attention`` is slow on long sequences: for SD 1.5's 4096
positions (batch 2, 8 heads of 40) it took 4x the time of the same softmax written as two
einsums over query chunks of 1024 (measured 2026-12-03, 2 cores). So on the CPU backend
attention is those einsums (the same float32 logits and softmax), chunked by
`CPU_QUERY_CHUNK` unless `query_chunk_size` says otherwise; other backends keep
``jax.nn.dot_product_attention``, whose GPU kernels are fused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.layers import Dtype, zeros_init
from diffusion_jax.models.linear import Conv, Dense

TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm before proj_in
LAYER_NORM_EPS = 1e-5  # norm1, norm2, norm3 of each block


CPU_QUERY_CHUNK = 1024


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with float32 logits and softmax, the probabilities in v's
    dtype (as ``jax.nn.dot_product_attention`` computes them), as two einsums."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, heads, L, M]
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, query_chunk_size: int | None):
    """softmax(q k^T / sqrt(d)) v, over query chunks of `query_chunk_size` when q is longer
    (on CPUs by einsums in chunks of CPU_QUERY_CHUNK by default: module docstring)."""
    batch, length, heads, head_dim = q.shape
    on_cpu = jax.default_backend() == "cpu"
    attend = _einsum_attention if on_cpu else jax.nn.dot_product_attention
    if query_chunk_size is None and on_cpu:
        query_chunk_size = CPU_QUERY_CHUNK
    if query_chunk_size is None or length <= query_chunk_size:
        return attend(q, k, v)
    chunks = -(-length // query_chunk_size)
    q = jnp.pad(q, ((0, 0), (0, chunks * query_chunk_size - length), (0, 0), (0, 0)))
    q = q.reshape(batch, chunks, query_chunk_size, heads, head_dim).swapaxes(0, 1)
    # rematerialised, so that a gradient keeps one chunk's probabilities at a time too
    one_chunk = jax.checkpoint(lambda q_chunk: attend(q_chunk, k, v))
    out = jax.lax.map(one_chunk, q)  # [chunks, B, chunk, heads, head_dim]
    out = out.swapaxes(0, 1).reshape(batch, chunks * query_chunk_size, heads, head_dim)
    return out[:, :length]  # padded query rows are dropped; they touched no other row


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    upcast: bool = False,
    query_chunk_size: int | None = None,
) -> jax.Array:
    """Scaled dot-product attention of q [B, L, heads, d] over k, v [B, M, heads, d]
    (Vaswani et al. 2017, Eq. 1), output [B, L, heads, d] in q's dtype.

    ``upcast`` computes it all in float32 at full matmul precision (module docstring);
    ``query_chunk_size`` attends chunks of the queries one by one (same result up to float32
    rounding, less memory).
    """
    if query_chunk_size is not None and query_chunk_size < 1:
        raise ValueError(f"query_chunk_size={query_chunk_size} must be >= 1 (or None)")
    if not upcast:
        return _attend(q, k, v, query_chunk_size)
    with jax.default_matmul_precision("float32"):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return _attend(*f32, query_chunk_size).astype(q.dtype)


class Attention(nn.Module):
    """diffusers' `Attention` without bias on to_q, to_k, to_v and with a biased to_out_0:
    x [B, L, C] attends to `context` [B, M, D] (to itself when None); output [B, L, C]."""

    heads: int
    head_dim: int
    upcast: bool = False
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        project = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)

        def split_heads(y: jax.Array) -> jax.Array:  # [B, L, inner] -> [B, L, heads, d]
            return y.reshape(*y.shape[:2], self.heads, self.head_dim)

        q = split_heads(project("to_q")(x))
        k = split_heads(project("to_k")(context))
        v = split_heads(project("to_v")(context))
        out = attention(q, k, v, upcast=self.upcast, query_chunk_size=self.query_chunk_size)
        out = out.reshape(*x.shape[:2], inner)  # [B, L, inner]
        return Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to 2 x `inner`, then h * GELU(gate) of its two halves (Shazeer 2020, exact GELU
    as PyTorch's default)."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
        return hidden * nn.gelu(gate, approximate=False)  # [..., inner]


class FeedForward(nn.Module):
    """GEGLU to 4 x the width (net_0), then a linear layer back (net_2; net_1 is dropout)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """x + attn1(LN(x)); x + attn2(LN(x), text); x + ff(LN(x)), on x [B, L, inner]."""

    heads: int
    head_dim: int
    upcast: bool = False
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    def _norm(self, name: str) -> nn.LayerNorm:
        # two-pass variance, as PyTorch's LayerNorm
        return nn.LayerNorm(LAYER_NORM_EPS, self.dtype, use_fast_variance=False, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        options = dict(upcast=self.upcast, query_chunk_size=self.query_chunk_size)
        attend = lambda name: Attention(self.heads, self.head_dim, **options, dtype=self.dtype,
                                        name=name)  # fmt: skip
        x = x + attend("attn1")(self._norm("norm1")(x))
        x = x + attend("attn2")(self._norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(self._norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """x + proj_out(blocks(proj_in(GN(x)))) on x [B, H, W, C] with text `context` [B, M, D].

    proj_in / proj_out are 1x1 convolutions (SD 1.x) or, with ``use_linear_projection``,
    linear layers on the flattened positions (SD 2.x); the blocks are ``heads x head_dim``
    wide. proj_out starts at zero, so that a new block is the identity (LDM's zero_module).
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    def _projection(self, features: int, name: str, **kw):
        if self.use_linear_projection:
            return Dense(features, dtype=self.dtype, name=name, **kw)
        return Conv(features, (1, 1), dtype=self.dtype, name=name, **kw)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.norm_num_groups, TRANSFORMER_NORM_EPS, self.dtype, centered=True,
                      name="norm")(x)  # fmt: skip
        if self.use_linear_projection:
            h = self._projection(inner, "proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = self._projection(inner, "proj_in")(h).reshape(batch, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast,
                                      self.query_chunk_size, self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context)  # fmt: skip
        proj_out = self._projection(channels, "proj_out", kernel_init=zeros_init)
        if self.use_linear_projection:
            h = proj_out(h).reshape(batch, height, width, channels)
        else:
            h = proj_out(h.reshape(batch, height, width, inner))
        return h + x  # [B, H, W, C]
