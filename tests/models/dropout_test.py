"""Dropout's counter-based bits: Threefry-2x32 as JAX computes it, and the dropout law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from diffusion_jax.models import build_model, sample_shape
from diffusion_jax.models import dropout as dropout_lib
from diffusion_jax.models import unet as unet_lib


def _threefry_of_counters(key, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JAX's Threefry-2x32 of the counter pairs (x0, x1): its two output words."""
    y = np.asarray(jax.extend.random.threefry_2x32(key, jnp.asarray(np.concatenate([x0, x1]))))
    return y[: x0.size], y[x0.size :]


@pytest.mark.parametrize("per_example_shape", [(2, 5), (3, 3)])  # even and odd sizes
def test_random_bits_are_threefry_at_the_counters_stream_times_batch_plus_example(
    per_example_shape,
):
    key = jax.random.PRNGKey(11)
    batch, stream = 3, 4
    n = int(np.prod(per_example_shape))
    pairs = (n + 1) // 2
    bits = dropout_lib.random_bits(key, stream, (batch, *per_example_shape))
    x0 = np.repeat(np.arange(batch, dtype=np.uint32) + stream * batch, pairs)
    x1 = np.tile(np.arange(pairs, dtype=np.uint32), batch)
    y0, y1 = _threefry_of_counters(key, x0, x1)
    words = np.concatenate([y0.reshape(batch, pairs), y1.reshape(batch, pairs)], axis=1)
    np.testing.assert_array_equal(bits, words[:, :n].reshape(batch, *per_example_shape))


def test_typed_and_raw_keys_give_the_same_bits():
    raw, typed = jax.random.PRNGKey(5), jax.random.key(5)
    np.testing.assert_array_equal(
        dropout_lib.random_bits(raw, 2, (2, 8)), dropout_lib.random_bits(typed, 2, (2, 8))
    )


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_each_element_with_probability_one_minus_rate_unbiased(rate):
    n = 2**20
    out = dropout_lib.dropout(jnp.ones((4, n // 4)), rate, jax.random.PRNGKey(1), stream=2)
    kept = np.asarray(out) != 0
    # Binomial(n, 1 - rate): five standard deviations.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / (1 - rate), rtol=1e-6)
    # E[dropout(x)] = x: the mean of dropout(1) is 1 within five standard deviations.
    assert abs(float(out.mean()) - 1) < 5 * np.sqrt(rate / (1 - rate) / n)


def test_bfloat16_kept_values_are_the_float32_scale_rounded_once():
    """x / (1 - rate) computed in float32, then rounded: 1 / 0.9 in bfloat16 (1.109375)
    would shrink every kept value, and the mean, by 0.16%."""
    x = jnp.asarray([1.0, 3.0, 7.0, 100.0], jnp.bfloat16)
    out = dropout_lib.dropout(jnp.tile(x, (2, 64)), 0.1, jax.random.PRNGKey(0), stream=0)
    kept = np.asarray(out, np.float32) != 0
    expected = (np.tile(np.asarray(x, np.float32), (2, 64)) / 0.9).astype(jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and kept.any()
    np.testing.assert_array_equal(np.asarray(out)[kept], expected[kept])


def test_masks_of_different_streams_and_examples_are_uncorrelated():
    n = 2**18
    key = jax.random.PRNGKey(2)
    masks = [
        np.asarray(dropout_lib.dropout(jnp.ones((2, n)), 0.5, key, stream) != 0, np.float64)
        for stream in (0, 1)
    ]
    pairs = [(masks[0][0], masks[0][1]), (masks[0][0], masks[1][0]), (masks[0][1], masks[1][1])]
    for a, b in pairs:  # correlation ~ N(0, 1/n) for independent masks
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)


def test_rate_zero_is_the_identity_and_bad_input_is_refused():
    x = jnp.arange(12.0).reshape(3, 4)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(dropout_lib.dropout(x, 0.0, key, 0), x)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        dropout_lib.dropout(x, 1.0, key, 0)
    with pytest.raises(ValueError, match="jax_default_prng_impl='threefry2x32'"):
        dropout_lib.dropout(x, 0.1, jnp.zeros(4, jnp.uint32), 0)  # rbg key data
    with pytest.raises(ValueError, match="2\\*\\*32 counters"):
        dropout_lib.random_bits(key, 2**30, (4, 3))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_rbg_keys_draw_the_bits_of_the_key_folded_with_the_stream(impl):
    key = jax.random.key(3, impl=impl)
    bits = dropout_lib.random_bits(key, 5, (2, 4, 3))
    expected = jax.random.bits(jax.random.fold_in(key, 5), (2, 4, 3), jnp.uint32)
    np.testing.assert_array_equal(bits, expected)
    n = 2**20
    out = dropout_lib.dropout(jnp.ones((4, n // 4)), 0.25, key, stream=1)
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.75) < 5 * np.sqrt(0.25 * 0.75 / n)
    other = np.asarray(dropout_lib.dropout(jnp.ones((4, n // 4)), 0.25, key, stream=2)) != 0
    assert abs(np.corrcoef(kept.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)


def test_raw_keys_follow_the_default_prng_implementation():
    with jax.default_prng_impl("rbg"):
        raw = jax.random.PRNGKey(7)  # uint32[4]
        bits = dropout_lib.random_bits(raw, 1, (2, 6))
    typed = jax.random.key(7, impl="rbg")
    np.testing.assert_array_equal(bits, dropout_lib.random_bits(typed, 1, (2, 6)))
    # A raw uint32[2] is Threefry's whatever the default.
    threefry = jax.random.key(7, impl="threefry2x32")
    with jax.default_prng_impl("rbg"):
        bits = dropout_lib.random_bits(jax.random.key_data(threefry), 1, (2, 6))
    np.testing.assert_array_equal(bits, dropout_lib.random_bits(threefry, 1, (2, 6)))


def test_unet_gives_each_res_block_its_own_stream(monkeypatch):
    config = presets.tiny()  # dropout 0.1
    model = build_model(config)
    x, t = jnp.zeros((2, *sample_shape(config))), jnp.zeros((2,))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t)["params"]
    streams = []

    def recording_dropout(h, rate, key, stream):
        streams.append(stream)
        return dropout_lib.dropout(h, rate, key, stream)

    monkeypatch.setattr(unet_lib, "dropout", recording_dropout)
    model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    res_blocks = [name for name in params if "_res_" in name]
    assert sorted(streams) == list(range(len(res_blocks)))
    streams.clear()
    model.apply({"params": params}, x, t, train=False)
    assert streams == []
