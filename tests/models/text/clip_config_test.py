"""Tests of models/text/clip_config.py: transformers' config.json of SD's text encoders maps
onto our presets and back; anything we do not implement is refused by its key."""

import dataclasses

import pytest

from diffusion_jax.models.text import PRESETS, CLIPTextConfig

# text_encoder/config.json of the SD 1.5 and SD 2.1 diffusers folders (transformers 4.2x)
SD1_FOLDER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
SD2_FOLDER = {
    **SD1_FOLDER,
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}


@pytest.mark.parametrize(("raw", "preset"), [(SD1_FOLDER, "sd1"), (SD2_FOLDER, "sd2")])
def test_the_sd_folders_configs_are_the_presets(raw, preset):
    assert CLIPTextConfig.from_transformers(raw) == PRESETS[preset]


@pytest.mark.parametrize("with_projection", [False, True])
def test_to_transformers_round_trips(with_projection):
    config = dataclasses.replace(PRESETS["sd2"], with_projection=with_projection)
    raw = config.to_transformers()
    expected = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    assert raw["architectures"] == [expected]
    assert CLIPTextConfig.from_transformers(raw) == config


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"hidden_act": "relu"}, r"hidden_act='relu'; supported: \('quick_gelu', 'gelu'\)"),
        (
            {"architectures": ["CLIPModel"]},
            r"architectures=\['CLIPModel'\]; supported: "
            r"\['CLIPTextModel', 'CLIPTextModelWithProjection'\]",
        ),  # fmt: skip
        ({"model_type": "clip"}, r"model_type='clip'; supported: 'clip_text_model'"),
        ({"rope_theta": 1e4}, r"unsupported CLIPTextConfig option\(s\) \['rope_theta'\]"),
        ({"num_attention_heads": 7}, r"num_attention_heads=7 must divide hidden_size=768"),
    ],
)
def test_what_we_do_not_implement_is_refused_naming_the_key(change, pattern):
    with pytest.raises(ValueError, match=rf"^te/config.json: {pattern}"):
        CLIPTextConfig.from_transformers({**SD1_FOLDER, **change}, source="te/config.json")
