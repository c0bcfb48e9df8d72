"""Tests of models/conditional_unet/unet.py: the time embedding's closed form, the zero
output of a new model, what the prediction does and does not depend on (text states and
their order, other batch entries, the timestep's broadcast), chunked attention and
bfloat16 compute."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conditional_unet
from diffusion_jax.models.conditional_unet import (
    UNet2DConditionModel,
    UNetConditionConfig,
    timestep_embedding,
)
from diffusion_jax.models.layers import sinusoidal_embedding

TINY = UNetConditionConfig(
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def test_freq_shift_one_without_flip_is_ddpms_embedding_and_flip_swaps_the_halves():
    """get_timestep_embedding(downscale_freq_shift=1) has DDPM's frequencies
    10000^(-k / (half - 1)) (`layers.sinusoidal_embedding`); SD's flip_sin_to_cos=True,
    freq_shift=0 is [cos, sin] with 10000^(-k / half)."""
    t = jnp.array([0.0, 3.5, 999.0])
    ddpm = timestep_embedding(t, 32, flip_sin_to_cos=False, freq_shift=1)
    np.testing.assert_allclose(ddpm, sinusoidal_embedding(t, 32), rtol=0, atol=1e-6)
    sd = timestep_embedding(t, 32, flip_sin_to_cos=True, freq_shift=0)
    angles = np.asarray(t)[:, None] * 10000.0 ** (-np.arange(16) / 16)
    np.testing.assert_allclose(sd, np.concatenate([np.cos(angles), np.sin(angles)], -1),
                               rtol=0, atol=1e-4)  # fmt: skip
    odd = timestep_embedding(t, 33, flip_sin_to_cos=True, freq_shift=0)
    np.testing.assert_array_equal(odd[:, :32], sd)
    np.testing.assert_array_equal(odd[:, 32], 0.0)


@functools.cache
def _initial_params(config):
    return conditional_unet.init_params(config, jax.random.key(0))


@functools.cache
def _random_params(config):
    """Initial parameters with every leaf perturbed, the zero-initialised ones included."""
    leaves, tree = jax.tree.flatten(_initial_params(config))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(key, p.shape) for p, key in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


@functools.cache
def _apply(config, *, query_chunk_size=None, dtype=jnp.float32):
    """The jitted apply (compiled once per model and input shapes, shared by the tests)."""
    return jax.jit(UNet2DConditionModel(config, query_chunk_size, dtype).apply)


def _inputs(config, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    sample = jax.random.normal(k1, (2, 8, 8, config.in_channels))
    text = jax.random.normal(k2, (2, 3, config.cross_attention_dim))
    return sample, jnp.array([10.0, 700.0]), text


@pytest.fixture(scope="module")
def trained():
    """(apply, params): the jitted float32 model with random (not initial) weights."""
    return _apply(TINY), _random_params(TINY)


def test_a_new_model_predicts_zero_whatever_its_inputs():
    """conv_out starts at zero (LDM's zero_module), so training starts from eps_hat = 0."""
    out = _apply(TINY)({"params": _initial_params(TINY)}, *_inputs(TINY))
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_the_prediction_depends_on_the_text_states_but_not_on_their_order(trained):
    """Cross-attention (Rombach et al. 2022, Sec. 3.3) sees the text tokens as a set: no
    position enters the U-Net, so reversing the tokens changes nothing, other states do."""
    apply, params = trained
    sample, t, text = _inputs(TINY)
    out = apply({"params": params}, sample, t, text)
    other = apply({"params": params}, sample, t, text.at[:, 0].add(1.0))
    reversed_tokens = apply({"params": params}, sample, t, text[:, ::-1])
    assert np.abs(out - other).max() > 1e-3
    np.testing.assert_allclose(reversed_tokens, out, rtol=0, atol=1e-5)


def test_each_prediction_depends_on_its_own_batch_entry_only(trained):
    apply, params = trained
    sample, t, text = _inputs(TINY)
    out = apply({"params": params}, sample, t, text)
    changed = apply({"params": params}, sample.at[1].add(1.0), t, text.at[1].add(1.0))
    np.testing.assert_allclose(changed[0], out[0], rtol=0, atol=1e-6)
    assert np.abs(changed[1] - out[1]).max() > 1e-3


def test_a_scalar_timestep_is_the_same_timestep_for_the_whole_batch(trained):
    apply, params = trained
    sample, _, text = _inputs(TINY)
    scalar = apply({"params": params}, sample, jnp.float32(250), text)
    per_example = apply({"params": params}, sample, jnp.array([250.0, 250.0]), text)
    np.testing.assert_allclose(scalar, per_example, rtol=0, atol=1e-6)


def test_query_chunked_attention_gives_the_same_prediction(trained):
    """Chunks of 5 of the 64 positions at the top level (not a multiple: padded)."""
    apply, params = trained
    inputs = _inputs(TINY)
    chunked = _apply(TINY, query_chunk_size=5)({"params": params}, *inputs)
    np.testing.assert_allclose(chunked, apply({"params": params}, *inputs), rtol=0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_stays_close(trained):
    """(upcast attention in bfloat16: transformer_test.py)"""
    apply, params = trained
    inputs = _inputs(TINY)
    model = UNet2DConditionModel(TINY, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)["params"])
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    low = _apply(TINY, dtype=jnp.bfloat16)({"params": params}, *inputs)
    full = apply({"params": params}, *inputs)
    assert low.dtype == jnp.float32
    assert float(np.abs(low - full).max()) < 0.05 * float(np.abs(full).max())


def test_class_labels_are_embedded_and_required_exactly_with_num_class_embeds():
    config = dataclasses.replace(TINY, num_class_embeds=3)
    params = _random_params(config)
    assert params["class_embedding"]["embedding"].shape == (3, config.time_embed_dim)
    inputs = _inputs(config)
    apply = _apply(config)
    first = apply({"params": params}, *inputs, jnp.array([0, 0]))
    second = apply({"params": params}, *inputs, jnp.array([0, 2]))
    np.testing.assert_allclose(second[0], first[0], rtol=0, atol=1e-6)
    assert np.abs(second[1] - first[1]).max() > 1e-3
    with pytest.raises(ValueError, match="class_labels missing but num_class_embeds=3"):
        jax.eval_shape(functools.partial(apply, {"params": params}), *inputs)
    with pytest.raises(ValueError, match="class_labels given but num_class_embeds=None"):
        jax.eval_shape(_apply(TINY), {"params": _random_params(TINY)}, *inputs, jnp.zeros(2))
