"""Tests of convert/diffusers_conditional_unet.py: a diffusers `UNet2DConditionModel` folder
loads into our conditional U-Net, which then computes diffusers' prediction (the parity tests
need the [torch] extra); bad folders stop with the offending key, nothing half-loaded."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_jax.convert import diffusers_conditional_unet, torch_layout
from diffusion_jax.models import conditional_unet
from diffusion_jax.models.conditional_unet import UNet2DConditionModel, UNetConditionConfig

# SD 1.x's architecture at small widths: one int of heads, 1x1-conv projections
SD1_SHAPED = UNetConditionConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# SD 2.x's: heads per level, linear projections, float32 attention, two transformer layers
SD2_SHAPED = UNetConditionConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=48,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    norm_num_groups=32,
    use_linear_projection=True,
    upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
CLASS_CONDITIONAL = dataclasses.replace(SD1_SHAPED, layers_per_block=1, num_class_embeds=7)
TOLERANCE = 1e-5


def _diffusers_unet(config: UNetConditionConfig, seed: int):
    """diffusers' UNet2DConditionModel of `config` with every weight random: the ones it
    initialises to zero (conv_out, ...) and the norms' too, so that the test sees them all."""
    pytest.importorskip("diffusers", reason="parity with diffusers needs the [torch] extra")
    import torch
    from diffusers import UNet2DConditionModel as DiffusersUNet

    raw = config.to_diffusers()
    raw.pop("_class_name")
    torch.manual_seed(seed)
    unet = DiffusersUNet(**raw).eval()
    with torch.no_grad():
        for weight in unet.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    return unet


def _inputs(config: UNetConditionConfig, height: int, width: int, seed: int):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, height, width, config.in_channels)).astype(np.float32)
    timesteps = np.array([17.0, 503.25], np.float32)  # one fractional
    text = rng.standard_normal((2, 5, config.cross_attention_dim)).astype(np.float32)
    labels = None
    if config.num_class_embeds is not None:
        labels = rng.integers(0, config.num_class_embeds, 2)
    return sample, timesteps, text, labels


def _apply(config, params, sample, timesteps, text, labels=None):
    model = UNet2DConditionModel(config)
    return jax.jit(model.apply)({"params": params}, sample, timesteps, text, labels)


@pytest.mark.parametrize(
    ("config", "size"),
    [(SD1_SHAPED, (16, 16)), (SD2_SHAPED, (9, 11)), (CLASS_CONDITIONAL, (8, 8))],
    ids=["sd1", "sd2-odd-size", "class-conditional"],
)
def test_a_diffusers_folder_computes_diffusers_prediction(config, size, tmp_path):
    """save_pretrained's folder, read without torch, gives diffusers' prediction to 1e-5
    (float32). Measured max |ours - theirs|: 3.4e-6 (sd1), 3.2e-6 (sd2, whose odd 9 x 11
    input makes up block 0 upsample 5 x 6 to the skip's 9 x 11), 2.4e-6 (class), on outputs
    up to 2.8 in magnitude. Comparing every module's output shows where it comes from:
    float32 rounding (about 1e-7 relative per layer) accumulating over the ~60 layers, on
    hidden states up to ~11 in magnitude; conv_in agrees exactly."""
    unet = _diffusers_unet(config, seed=0)
    import torch

    unet.save_pretrained(tmp_path, safe_serialization=True)
    loaded_config, params = diffusers_conditional_unet.load_unet(tmp_path)
    assert loaded_config == config
    sample, timesteps, text, labels = _inputs(config, *size, seed=1)
    with torch.no_grad():
        theirs = unet(
            torch.from_numpy(sample.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            torch.from_numpy(text),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample.numpy()
    theirs = theirs.transpose(0, 2, 3, 1)
    ours = _apply(loaded_config, params, sample, timesteps, text, labels)
    difference = float(np.abs(np.asarray(ours) - theirs).max())
    assert ours.shape == theirs.shape == (2, *size, config.out_channels)
    assert difference <= TOLERANCE, f"max |ours - diffusers| = {difference:.2e}"


def _write_folder(folder, config: dict, state_dict: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture
def small_folder(tmp_path):
    config = dataclasses.replace(SD1_SHAPED, layers_per_block=1)
    params = conditional_unet.init_params(config, jax.random.key(0))
    return tmp_path, config, torch_layout.state_dict_from_params(params)


def test_our_weights_saved_in_diffusers_layout_load_back_identically(small_folder):
    folder, config, state_dict = small_folder
    _write_folder(folder, config.to_diffusers(), state_dict)
    loaded_config, loaded = diffusers_conditional_unet.load_unet(folder)
    assert loaded_config == config
    expected = conditional_unet.init_params(config, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_an_unsupported_option_is_refused_naming_the_folder_and_key(small_folder):
    folder, config, state_dict = small_folder
    raw = config.to_diffusers() | {"addition_embed_type": "text_time"}
    _write_folder(folder, raw, state_dict)
    with pytest.raises(ValueError, match=rf"{folder}/config.json: addition_embed_type="
                       r"'text_time' is not supported; supported: \[None\]"):  # fmt: skip
        diffusers_conditional_unet.load_unet(folder)


def test_a_missing_and_a_misshapen_weight_are_named_with_their_shapes(small_folder):
    folder, config, state_dict = small_folder
    del state_dict["time_embedding.linear_1.bias"]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state_dict[name] = np.zeros((32, 16), np.float32)
    _write_folder(folder, config.to_diffusers(), state_dict)
    with pytest.raises(ValueError) as error:
        diffusers_conditional_unet.load_unet(folder)
    message = str(error.value)
    assert f"{folder}/diffusion_pytorch_model.safetensors does not fit the model" in message
    assert "missing time_embedding.linear_1.bias (expected shape (128,))" in message
    assert f"{name} has shape (32, 16), expected (32, 32)" in message


def test_pickled_weights_are_refused(small_folder):
    folder, config, _ = small_folder
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_diffusers()))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(FileNotFoundError, match="only pickled weights.*safe_serialization=True"):
        diffusers_conditional_unet.load_unet(folder)
