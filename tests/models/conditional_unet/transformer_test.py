"""Tests of models/conditional_unet/transformer.py: chunked attention is full attention,
upcast attention is float32 attention, and the spatial transformer starts as the identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.conditional_unet import transformer


def _qkv(length: int, keys: int, dtype=jnp.float32, seed: int = 0):
    q, k, v = jax.random.normal(jax.random.key(seed), (3, 2, max(length, keys), 3, 8))
    return q[:, :length].astype(dtype), k[:, :keys].astype(dtype), v[:, :keys].astype(dtype)


def _reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64 NumPy (Vaswani et al. 2017, Eq. 1)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhd->blhd", probs, v)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_query_chunks_give_full_attention(chunk):
    """37 queries (not a multiple of 7 or 16: the last chunk is padded) over 11 keys."""
    q, k, v = _qkv(37, 11)
    full = transformer.attention(q, k, v)
    chunked = jax.jit(lambda *a: transformer.attention(*a, query_chunk_size=chunk))(q, k, v)
    np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(full, _reference(q, k, v), rtol=0, atol=1e-5)


def test_the_gradient_of_chunked_attention_is_that_of_full_attention():
    q, k, v = _qkv(37, 11)
    loss = lambda chunk: (
        lambda *a: jnp.sum(jnp.sin(transformer.attention(*a, query_chunk_size=chunk)))
    )
    full = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(8), argnums=(0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), chunked, full)


def test_upcast_attention_in_bfloat16_is_float32_attention_of_the_bfloat16_inputs():
    """The bfloat16 path (float32 logits of bfloat16 products, float32 softmax, bfloat16
    probabilities) is close; upcasting computes it all in float32, so its only error is the
    final rounding to bfloat16."""
    q, k, v = _qkv(33, 9, jnp.bfloat16)
    exact = _reference(q, k, v)
    for chunk in (None, 8):
        upcast = transformer.attention(q, k, v, upcast=True, query_chunk_size=chunk)
        assert upcast.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(upcast, np.float32), exact, rtol=2**-8, atol=1e-6)
    plain = transformer.attention(q, k, v)
    assert plain.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(plain, np.float32), exact, rtol=0, atol=0.05)


def test_a_new_spatial_transformer_is_the_identity_and_text_matters_once_trained():
    """proj_out starts at zero (LDM's zero_module); with every weight random, the output
    depends on the text states, but not on their order (attention over a set of tokens)."""
    block = transformer.Transformer2DModel(heads=2, head_dim=4, norm_num_groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    text = jax.random.normal(jax.random.key(1), (2, 5, 6))
    params = block.init(jax.random.key(2), x, text)["params"]
    np.testing.assert_array_equal(block.apply({"params": params}, x, text), x)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [p + 0.3 * jax.random.normal(key, p.shape) for p, key in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, noisy)
    out = block.apply({"params": params}, x, text)
    other_text = block.apply({"params": params}, x, text + 1.0)
    shuffled = block.apply({"params": params}, x, text[:, ::-1])
    assert np.abs(out - other_text).max() > 1e-2
    np.testing.assert_allclose(shuffled, out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("upcast", [False, True])
def test_bfloat16_attention_keeps_float32_logits(upcast):
    """One query (20) over keys 15, 15.0625, 15.125 (all exact in bfloat16) gives logits
    300, 301.25, 302.5: float32 keeps them, bfloat16 (spacing 2 there) would round them to
    300, 302, 302. With values 0, 0, 1 the output is the last key's probability,
    1 / (1 + e^-1.25 + e^-2.5) = 0.730 from float32 logits, 0.468 from bfloat16 ones."""
    q = jnp.full((1, 1, 1, 1), 20.0, jnp.bfloat16)
    k = jnp.array([15.0, 15.0625, 15.125], jnp.bfloat16).reshape(1, 3, 1, 1)
    v = jnp.array([0.0, 0.0, 1.0], jnp.bfloat16).reshape(1, 3, 1, 1)
    out = transformer.attention(q, k, v, upcast=upcast)
    expected = 1 / (1 + np.exp(-1.25) + np.exp(-2.5))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(out[0, 0, 0, 0]), expected, rtol=2**-8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_cpu_einsum_attention_is_dot_product_attention(dtype):
    """The CPU path (einsums, chunks of CPU_QUERY_CHUNK) computes what other backends'
    jax.nn.dot_product_attention does, on a sequence long enough to be chunked."""
    length = transformer.CPU_QUERY_CHUNK + 77
    q, k, v = _qkv(length, length, dtype)
    ours = jax.jit(transformer.attention)(q, k, v)
    theirs = jax.jit(jax.nn.dot_product_attention)(q, k, v)
    tolerance = 1e-6 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                               rtol=0, atol=tolerance)  # fmt: skip
    if dtype == jnp.float32:
        np.testing.assert_allclose(ours, _reference(q, k, v), rtol=0, atol=1e-5)
