"""Text-to-image from a Stable Diffusion folder (diffusers' layout, or one converted by
`python -m diffusion_jax.convert.diffusers_pipeline`), without PyTorch:

    python -m diffusion_jax.generate --pretrained stable-diffusion-v1-5 \\
        --prompt "an astronaut riding a horse" --negative_prompt "blurry" \\
        --num_steps 25 --guidance_scale 7.5 --sampler dpm_solver++ --seed 0 \\
        --height 512 --width 512 --num_images 2 --out /tmp/astronaut

writes OUT/image_<i>.png and OUT/settings.json (every setting, the sampler's options and the
folder). `--init_noise FILE.npy` takes diffusers' initial `latents` ([N, h, w, C] NHWC, or
NCHW as PyTorch saves them): the same file given to diffusers' StableDiffusionPipeline gives
the same image. `--lora FILE[:WEIGHT]` (repeatable) merges LoRA files (ours, diffusers',
PEFT's or kohya's; `convert.lora_files`) into the U-Net and text encoder first, and
`--textual_inversion FILE[:TOKEN]` adds a learned token (`convert.textual_inversion`). The Python
function is `text_to_image.generate`, with the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from diffusion_jax.convert import diffusers_pipeline, lora_files, textual_inversion
from diffusion_jax.runtime import images, storage
from diffusion_jax.text_to_image import pipeline


def lora_flag(value: str) -> tuple[str, float]:
    """(path, weight) of a --lora value "FILE[:WEIGHT]" (a URL's scheme is not a weight)."""
    path, separator, weight = value.rpartition(":")
    try:
        return (path, float(weight)) if separator else (value, 1.0)
    except ValueError:
        return value, 1.0


def textual_inversion_flag(value: str) -> tuple[str, str | None]:
    """(path, token or None) of a --textual_inversion value "FILE[:TOKEN]"."""
    path, separator, token = value.rpartition(":")
    return (path, token) if separator and "/" not in token and token else (value, None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--pretrained", required=True, help="diffusers or converted Stable Diffusion folder")
    add("--prompt", required=True)
    add("--negative_prompt", default="", help='the unconditional branch\'s prompt (default "")')
    add("--num_steps", type=int, default=25)
    add("--guidance_scale", type=float, default=7.5, help="classifier-free guidance; <= 1: off")
    add("--sampler", default=None, help="a sampler of ours (default: the folder's scheduler)")
    add("--seed", type=int, default=0)
    add("--height", type=int, default=None, help="default: the U-Net's sample_size x 8")
    add("--width", type=int, default=None, help="default: the U-Net's sample_size x 8")
    add("--num_images", type=int, default=1)
    add("--clip_skip", type=int, default=0, help="1: the text encoder's penultimate layer")
    add("--dtype", default="float32", help="U-Net and text encoder: float32 or bfloat16")
    add("--init_noise", default=None, help="diffusers' initial latents, a .npy file")
    add("--variant", default=None, help="weights variant of a diffusers folder, e.g. fp16")
    add("--lora", action="append", default=[], type=lora_flag, metavar="FILE[:WEIGHT]",
        help="a LoRA file or folder (diffusers, PEFT or kohya) merged at WEIGHT (default 1); "
             "repeat the flag to combine several")  # fmt: skip
    add("--textual_inversion", action="append", default=[], type=textual_inversion_flag,
        metavar="FILE[:TOKEN]", help="a Textual Inversion embedding (safetensors), its token "
        "named TOKEN (default: the name in the file); repeatable")  # fmt: skip
    add("--out", required=True, help="folder for the PNGs and settings.json")
    return parser.parse_args(argv)


def read_init_noise(path: str, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The latents of a .npy file, NHWC (an NCHW array of the right shape is transposed)."""
    latents = np.load(path, allow_pickle=False)
    expected = (count, *shape)
    if latents.shape == (count, shape[2], shape[0], shape[1]) and latents.shape != expected:
        latents = latents.transpose(0, 2, 3, 1)
    if latents.shape != expected:
        raise ValueError(f"--init_noise={path} holds shape {latents.shape}; expected {expected} "
                         f"(NHWC) or {(count, shape[2], shape[0], shape[1])} (NCHW)")  # fmt: skip
    return latents.astype(np.float32)


def run(args: argparse.Namespace) -> list:
    """Generate and write the images of `args`; returns their paths."""
    weights = diffusers_pipeline.load_pipeline(args.pretrained, variant=args.variant)
    if args.lora:
        weights = lora_files.with_loras(weights, args.lora)
    if args.textual_inversion:
        weights = textual_inversion.with_textual_inversions(weights, args.textual_inversion)
    default_size = weights.unet_config.sample_size * weights.vae_config.downsampling_factor
    options = pipeline.GenerationOptions(
        height=args.height or default_size, width=args.width or default_size,
        num_steps=args.num_steps, sampler=args.sampler, clip_skip=args.clip_skip,
        dtype=args.dtype,
    )  # fmt: skip
    shape = pipeline.latent_shape(weights, options)  # before any compute
    latents = None
    if args.init_noise:
        latents = read_init_noise(args.init_noise, args.num_images, shape)
    out = storage.absolute(args.out)
    result = pipeline.generate(
        weights, [args.prompt] * args.num_images,
        negative_prompts=[args.negative_prompt] * args.num_images,
        guidance_scale=args.guidance_scale, seed=args.seed, init_latents=latents,
        **dataclasses.asdict(options),
    )  # fmt: skip
    paths = []
    for i, image in enumerate(result):
        paths.append(out / f"image_{i}.png")
        images.write_png(paths[-1], np.round(image * 255).astype(np.uint8))
    program = pipeline.compiled_program(weights, options, guided=args.guidance_scale > 1.0)
    settings = {**vars(args), **dataclasses.asdict(options), "pretrained": weights.source,
                "sampler_name": program.name, "sampler_options": program.options}  # fmt: skip
    storage.write_text(out / "settings.json", json.dumps(settings, indent=2, default=str) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {len(paths)} images to {os.fspath(paths[0].parent)}: " +
          ", ".join(p.name for p in paths))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
