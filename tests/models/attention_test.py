"""Tests of models/attention.py against a direct NumPy computation of softmax(q k^T / sqrt(d)) v."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.attention import MultiHeadAttention, attention


def _reference_attention(q, k, v, mask=None):
    """float64 softmax(q k^T / sqrt(d)) v per head; q [B, L, N, D], k and v [B, M, N, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("blnd,bmnd->bnlm", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bnlm,bmnd->blnd", weights, v)


def test_attention_with_a_key_mask_equals_the_direct_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    k, v = (rng.standard_normal((2, 7, 3, 4)).astype(np.float32) for _ in range(2))
    mask = np.ones((2, 1, 1, 7), bool)
    mask[1, ..., 4:] = False  # the second example's last three keys are padding
    ours = attention(q, k, v, mask=jnp.asarray(mask))
    np.testing.assert_allclose(ours, _reference_attention(q, k, v, mask), atol=2e-6)
    # masked keys have no influence: changing their values changes nothing
    v_changed = v.copy()
    v_changed[1, 4:] += 100.0
    np.testing.assert_allclose(attention(q, k, v_changed, mask=jnp.asarray(mask)), ours, atol=1e-5)


def test_cross_attention_projects_queries_from_x_and_keys_values_from_the_context():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)  # [B, L, C]
    context = rng.standard_normal((2, 3, 5)).astype(np.float32)  # [B, M, D]: e.g. text states
    layer = MultiHeadAttention(num_heads=2, head_dim=4)
    params = layer.init(jax.random.key(0), x, context)["params"]
    assert params["to_q"]["kernel"].shape == (8, 8) and "bias" not in params["to_q"]
    assert params["to_k"]["kernel"].shape == (5, 8) and params["to_v"]["kernel"].shape == (5, 8)
    ours = layer.apply({"params": params}, x, context)

    heads = lambda y: y.reshape(*y.shape[:2], 2, 4)
    q = heads(x @ np.asarray(params["to_q"]["kernel"]))
    k = heads(context @ np.asarray(params["to_k"]["kernel"]))
    v = heads(context @ np.asarray(params["to_v"]["kernel"]))
    out = _reference_attention(q, k, v).reshape(2, 6, 8)
    expected = out @ np.asarray(params["to_out_0"]["kernel"]) + np.asarray(
        params["to_out_0"]["bias"]
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_self_attention_is_cross_attention_on_itself():
    x = np.random.default_rng(2).standard_normal((1, 4, 8)).astype(np.float32)
    layer = MultiHeadAttention(num_heads=2, head_dim=4)
    params = layer.init(jax.random.key(1), x)["params"]
    np.testing.assert_allclose(
        layer.apply({"params": params}, x), layer.apply({"params": params}, x, x), atol=1e-6
    )
