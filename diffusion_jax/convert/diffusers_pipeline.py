"""A Stable Diffusion pipeline folder of diffusers (`save_pretrained`'s layout, the Hub's
`stable-diffusion-v1-5`, `stable-diffusion-2-1`) as our models' configs and parameters, read
without PyTorch; and the same converted once to an Orbax checkpoint of ours.

    weights = load_pipeline("stable-diffusion-v1-5")   # a diffusers folder or a converted one
    save_converted("sd15_jax", weights)                # python -m diffusion_jax.convert.
                                                       #   diffusers_pipeline --pretrained ...

A diffusers folder holds `model_index.json` and one folder per part: `unet/`, `vae/`,
`text_encoder/` (config.json + safetensors), `tokenizer/` (vocab.json + merges.txt) and
`scheduler/` (scheduler_config.json). A converted folder holds the same model_index.json,
tokenizer/ and scheduler/, the three models' configs as `<part>_config.json` and their
parameters as one Orbax checkpoint `params` ({"unet", "vae", "text_encoder"}): one read,
no layout conversion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import models
from diffusion_jax.convert import (
    diffusers_conditional_unet,
    diffusers_folder,
    diffusers_vae,
    transformers_clip,
)
from diffusion_jax.models import autoencoders, conditional_unet, text
from diffusion_jax.models.autoencoders import AutoencoderConfig
from diffusion_jax.models.conditional_unet import UNetConditionConfig
from diffusion_jax.models.text import CLIPTextConfig, CLIPTokenizer, tokenizer
from diffusion_jax.runtime import storage

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
CONVERTED_PARAMS = "params"


@dataclasses.dataclass(frozen=True)
class PipelineWeights:
    """Everything a text-to-image generation reads from a pipeline folder: the U-Net, the
    autoencoder and the text encoder (config and parameters each), the tokenizer and the
    scheduler's config (diffusers' scheduler_config.json, as a dict)."""

    unet_config: UNetConditionConfig
    vae_config: AutoencoderConfig
    text_config: CLIPTextConfig
    params: dict[str, Any]  # {"unet", "vae", "text_encoder"}
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    source: str


def check_folder(folder: epath.Path) -> None:
    """A FileNotFoundError naming the parts a pipeline folder lacks and what it holds."""
    missing = [MODEL_INDEX] if not (folder / MODEL_INDEX).is_file() else []
    missing += [f"{part}/" for part in PARTS if not (folder / part).is_dir()]
    if missing:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{folder} is not a diffusers Stable Diffusion folder: missing {missing}; it holds "
            f"{present} (expected {MODEL_INDEX} and {[f'{part}/' for part in PARTS]})"
        )


def _read_json(path: epath.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def check_cross_attention(unet: UNetConditionConfig, text_config: CLIPTextConfig, source) -> None:
    """The U-Net attends to the text encoder's states: their widths must agree."""
    if unet.cross_attention_dim != text_config.hidden_size:
        raise ValueError(
            f"{source}/unet/config.json: cross_attention_dim={unet.cross_attention_dim} does "
            f"not fit the text encoder's hidden_size={text_config.hidden_size} "
            f"({source}/text_encoder/config.json); allowed: {text_config.hidden_size}"
        )


def load_diffusers_pipeline(folder: storage.PathLike, *, variant: str | None = None):
    """`PipelineWeights` of a diffusers folder (module docstring)."""
    folder = storage.absolute(folder)
    check_folder(folder)
    check_cross_attention(  # before any weight is read
        UNetConditionConfig.from_diffusers(diffusers_folder.read_config(folder / "unet"),
                                           source=str(folder / "unet" / "config.json")),
        CLIPTextConfig.from_transformers(diffusers_folder.read_config(folder / "text_encoder"),
                                         source=str(folder / "text_encoder" / "config.json")),
        folder,
    )  # fmt: skip
    unet_config, unet = diffusers_conditional_unet.load_unet(folder / "unet", variant=variant)
    vae_config, vae = diffusers_vae.load_diffusers_autoencoder(folder / "vae", variant=variant)
    text_config, encoder = transformers_clip.load_text_encoder(
        folder / "text_encoder", variant=variant
    )
    return PipelineWeights(
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        params={"unet": unet, "vae": vae, "text_encoder": encoder},
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=_read_json(folder / "scheduler" / SCHEDULER_CONFIG),
        source=str(folder),
    )


def _param_shapes(unet_config, vae_config, text_config) -> dict:
    return {
        "unet": conditional_unet.param_shapes(unet_config),
        "vae": autoencoders.param_shapes(vae_config),
        "text_encoder": text.param_shapes(text_config),
    }


def save_converted(out: storage.PathLike, weights: PipelineWeights) -> epath.Path:
    """The converted folder of `weights` (module docstring); returns its path."""
    out = storage.absolute(out)
    write_json = lambda path, value: storage.write_text(path, json.dumps(value, indent=2) + "\n")
    write_json(out / MODEL_INDEX, {"_class_name": "StableDiffusionPipeline", "converted": True})
    write_json(out / "unet_config.json", weights.unet_config.to_diffusers())
    write_json(out / "vae_config.json", weights.vae_config.to_diffusers())
    write_json(out / "text_encoder_config.json", weights.text_config.to_transformers())
    write_json(out / "scheduler" / SCHEDULER_CONFIG, weights.scheduler_config)
    source = storage.as_path(weights.source) / "tokenizer"
    for name in tokenizer.TOKENIZER_FILES:
        if (source / name).is_file():
            storage.write_bytes(out / "tokenizer" / name, (source / name).read_bytes())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / CONVERTED_PARAMS, weights.params, force=True)
    return out


def is_converted(folder: epath.Path) -> bool:
    return (folder / MODEL_INDEX).is_file() and bool(
        _read_json(folder / MODEL_INDEX).get("converted")
    )


def load_converted(folder: storage.PathLike) -> PipelineWeights:
    """`PipelineWeights` of a folder `save_converted` wrote."""
    folder = storage.absolute(folder)
    unet_config = UNetConditionConfig.from_diffusers(
        _read_json(folder / "unet_config.json"), source=str(folder / "unet_config.json")
    )
    vae_config = AutoencoderConfig.from_diffusers(
        _read_json(folder / "vae_config.json"), source=str(folder / "vae_config.json")
    )
    text_config = CLIPTextConfig.from_transformers(
        _read_json(folder / "text_encoder_config.json"),
        source=str(folder / "text_encoder_config.json"),
    )
    check_cross_attention(unet_config, text_config, folder)
    shapes = _param_shapes(unet_config, vae_config, text_config)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(folder / CONVERTED_PARAMS, shapes)
    return PipelineWeights(
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        params=params,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=_read_json(folder / "scheduler" / SCHEDULER_CONFIG),
        source=str(folder),
    )


def load_pipeline(folder: storage.PathLike, *, variant: str | None = None) -> PipelineWeights:
    """`PipelineWeights` of a diffusers folder or of a converted one (module docstring)."""
    path = storage.absolute(folder)
    if is_converted(path):
        return load_converted(path)
    return load_diffusers_pipeline(path, variant=variant)


def main(argv: Sequence[str] | None = None) -> epath.Path:
    parser = argparse.ArgumentParser(description="Convert a diffusers Stable Diffusion folder "
                                     "to an Orbax checkpoint of ours, once.")  # fmt: skip
    parser.add_argument("--pretrained", required=True, help="diffusers pipeline folder")
    parser.add_argument("--out", required=True, help="folder for the converted pipeline")
    parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    args = parser.parse_args(argv)
    weights = load_diffusers_pipeline(args.pretrained, variant=args.variant)
    out = save_converted(args.out, weights)
    counts = {part: models.count_params(p) / 1e6 for part, p in weights.params.items()}
    listed = ", ".join(f"{part} {count:.1f}M parameters" for part, count in counts.items())
    print(f"Converted {args.pretrained} to {out}: {listed}")
    return out


if __name__ == "__main__":
    main()
