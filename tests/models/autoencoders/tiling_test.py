"""Tests of models/autoencoders/tiling.py: tiles blend back into the untiled result where
each tile sees all it needs (a pixel-wise code), one tile is the untiled code, slicing
changes nothing (that the blend is diffusers' is tests/convert/diffusers_vae_test.py's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import autoencoders
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL, tiling


def _pixelwise_encoder(factor: int):
    """A code whose receptive field is one factor x factor cell: average pooling by the
    factor, then a fixed nonlinear map of the channels (every tile computes it exactly)."""
    weights = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)

    def encode(x):
        batch, height, width, channels = x.shape
        cells = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
        return jnp.tanh(cells.mean(axis=(2, 4)) @ weights)

    return encode


def _pixelwise_decoder(factor: int):
    def decode(z):
        return jnp.repeat(jnp.repeat(jnp.sin(z[..., :3]), factor, axis=1), factor, axis=2)

    return decode


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 72, 40, 3), (1, 96, 104, 3)])
def test_tiles_blend_into_the_untiled_code_when_each_tile_sees_its_whole_receptive_field(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    encode, decode = _pixelwise_encoder(8), _pixelwise_decoder(8)
    moments = tiling.tiled_encode(encode, x, tile_size=32, factor=8)
    np.testing.assert_allclose(moments, encode(x), rtol=0, atol=1e-6)
    images = tiling.tiled_decode(decode, moments, tile_size=32, factor=8)
    np.testing.assert_allclose(images, decode(moments), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def small_autoencoder():
    config = AutoencoderConfig(block_out_channels=(32, 32, 64), layers_per_block=1)
    params = autoencoders.init_params(config, jax.random.key(0))
    model = AutoencoderKL(config)
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))
    decode = jax.jit(lambda z: model.apply({"params": params}, z, method=model.decode))
    return config, encode, decode


def test_an_image_within_one_tile_is_coded_untiled(small_autoencoder):
    config, encode, decode = small_autoencoder
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    moments = tiling.tiled_encode(encode, x, tile_size=32, factor=4)
    np.testing.assert_array_equal(moments, encode(x))
    mean = moments[..., : config.latent_channels]
    np.testing.assert_array_equal(tiling.tiled_decode(decode, mean, tile_size=32, factor=4),
                                  decode(mean))  # fmt: skip


def test_slicing_gives_the_batched_code(small_autoencoder):
    config, encode, decode = small_autoencoder
    x = jax.random.uniform(jax.random.key(2), (5, 16, 16, 3), minval=-1, maxval=1)
    for slice_size in (1, 2):
        np.testing.assert_allclose(
            tiling.sliced(encode, x, slice_size=slice_size), encode(x), rtol=0, atol=1e-5
        )


def test_bad_tile_options_are_refused():
    with pytest.raises(ValueError, match="tiles 24 pixels apart, not a multiple of .* 16"):
        tiling.tiled_encode(lambda x: x, jnp.zeros((1, 64, 64, 3)), tile_size=32, factor=16)
    with pytest.raises(ValueError, match="tile_size=30 must be a multiple"):
        tiling.tiled_encode(lambda x: x, jnp.zeros((1, 64, 64, 3)), tile_size=30, factor=8)
    with pytest.raises(ValueError, match=r"overlap=1.0 must be in \[0, 1\)"):
        tiling.tiled_decode(lambda z: z, jnp.zeros((1, 8, 8, 4)), tile_size=32, factor=8,
                            overlap=1.0)  # fmt: skip
