"""What the latent-diffusion benchmark times on our side: one call of Stable Diffusion 1.5's
U-Net, a whole guided sampling loop of it (one compiled program), and the SD autoencoder's
encoder and decoder, all jitted, with random weights, on synthetic inputs.

Every runner is `(run, info)`: `run()` blocks on its result and returns it as NumPy (so
that the two sides' outputs can be compared), info holds the compile time. Inputs are
drawn by `latent_inputs` / `image_inputs` in NumPy, NHWC; diffusers' side
(`latent_torch`) gets the same arrays in NCHW.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.bench.measure import compile_timed
from diffusion_jax.bench.options import BenchOptions, compiler_options
from diffusion_jax.models import autoencoders, conditional_unet
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL
from diffusion_jax.models.conditional_unet import UNet2DConditionModel, UNetConditionConfig
from diffusion_jax.models.layers import COMPUTE_DTYPES
from diffusion_jax.text_to_image import pipeline, scheduling

# stable-diffusion-v1-5's scheduler/scheduler_config.json: the process every sampler of the
# generation loop runs on (a named sampler takes its betas, spacing and offset)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}  # fmt: skip
# SD 1.5's and SD's autoencoder's architectures at tiny widths (`--tiny`): every block type
# of the full ones, cross-attention included, for a check in seconds
TINY_UNET = UNetConditionConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
WEIGHT_NOISE = 0.02  # added to every initial weight, so that no output is identically zero


def unet_config(options: BenchOptions) -> UNetConditionConfig:
    return TINY_UNET if options.tiny else conditional_unet.PRESETS["sd15"]


def vae_config(options: BenchOptions) -> AutoencoderConfig:
    return TINY_VAE if options.tiny else autoencoders.PRESETS["sd"]


def random_params(init_params, config, seed: int):
    """`init_params(config, key)` plus N(0, WEIGHT_NOISE^2) noise on every weight: the
    zero-initialised output layers too, so that both frameworks' outputs are non-zero and
    their difference means something. Float32, on the default device."""
    params = init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))

    @jax.jit
    def perturb(leaves, keys):
        return [x + WEIGHT_NOISE * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]

    return jax.tree.unflatten(tree, perturb(leaves, keys))


def cast(params, dtype: str):
    """Weights held in the compute dtype, as `pipeline.cast_params` holds the U-Net's."""
    return jax.tree.map(lambda x: x.astype(COMPUTE_DTYPES[dtype]), params)


@dataclasses.dataclass(frozen=True)
class LatentInputs:
    """One U-Net call's inputs (NHWC latents), float32 NumPy."""

    latents: np.ndarray  # [B, h, w, 4], B = 2 x prompts (unconditional and conditional)
    timesteps: np.ndarray  # [B]
    text: np.ndarray  # [B, tokens, cross_attention_dim], rows [unconditional, conditional]


def latent_inputs(config: UNetConditionConfig, options: BenchOptions) -> LatentInputs:
    rng = np.random.default_rng(options.seed)
    batch, size = 2 * options.prompts, options.latent_size
    latents = rng.standard_normal((batch, size, size, config.in_channels), np.float32)
    text = rng.standard_normal((batch, options.text_tokens, config.cross_attention_dim), np.float32)
    return LatentInputs(latents, np.full((batch,), 501.0, np.float32), text)


def make_unet_step_runner(config: UNetConditionConfig, params, inputs: LatentInputs, options):
    """(run, info): one jitted U-Net call on `inputs` (one denoising step's network call of a
    guided generation: both branches in one batch)."""
    unet = UNet2DConditionModel(config, dtype=COMPUTE_DTYPES[options.dtype])
    params = cast(params, options.dtype)
    args = tuple(jnp.asarray(a) for a in (inputs.latents, inputs.timesteps, inputs.text))

    def step(params, latents, timesteps, text):
        return unet.apply({"params": params}, latents, timesteps, text).astype(jnp.float32)

    compiled, compile_time = compile_timed(
        jax.jit(step), params, *args, options=compiler_options(options)
    )
    run = lambda: np.asarray(jax.block_until_ready(compiled(params, *args)))
    return run, {"compile": compile_time, "params": _count(params)}


def make_generation_runner(
    config: UNetConditionConfig, params, inputs: LatentInputs, name: str, options
):
    """(run, info): `options.generation_steps` steps of sampler `name` (its diffusers class
    built from SD15_SCHEDULER, as `scheduling.make_pipeline_sampler` builds it for a
    pipeline), classifier-free guidance at 7.5 with the pipeline's guided U-Net, the whole
    loop one compiled program; returns the final latents [prompts, h, w, 4]."""
    unet = UNet2DConditionModel(config, dtype=COMPUTE_DTYPES[options.dtype])
    params = cast(params, options.dtype)
    sample, sampler_name, sampler_options = scheduling.make_pipeline_sampler(
        SD15_SCHEDULER, name, num_steps=options.generation_steps
    )
    prompts = options.prompts
    start = scheduling.noise_from_latents(
        inputs.latents[prompts:], sample, sampler_name, sampler_options
    )  # diffusers' pipeline starts from these latents (`latent_torch` takes the same)
    null_text, text = jnp.asarray(inputs.text[:prompts]), jnp.asarray(inputs.text[prompts:])

    def generate(params, noise, rng, null_text, text, scale):
        model_fn = pipeline._guided_unet(unet, params, guided=True)
        latents, _ = sample(model_fn, noise, rng, (text, null_text, scale))
        return latents

    args = (jnp.asarray(start), jax.random.key(options.seed), null_text, text, jnp.float32(7.5))
    compiled, compile_time = compile_timed(
        jax.jit(generate), params, *args, options=compiler_options(options)
    )
    run = lambda: np.asarray(jax.block_until_ready(compiled(params, *args)))
    return run, {"compile": compile_time, "sampler": sampler_name}


def image_inputs(config: AutoencoderConfig, options: BenchOptions) -> np.ndarray:
    """Images [B, H, W, 3] uniform in [-1, 1], float32."""
    rng = np.random.default_rng(options.seed)
    size = options.image_size
    shape = (options.vae_batch_size, size, size, config.in_channels)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def latents_of_images(config: AutoencoderConfig, images: np.ndarray) -> np.ndarray:
    """Standard-normal latents [B, H/f, W/f, L] of the images' size, the decoder's input."""
    batch, height, width, _ = images.shape
    factor = config.downsampling_factor
    shape = (batch, height // factor, width // factor, config.latent_channels)
    return np.random.default_rng(1).standard_normal(shape, np.float32)


def make_vae_runner(config: AutoencoderConfig, params, x: np.ndarray, part: str, options):
    """(run, info): the jitted `part` ("encode": images to the posterior's moments,
    "decode": latents z to images) of `AutoencoderKL(config)` on `x`."""
    vae = AutoencoderKL(config, dtype=COMPUTE_DTYPES[options.dtype])
    method = {"encode": vae.encode, "decode": vae.decode}[part]
    params = cast(params, options.dtype)
    x = jnp.asarray(x)

    def apply(params, x):
        return vae.apply({"params": params}, x, method=method)

    compiled, compile_time = compile_timed(
        jax.jit(apply), params, x, options=compiler_options(options)
    )
    run = lambda: np.asarray(jax.block_until_ready(compiled(params, x)))
    return run, {"compile": compile_time, "params": _count(params)}


def _count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
