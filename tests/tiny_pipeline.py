"""A tiny Stable Diffusion folder in diffusers' layout with random weights, written without
PyTorch (our models' random parameters in PyTorch names and layouts): what diffusers'
`StableDiffusionPipeline.from_pretrained` and our `diffusers_pipeline.load_pipeline` both
read. From the checkout:

    python -m tests.tiny_pipeline --out /tmp/sd_tiny [--sd2]

SD 1.x-shaped: conv projections, one head count, CLIP-L's padding and PNDM scheduler config
(steps_offset 1, set_alpha_to_one false), epsilon prediction. SD 2.x-shaped: linear
projections, heads per level, upcast attention, OpenCLIP's "!" padding, GELU, v-prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import numpy as np
from safetensors.numpy import save_file

from diffusion_jax.convert import torch_layout
from diffusion_jax.models import autoencoders, conditional_unet, text
from diffusion_jax.models.autoencoders import AutoencoderConfig
from diffusion_jax.models.conditional_unet import UNetConditionConfig
from diffusion_jax.models.text import CLIPTextConfig
from tests.clip_vocabulary import clip_vocabulary, write_tokenizer_folder

TEXT_WIDTH = 32
UNET_SD1 = UNetConditionConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
UNET_SD2 = dataclasses.replace(
    UNET_SD1, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
VAE = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}  # fmt: skip
PARTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


def text_config(vocab: dict[str, int], *, sd2: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=0 if sd2 else vocab["<|endoftext|>"],
    )  # fmt: skip


def random_params(init_params, config, seed: int, scale: float = 0.05):
    """Random parameters, every one moved off its initial value (zero-initialised outputs
    and norms included), so that every weight matters."""
    params = init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    noise = [scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    moved = [np.asarray(x) + n for x, n in zip(leaves, noise, strict=True)]
    return jax.tree.unflatten(tree, moved)


def _write_model(folder: pathlib.Path, config: dict, params, weights_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(torch_layout.state_dict_from_params(params), str(folder / weights_name))


def write_tiny_pipeline(folder: str | pathlib.Path, *, sd2: bool = False, seed: int = 0):
    """Write the tiny pipeline folder (module docstring); returns its path."""
    folder = pathlib.Path(folder)
    vocab, merges = clip_vocabulary()
    unet = UNET_SD2 if sd2 else UNET_SD1
    clip = text_config(vocab, sd2=sd2)
    models = [
        ("unet", unet.to_diffusers(), conditional_unet.init_params, unet),
        ("vae", VAE.to_diffusers(), autoencoders.init_params, VAE),
        ("text_encoder", clip.to_transformers(), text.init_params, clip),
    ]
    for offset, (part, config, init_params, ours) in enumerate(models):
        weights_name = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        params = random_params(init_params, ours, seed + offset)
        _write_model(folder / part, config, params, f"{weights_name}.safetensors")
    write_tokenizer_folder(folder / "tokenizer", (vocab, merges),
                           pad_token="!" if sd2 else "<|endoftext|>")  # fmt: skip
    scheduler = {**SCHEDULER, "prediction_type": "v_prediction" if sd2 else "epsilon"}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, **PARTS}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sd2", action="store_true", help="SD 2.x-shaped")
    args = parser.parse_args()
    print(f"Wrote {write_tiny_pipeline(args.out, sd2=args.sd2)}")
