"""diffusers' side of the latent-diffusion benchmark: its ``UNet2DConditionModel`` and
``AutoencoderKL`` holding our random weights (`torch_layout.state_dict_from_params`, loaded
with ``load_state_dict(strict=True)``, so that both sides run the same network on the same
numbers), one U-Net call, the denoising loop of ``StableDiffusionPipeline`` with a diffusers
scheduler, and the autoencoder's encoder and decoder.

Needs the ``[torch]`` extra. Weights are held in the compute dtype (float32, or bfloat16 as
diffusers users load them with ``torch_dtype``), under ``torch.inference_mode``; each run
returns its result as float32 NumPy in our NHWC layout, after the device is done.
"""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import numpy as np
import torch

from diffusion_jax.bench.latent_runners import SD15_SCHEDULER, LatentInputs
from diffusion_jax.bench.torch_side import synchronize
from diffusion_jax.convert import torch_layout
from diffusion_jax.text_to_image import scheduling

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GUIDANCE_SCALE = 7.5


def load_diffusers_model(model_class, config, params, *, device: str, dtype: str):
    """diffusers' `model_class` of our `config` (its ``to_diffusers()``) holding our `params`,
    in eval mode on `device` in `dtype`. Built on PyTorch's meta device and given the
    weights by ``assign``, so that the random init of ~860M parameters is skipped."""
    kwargs = config.to_diffusers()
    kwargs.pop("_class_name")
    with torch.device("meta"):
        model = model_class(**kwargs)
    state_dict = {
        name: torch.from_numpy(np.require(value, requirements=["C", "W"]))  # read-only: copied
        for name, value in torch_layout.state_dict_from_params(params).items()
    }
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device)
    if dtype != "float32":  # diffusers warns on any dtype cast, also float32's no-op
        model = model.to(TORCH_DTYPES[dtype])
    return model.eval()


def _nchw(x: np.ndarray, device: str, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(
        device=device, dtype=TORCH_DTYPES[dtype]
    )


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.float().permute(0, 2, 3, 1).cpu().numpy()


def make_unet_step_runner(unet, inputs: LatentInputs, *, device: str, dtype: str) -> Callable:
    """``run() -> eps [B, h, w, 4]``: one call of diffusers' ``unet`` on `inputs`."""
    latents = _nchw(inputs.latents, device, dtype)
    timesteps = torch.from_numpy(inputs.timesteps).to(device)
    text = torch.from_numpy(inputs.text).to(device=device, dtype=TORCH_DTYPES[dtype])

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = unet(latents, timesteps, encoder_hidden_states=text).sample
        synchronize(device)
        return _nhwc(out)

    return run


def make_scheduler(name: str):
    """diffusers' scheduler of our sampler `name`, from SD15_SCHEDULER as
    ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` builds it."""
    class_name = scheduling.DIFFUSERS_CLASSES[name]
    config = {**SD15_SCHEDULER, **scheduling.VARIANT_FIELDS.get(name, {})}
    return getattr(diffusers, class_name).from_config(config)


def make_generation_runner(
    unet, inputs: LatentInputs, name: str, *, num_steps: int, prompts: int, device: str,
    dtype: str,
) -> Callable:  # fmt: skip
    """``run() -> latents [prompts, h, w, 4]``: the denoising loop of diffusers'
    ``StableDiffusionPipeline`` (classifier-free guidance at 7.5, unconditional and
    conditional branches in one batch) with the scheduler of `name`, from `inputs`' latents."""
    scheduler = make_scheduler(name)
    start = _nchw(inputs.latents[prompts:], device, "float32")
    text = torch.from_numpy(inputs.text).to(device=device, dtype=TORCH_DTYPES[dtype])

    def run() -> np.ndarray:
        scheduler.set_timesteps(num_steps, device=device)
        latents = start * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = unet(model_input.to(text.dtype), t, encoder_hidden_states=text).sample
                uncond, cond = eps.float().chunk(2)
                eps = uncond + GUIDANCE_SCALE * (cond - uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
        synchronize(device)
        return _nhwc(latents)

    return run


def make_vae_runner(vae, x: np.ndarray, part: str, *, device: str, dtype: str) -> Callable:
    """``run()``: diffusers' ``vae.encode`` (the posterior's moments [B, h, w, 2 L], what
    ours returns) or ``vae.decode`` (images [B, H, W, 3]) of `x` (NHWC)."""
    x = _nchw(x, device, dtype)

    def run() -> np.ndarray:
        with torch.inference_mode():
            if part == "encode":
                out = vae.encode(x).latent_dist.parameters
            else:
                out = vae.decode(x).sample
        synchronize(device)
        return _nhwc(out)

    return run
