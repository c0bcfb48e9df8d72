"""Tests of models/autoencoders/config.py: diffusers' config.json round trip, the presets'
published figures, refused options named by key."""

import jax
import numpy as np
import pytest

from diffusion_jax.models.autoencoders import (
    PRESETS,
    AutoencoderConfig,
    from_diffusion_latent,
    to_diffusion_latent,
)

# SD 1.5's vae/config.json (diffusers 0.6 era keys included)
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_sd15_config_is_the_sd_preset_and_round_trips():
    config = AutoencoderConfig.from_diffusers(SD15_VAE_CONFIG)
    assert config == PRESETS["sd"]
    assert config.downsampling_factor == 8 and config.scaling_factor == 0.18215
    assert AutoencoderConfig.from_diffusers(config.to_diffusers()) == config


def test_published_scalings_and_latent_widths():
    assert PRESETS["sdxl"].scaling_factor == 0.13025
    sd3 = PRESETS["sd3"]
    assert (sd3.latent_channels, sd3.scaling_factor, sd3.shift_factor) == (16, 1.5305, 0.0609)
    assert not sd3.use_quant_conv and not sd3.use_post_quant_conv
    flux = PRESETS["flux"]
    assert (flux.scaling_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert PRESETS["digits_f4"].downsampling_factor == 4


def test_diffusion_latents_invert_to_the_autoencoder_latents():
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    latent = to_diffusion_latent(z, PRESETS["sd3"])
    np.testing.assert_allclose(latent, (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(from_diffusion_latent(latent, PRESETS["sd3"]), z, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "VQModel"}, r"_class_name='VQModel'; allowed: 'AutoencoderKL'"),
        ({"act_fn": "gelu"}, r"act_fn='gelu'; allowed: \('silu',\)"),
        ({"norm_num_groups": 48}, r"norm_num_groups=48 must divide every entry"),
        (
            {"use_spatial_norm": True},
            r"unsupported AutoencoderKL option\(s\) \['use_spatial_norm'\]",
        ),
        ({"down_block_types": ["DownEncoderBlock2D"] * 3}, r"down_block_types=.*not supported"),
    ],
)
def test_unsupported_options_are_refused_by_key(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig.from_diffusers({**SD15_VAE_CONFIG, **change}, source="vae/config.json")
