"""Tests of convert/transformers_clip.py: a transformers CLIP text encoder folder loads into
our `CLIPTextModel`, which then computes transformers' outputs (the parity tests need the
[torch] extra); bad folders stop with the offending key and shapes, nothing half-loaded."""

import json
import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from diffusion_jax.convert import torch_layout, transformers_clip
from diffusion_jax.models import text
from diffusion_jax.models.text import CLIPTextConfig, CLIPTextModel

VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
            num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
# eos 2 is the legacy argmax rule of SD folders; eos = the vocabulary's last id otherwise
CASES = {
    "quick_gelu": CLIPTextConfig(**TINY, num_hidden_layers=2, hidden_act="quick_gelu",
                                 bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "gelu_projection": CLIPTextConfig(**TINY, num_hidden_layers=3, hidden_act="gelu",
                                      bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                                      pad_token_id=0, with_projection=True),
}  # fmt: skip


def _token_batch(length: int = 16) -> np.ndarray:
    """[4, length] ids: bos, random words, eos at positions 1, 5, 9 and length - 1, then pads
    of both conventions (eos, as CLIP-L pads, or 0, as OpenCLIP's "!")."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB - 2, (4, length))
    ids[:, 0] = VOCAB - 2
    for row, (eos, pad) in enumerate([(1, VOCAB - 1), (5, 0), (9, VOCAB - 1), (length - 1, 0)]):
        ids[row, eos], ids[row, eos + 1 :] = VOCAB - 1, pad
    return ids.astype(np.int32)


def _transformers_model(config: CLIPTextConfig, seed: int):
    """transformers' model of `config` with every weight (norms included) random."""
    import torch
    import transformers

    raw = config.to_transformers()
    architecture = raw.pop("architectures")[0]
    raw.pop("model_type")
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(transformers.CLIPTextConfig(**raw)).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_transformers_folder_computes_transformers_outputs(name, tmp_path):
    """save_pretrained's folder, read without torch, gives transformers' last_hidden_state,
    pooled output, text_embeds, every hidden state and the clip_skip=1 states to 1e-5."""
    pytest.importorskip("transformers", reason="parity with transformers needs [torch]")
    import torch

    config = CASES[name]
    theirs_model = _transformers_model(config, seed=1)
    theirs_model.save_pretrained(tmp_path)
    loaded_config, params = transformers_clip.load_text_encoder(tmp_path)
    assert loaded_config == config
    ids = _token_batch()
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(ids).long(), output_hidden_states=True)
    model = CLIPTextModel(config)
    ours = model.apply({"params": params}, ids)
    skip = model.apply({"params": params}, ids, clip_skip=1, method=model.hidden_layer)
    # transformers 4's CLIPTextModel wraps its layers in .text_model, as 5's WithProjection does
    final_norm = getattr(theirs_model, "text_model", theirs_model).final_layer_norm
    with torch.no_grad():
        theirs_skip = final_norm(theirs.hidden_states[-2])
    pairs = [(ours.last_hidden_state, theirs.last_hidden_state), (skip, theirs_skip)]
    pairs += list(zip(ours.hidden_states, theirs.hidden_states, strict=True))
    if config.with_projection:
        pairs.append((ours.text_embeds, theirs.text_embeds))
    else:
        pairs.append((ours.pooled_output, theirs.pooler_output))
    for ours_value, theirs_value in pairs:
        np.testing.assert_allclose(ours_value, theirs_value.numpy(), rtol=0, atol=1e-5)


def test_our_weights_in_the_hub_layout_load_back_identically(tmp_path):
    """state_dict_from_params gives the Hub's names (text_model. prefix, as transformers 4
    saved); with the position_ids buffer old folders carry, they load to the same tree."""
    config = CASES["gelu_projection"]
    params = text.init_params(config, jax.random.key(1))
    state_dict = torch_layout.state_dict_from_params(params)
    assert "text_model.encoder.layers.2.self_attn.out_proj.weight" in state_dict
    state_dict["text_model.embeddings.position_ids"] = np.arange(16)[None]
    _write_folder(tmp_path, config.to_transformers(), state_dict)
    loaded_config, loaded = transformers_clip.load_text_encoder(tmp_path)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _write_folder(folder, config: dict, state_dict: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(folder / "model.safetensors"))


@pytest.fixture
def small_folder(tmp_path):
    config = CASES["quick_gelu"]
    params = text.init_params(config, jax.random.key(2))
    return tmp_path, config.to_transformers(), torch_layout.state_dict_from_params(params)


def test_a_missing_and_a_misshapen_weight_are_named_with_the_folder(small_folder):
    folder, config, state_dict = small_folder
    del state_dict["text_model.final_layer_norm.bias"]
    state_dict["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    _write_folder(folder, config, state_dict)
    with pytest.raises(ValueError) as error:
        transformers_clip.load_text_encoder(folder)
    message = str(error.value)
    assert f"{folder / 'model.safetensors'} does not fit the model" in message
    assert "missing text_model.final_layer_norm.bias (expected shape (32,))" in message
    assert "text_model.encoder.layers.1.mlp.fc1.weight has shape (65, 32), expected (64, 32)" in (
        message
    )


def test_a_projection_the_config_does_not_have_is_named(small_folder):
    folder, config, state_dict = small_folder
    state_dict["text_projection.weight"] = np.zeros((24, 32), np.float32)
    _write_folder(folder, config, state_dict)
    with pytest.raises(ValueError, match=r"unexpected text_projection.weight \(shape \(24, 32\)\)"):
        transformers_clip.load_text_encoder(folder)


def test_an_unknown_architecture_is_refused_naming_the_folder(small_folder):
    folder, config, state_dict = small_folder
    config["architectures"] = ["CLIPModel"]
    _write_folder(folder, config, state_dict)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: architectures=")):
        transformers_clip.load_text_encoder(folder)


def test_pickled_weights_are_refused_with_the_way_to_convert(small_folder):
    folder, config, _ = small_folder
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(FileNotFoundError, match="only pickled weights.*safe_serialization=True"):
        transformers_clip.load_text_encoder(folder)


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_the_presets_have_transformers_names_and_shapes_at_full_size(preset):
    """SD's full-size text encoders, built by transformers on the meta device (no memory):
    every weight has our name and shape (PyTorch layout), and no other weight exists."""
    pytest.importorskip("transformers", reason="parity with transformers needs [torch]")
    import torch
    import transformers

    config = text.PRESETS[preset]
    raw = config.to_transformers()
    del raw["architectures"], raw["model_type"]
    with torch.device("meta"):
        theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**raw))
    theirs_shapes = transformers_clip.canonical_state_dict(
        {name: tuple(value.shape) for name, value in theirs.state_dict().items()}
    )
    ours_shapes = {
        torch_layout.torch_name(path): torch_layout.torch_shape(path[-1], leaf.shape)
        for path, leaf in traverse_util.flatten_dict(text.param_shapes(config)).items()
    }
    assert ours_shapes == theirs_shapes
