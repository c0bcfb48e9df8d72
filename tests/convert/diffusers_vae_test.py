"""Tests of convert/diffusers_vae.py: a diffusers `AutoencoderKL` folder loads into our
autoencoder, which then computes diffusers' posterior and decoder (the parity tests need the
[torch] extra); bad folders stop with the offending key and shapes, nothing half-loaded."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_jax.convert import diffusers_vae, torch_layout
from diffusion_jax.models import autoencoders
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from diffusion_jax.runtime import storage

# SD's architecture (4 levels, 2 ResNet blocks, GroupNorm 32) at small widths, and the
# 16-channel latent space of SD3 / Flux (no quantisation convolutions)
SD_SHAPED = AutoencoderConfig(block_out_channels=(32, 64, 64, 64))
SIXTEEN_CHANNELS = AutoencoderConfig(
    block_out_channels=(32, 64, 64, 64),
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _diffusers_autoencoder(config: AutoencoderConfig, seed: int):
    """diffusers' AutoencoderKL of `config` with every weight (norms included) random."""
    import torch
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    raw = config.to_diffusers()
    raw.pop("_class_name")
    torch.manual_seed(seed)
    vae = DiffusersAutoencoderKL(**raw).eval()
    with torch.no_grad():
        for weight in vae.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    return vae


@pytest.mark.parametrize("config", [SD_SHAPED, SIXTEEN_CHANNELS], ids=["sd", "16ch"])
def test_a_diffusers_folder_computes_diffusers_posterior_and_decoder(config, tmp_path):
    """save_pretrained's folder, read without torch, gives diffusers' posterior mean and
    log-variance and decoded image to 1e-5 (float32), relative to the output's scale."""
    pytest.importorskip("diffusers", reason="parity with diffusers needs the [torch] extra")
    import torch

    vae = _diffusers_autoencoder(config, seed=0)
    vae.save_pretrained(tmp_path)
    loaded_config, params = diffusers_vae.load_autoencoder(tmp_path)
    assert loaded_config == config
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        decoded = vae.decode(dist.mean).sample
    model = AutoencoderKL(config)
    posterior = DiagonalGaussian.from_moments(
        model.apply({"params": params}, x, method=model.encode)
    )
    ours_decoded = model.apply({"params": params}, posterior.mean, method=model.decode)
    for ours, theirs in [
        (posterior.mean, dist.mean),
        (posterior.logvar, dist.logvar),
        (ours_decoded, decoded),
    ]:
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1, np.abs(theirs).max()))


def test_our_weights_saved_in_diffusers_layout_load_back_identically(tmp_path):
    """state_dict_from_params inverts the loader: our tree -> PyTorch names and layouts ->
    a diffusers-shaped folder -> the same tree (no torch needed)."""
    config = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=3)
    params = autoencoders.init_params(config, jax.random.key(1))
    _write_folder(tmp_path, config.to_diffusers(), torch_layout.state_dict_from_params(params))
    loaded_config, loaded = diffusers_vae.load_autoencoder(tmp_path)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_a_converted_orbax_checkpoint_loads_the_same_weights(tmp_path):
    config = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1)
    folder, out = tmp_path / "vae", tmp_path / "converted"
    params = autoencoders.init_params(config, jax.random.key(2))
    _write_folder(folder, config.to_diffusers(), torch_layout.state_dict_from_params(params))
    diffusers_vae.main(["--vae", str(folder), "--out", str(out)])
    loaded_config, loaded = diffusers_vae.load_autoencoder(out)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _write_folder(folder, config: dict, state_dict: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture
def small_folder(tmp_path):
    config = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1)
    params = autoencoders.init_params(config, jax.random.key(3))
    state_dict = torch_layout.state_dict_from_params(params)
    return tmp_path, config.to_diffusers(), state_dict


def test_an_unsupported_block_type_is_refused_naming_the_key(small_folder):
    folder, config, state_dict = small_folder
    config["up_block_types"] = ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    _write_folder(folder, config, state_dict)
    with pytest.raises(ValueError, match=r"config.json: up_block_types=.*AttnUpDecoderBlock2D.*"
                       r"allowed: \['UpDecoderBlock2D', 'UpDecoderBlock2D'\]"):  # fmt: skip
        diffusers_vae.load_autoencoder(folder)


def test_a_missing_and_a_misshapen_weight_are_named_with_their_shapes(small_folder):
    folder, config, state_dict = small_folder
    del state_dict["decoder.conv_out.bias"]
    state_dict["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    _write_folder(folder, config, state_dict)
    with pytest.raises(ValueError) as error:
        diffusers_vae.load_autoencoder(folder)
    message = str(error.value)
    assert "diffusion_pytorch_model.safetensors does not fit the model" in message
    assert "missing decoder.conv_out.bias (expected shape (3,))" in message
    assert "encoder.conv_in.weight has shape (32, 3, 5, 5), expected (32, 3, 3, 3)" in message


def test_deprecated_attention_names_are_read_as_the_current_ones(small_folder):
    folder, config, state_dict = small_folder
    for ours, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                      ("to_out.0", "proj_attn")]:  # fmt: skip
        for leaf in ("weight", "bias"):
            name = f"encoder.mid_block.attentions.0.{ours}.{leaf}"
            state_dict[name.replace(ours, old)] = state_dict.pop(name)
    _write_folder(folder, config, state_dict)
    diffusers_vae.load_autoencoder(folder)


def test_pickled_weights_are_refused_with_the_way_to_convert(small_folder):
    folder, config, _ = small_folder
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(FileNotFoundError, match="only pickled weights.*safe_serialization=True"):
        diffusers_vae.load_autoencoder(folder)


def test_tiled_and_sliced_coding_equal_diffusers_tiling_and_slicing():
    """tiling.tiled_encode / tiled_decode blend tiles as diffusers' enable_tiling does: on an
    image of 3 x 4 overlapping 32-pixel tiles, the same moments and decoded image to 1e-5."""
    pytest.importorskip("diffusers", reason="parity with diffusers needs the [torch] extra")
    import torch

    from diffusion_jax.models.autoencoders import tiling

    vae = _diffusers_autoencoder(SD_SHAPED, seed=1)
    vae.enable_tiling()
    vae.enable_slicing()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    state_dict = {name: value.numpy() for name, value in vae.state_dict().items()}
    params = diffusers_vae.autoencoder_params_from_diffusers(state_dict, SD_SHAPED, source="vae")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 88, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        decoded = vae.decode(dist.mean).sample.numpy().transpose(0, 2, 3, 1)
    moments_theirs = dist.parameters.numpy().transpose(0, 2, 3, 1)
    model = AutoencoderKL(SD_SHAPED)
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))
    decode = jax.jit(lambda z: model.apply({"params": params}, z, method=model.decode))
    moments = tiling.tiled_encode(
        lambda x: tiling.sliced(encode, x, slice_size=1), x, tile_size=32, factor=8
    )
    mean = DiagonalGaussian.from_moments(moments).mean
    ours_decoded = tiling.tiled_decode(decode, mean, tile_size=32, factor=8)
    assert moments.shape == moments_theirs.shape == (2, 8, 11, 8)
    for ours, theirs in [(moments, moments_theirs), (ours_decoded, decoded)]:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1, np.abs(theirs).max()))


def test_a_diffusers_folder_and_a_converted_one_load_from_a_bucket(small_folder, gcs_emulator):
    """A VAE folder in a bucket (gs://, the GCS emulator) loads the weights written there,
    read whole without a local copy; so does a converted Orbax folder saved to the bucket."""
    local, config, state_dict = small_folder
    _write_folder(local, config, state_dict)
    bucket = storage.as_path(gcs_emulator.new_bucket())
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (bucket / "vae" / name).write_bytes((local / name).read_bytes())
    loaded_config, params = diffusers_vae.load_autoencoder(f"{bucket}/vae")
    assert loaded_config.to_diffusers() == config
    loaded = torch_layout.state_dict_from_params(params)
    assert loaded.keys() == state_dict.keys()
    for name, value in state_dict.items():
        np.testing.assert_array_equal(loaded[name], value)

    out = diffusers_vae.save_converted(f"{bucket}/converted", loaded_config, params)
    assert str(out) == f"{bucket}/converted"
    _, converted = diffusers_vae.load_autoencoder(out)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
