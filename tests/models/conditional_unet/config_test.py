"""Tests of models/conditional_unet/config.py: diffusers' config.json names round trip, the
heads rule, the presets' published parameter counts, and refusals that name the key."""

import dataclasses

import jax
import numpy as np
import pytest

from diffusion_jax.models import conditional_unet
from diffusion_jax.models.conditional_unet import PRESETS, UNetConditionConfig

TINY = UNetConditionConfig(
    block_out_channels=(16, 32),
    layers_per_block=(1, 2),
    cross_attention_dim=8,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    num_class_embeds=3,
)


@pytest.mark.parametrize("config", [*PRESETS.values(), TINY], ids=[*PRESETS, "tiny"])
def test_the_diffusers_config_round_trips(config):
    raw = config.to_diffusers()
    assert raw["_class_name"] == "UNet2DConditionModel"
    assert UNetConditionConfig.from_diffusers(raw) == config


@pytest.mark.parametrize(
    ("name", "count"),
    [("sd15", 859_520_964), ("sd21", 865_910_724)],
)
def test_the_presets_have_the_published_parameter_counts(name, count):
    """SD 1.5's and SD 2.1's U-Nets (diffusers' counts, also checked against diffusers'
    UNet2DConditionModel of these configs on the meta device), without allocating them."""
    shapes = conditional_unet.param_shapes(PRESETS[name])
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == count


def test_heads_are_attention_head_dim_unless_num_attention_heads_is_given():
    """diffusers' misnomer (its #2011): SD 1.x's attention_head_dim=8 is 8 heads of
    320 / 8 = 40 ... 160 channels; SD 2.x's (5, 10, 20, 20) heads are each 64 wide."""
    assert PRESETS["sd15"].heads == (8, 8, 8, 8)
    assert PRESETS["sd15"].head_dims == (40, 80, 160, 160)
    assert PRESETS["sd21"].heads == (5, 10, 20, 20)
    assert PRESETS["sd21"].head_dims == (64, 64, 64, 64)
    explicit = dataclasses.replace(PRESETS["sd15"], num_attention_heads=(5, 10, 20, 20))
    assert explicit.heads == (5, 10, 20, 20) and explicit.head_dims == (64, 64, 64, 64)


def test_bookkeeping_keys_are_ignored_and_missing_keys_take_diffusers_defaults():
    raw = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
           "_name_or_path": "somewhere", "cross_attention_dim": 768}  # fmt: skip
    config = UNetConditionConfig.from_diffusers(raw)
    assert config == UNetConditionConfig(cross_attention_dim=768)
    assert config.block_out_channels == (320, 640, 1280, 1280) and config.norm_eps == 1e-5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]},
         r"down_block_types=\['AttnDownBlock2D', 'DownBlock2D'\]: \['AttnDownBlock2D'\] not "
         r"supported; supported: \['CrossAttnDownBlock2D', 'DownBlock2D'\]"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
         r"mid_block_type='UNetMidBlock2DSimpleCrossAttn' is not supported; supported: "
         r"\['UNetMidBlock2DCrossAttn', None\]"),
        ({"resnet_time_scale_shift": "scale_shift"},
         r"resnet_time_scale_shift='scale_shift' is not supported; supported: \['default'\]"),
        ({"only_cross_attention": True},
         r"only_cross_attention=True is not supported; supported: \[False\]"),
        ({"class_embed_type": "timestep"},
         r"class_embed_type='timestep' is not supported; supported: \[None\]"),
        ({"time_embedding_type": "fourier"},
         r"time_embedding_type='fourier' is not supported; supported: \['positional'\]"),
        ({"addition_embed_type": "text_time"},
         r"addition_embed_type='text_time' is not supported"),
        ({"transformer_layers_per_block": [[1, 2], [1, 2]]},
         r"transformer_layers_per_block=.*must be a positive int"),
        ({"attention_head_dim": [2, 4, 4]},
         r"attention_head_dim=\[2, 4, 4\] needs one entry per block_out_channels \(2\)"),
        ({"norm_num_groups": 12},
         r"norm_num_groups=12 must divide every entry of block_out_channels=\[16, 32\]"),
        ({"attention_head_dim": [32, 4]}, r"attention_head_dim: more heads than channels"),
        ({"some_future_option": 1}, r"unknown UNet2DConditionModel option\(s\) "
         r"\['some_future_option'\]"),
        ({"_class_name": "UNet2DModel"}, r"_class_name='UNet2DModel'"),
    ],
)  # fmt: skip
def test_unsupported_values_are_refused_naming_key_value_and_what_is_supported(change, message):
    raw = TINY.to_diffusers() | change
    with pytest.raises(ValueError, match=r"^unet/config.json: " + message):
        UNetConditionConfig.from_diffusers(raw, source="unet/config.json")


def test_ints_and_floats_equal_to_a_supported_value_are_accepted_but_bools_are_not_ints():
    raw = TINY.to_diffusers() | {"dropout": 0, "resnet_out_scale_factor": 1}
    assert UNetConditionConfig.from_diffusers(raw) == TINY
    with pytest.raises(ValueError, match="downsample_padding=True is not supported"):
        UNetConditionConfig.from_diffusers(TINY.to_diffusers() | {"downsample_padding": True})
