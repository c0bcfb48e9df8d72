"""Text-to-image generation with a latent diffusion model conditioned on CLIP text states
(Rombach et al. 2022, Sec. 3.3; Stable Diffusion), under classifier-free guidance (Ho &
Salimans 2022, Eq. 6): the prompt's tokens go through the text encoder, the U-Net denoises
latents with any sampler of ours, the autoencoder decodes them.

    weights = diffusers_pipeline.load_pipeline("stable-diffusion-v1-5")
    images = generate(weights, ["an astronaut riding a horse"], num_steps=25,
                      guidance_scale=7.5, sampler="dpm_solver++", seed=0)  # [N, H, W, 3]

The whole generation (text encoding, every sampler step with the conditional and the
unconditional branch in one batch of 2N, decoding) is one compiled program. The guidance scale
is an argument of that program, not a constant in it, so changing it does not recompile;
the step count, the sampler and the image size are fixed per program (`make_generate_fn`).
The batch is sharded over the devices of a 1-D mesh when they divide it; the U-Net and the
text encoder may compute (and hold their weights) in bfloat16, the autoencoder stays float32
(in float16 / bfloat16 it overflows into NaN on SDXL-sized latents, diffusers #7765).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.convert.diffusers_pipeline import PipelineWeights
from diffusion_jax.models.autoencoders import AutoencoderKL
from diffusion_jax.models.conditional_unet import UNet2DConditionModel
from diffusion_jax.models.layers import COMPUTE_DTYPES
from diffusion_jax.models.text import CLIPTextModel
from diffusion_jax.text_to_image import scheduling


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """What fixes one compiled generation program (module docstring)."""

    height: int = 512
    width: int = 512
    num_steps: int = 25
    sampler: str | None = None  # None: the folder's scheduler
    clip_skip: int = 0
    dtype: str = "float32"  # the U-Net's and the text encoder's compute and weight dtype
    query_chunk_size: int | None = None  # memory-efficient attention on long sequences


def latent_shape(weights: PipelineWeights, options: GenerationOptions) -> tuple[int, int, int]:
    """[h, w, C] of the latents of an image of options.height x options.width; an error naming
    --height / --width when they do not divide into the autoencoder's and U-Net's factors."""
    factor = weights.vae_config.downsampling_factor
    multiple = factor * weights.unet_config.downsampling_factor
    for flag, size in (("--height", options.height), ("--width", options.width)):
        if size <= 0 or size % multiple:
            raise ValueError(
                f"{flag}={size} is not a positive multiple of {multiple} (the autoencoder's "
                f"factor {factor} x the U-Net's downsampling "
                f"{weights.unet_config.downsampling_factor})"
            )
    return options.height // factor, options.width // factor, weights.unet_config.in_channels


def cast_params(weights: PipelineWeights, dtype: str) -> dict:
    """The parameters, the U-Net's and text encoder's in `dtype` (float32 or bfloat16), the
    autoencoder's float32."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(COMPUTE_DTYPES)}")
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, COMPUTE_DTYPES[dtype]), tree)
    params = weights.params
    return {"unet": cast(params["unet"]), "text_encoder": cast(params["text_encoder"]),
            "vae": jax.tree.map(jnp.asarray, params["vae"])}  # fmt: skip


def _guided_unet(unet: UNet2DConditionModel, unet_params, guided: bool):
    """model_fn(x, t, cond) of our samplers, cond = (text states, negative text states,
    guidance scale): eps_u + s (eps_c - eps_u), both in one batch [uncond, cond] as diffusers
    does; without guidance the conditional U-Net alone."""

    def model_fn(x, t, cond):
        context, null_context, scale = cond
        if not guided:
            return unet.apply({"params": unet_params}, x, t, context).astype(jnp.float32)
        out = unet.apply(
            {"params": unet_params},
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([null_context, context]),
        ).astype(jnp.float32)
        uncond, conditional = jnp.split(out, 2)
        return uncond + scale * (conditional - uncond)

    return model_fn


def make_generate_fn(
    weights: PipelineWeights, options: GenerationOptions, *, guided: bool = True
) -> tuple[Callable, scheduling.samplers.SampleFn, str, dict]:
    """(generate, sample, sampler name, sampler options): `generate(params, ids, null_ids,
    noise, rng, guidance_scale) -> images [N, H, W, 3]` in [0, 1], float32, with `params`
    of `cast_params`, token ids [N, 77], noise [N, h, w, C] (the sampler's, see
    `scheduling.noise_from_latents`)."""
    dtype = COMPUTE_DTYPES[options.dtype]
    text_model = CLIPTextModel(weights.text_config, dtype=dtype)
    unet = UNet2DConditionModel(weights.unet_config, options.query_chunk_size, dtype)
    vae = AutoencoderKL(weights.vae_config)
    sample, name, sampler_options = scheduling.make_pipeline_sampler(
        weights.scheduler_config, options.sampler, num_steps=options.num_steps
    )
    vae_config = weights.vae_config

    def encode(params, ids):
        variables = {"params": params["text_encoder"]}
        return text_model.apply(
            variables, ids, clip_skip=options.clip_skip, method=text_model.hidden_layer
        )

    def generate(params, ids, null_ids, noise, rng, guidance_scale):
        cond = (encode(params, ids), encode(params, null_ids), guidance_scale)
        model_fn = _guided_unet(unet, params["unet"], guided)
        latents, _ = sample(model_fn, noise, rng, cond)
        z = latents / vae_config.scaling_factor + vae_config.shift_factor
        image = vae.apply({"params": params["vae"]}, z, method=vae.decode)
        return jnp.clip(image / 2 + 0.5, 0.0, 1.0)

    return generate, sample, name, sampler_options


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted `make_generate_fn` with its cast parameters and its sampler."""

    weights: PipelineWeights  # held, so that its id is not reused while the program lives
    generate: Callable
    params: dict
    sample: scheduling.samplers.SampleFn
    name: str
    options: dict


_PROGRAMS: dict[tuple, Program] = {}


def compiled_program(weights: PipelineWeights, options: GenerationOptions, *, guided: bool):
    """The program of (weights, options, guided), made once per process: a second generation
    with other prompts, seed or guidance scale reuses its compilation."""
    key = (id(weights), options, guided)
    if key not in _PROGRAMS:
        generate_fn, sample, name, sampler_options = make_generate_fn(
            weights, options, guided=guided
        )
        _PROGRAMS.clear()  # one pipeline's parameters held at a time
        _PROGRAMS[key] = Program(weights, jax.jit(generate_fn),
                                 cast_params(weights, options.dtype), sample, name,
                                 sampler_options)  # fmt: skip
    return _PROGRAMS[key]


def batch_sharding(batch_size: int) -> NamedSharding:
    """Rows over the devices of a 1-D mesh when they divide the batch, else replicated."""
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    spec = PartitionSpec("batch") if batch_size % len(devices) == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)


def draw_latents(seed: int, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """diffusers-style initial latents: [count, h, w, C] standard normal of `seed`."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (count, *shape), jnp.float32))


def generate(
    weights: PipelineWeights,
    prompts: Sequence[str],
    *,
    negative_prompts: Sequence[str] | None = None,
    guidance_scale: float = 7.5,
    seed: int = 0,
    init_latents: np.ndarray | None = None,
    **options,
) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] of `prompts` (module docstring; `options` are those of
    `GenerationOptions`). `init_latents` [N, h, w, C] are diffusers' `latents` (the pipeline's
    standard-normal draw, NHWC), by default drawn from `seed`."""
    options = GenerationOptions(**options)
    shape = latent_shape(weights, options)
    negative_prompts = [""] * len(prompts) if negative_prompts is None else negative_prompts
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    latents = draw_latents(seed, len(prompts), shape) if init_latents is None else init_latents
    if tuple(latents.shape) != (len(prompts), *shape):
        expected = (len(prompts), *shape)
        raise ValueError(f"init latents of shape {latents.shape}; expected {expected}")
    program = compiled_program(weights, options, guided=guidance_scale > 1.0)
    noise = scheduling.noise_from_latents(latents, program.sample, program.name, program.options)
    sharding = batch_sharding(len(prompts))
    put = lambda x: jax.device_put(x, sharding)
    images = program.generate(
        program.params,
        put(weights.tokenizer(list(prompts))),
        put(weights.tokenizer(list(negative_prompts))),
        put(noise),
        jax.random.key(seed),
        jnp.float32(guidance_scale),
    )
    return np.asarray(images)
