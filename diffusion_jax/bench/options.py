"""The benchmark's options (what `python -m diffusion_jax.bench` takes as flags)."""

from __future__ import annotations

import dataclasses

from diffusion_jax.runtime import compilation

SAMPLERS = ("ddim", "dpm_solver++")
COMPARE = ("none", "diffusers")
# --model: "config" trains and samples the model of --config; the others are latent
# diffusion's networks with random weights (bench/latent_run.py)
MODELS = ("config", "sd15_unet", "sd_vae")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    batch_size: int = 16
    dtype: str = "float32"
    steps: tuple[int, ...] = (20, 50)
    samplers: tuple[str, ...] = SAMPLERS
    sample_batch_size: int = 16
    repeats: int = 5
    sample_repeats: int = 3
    warmup: int = 4  # train steps; XLA:CPU's and PyTorch's allocators settle over ~4 steps
    sample_warmup: int = 1
    compare: str = "none"
    peak_tflops: float = 0.0  # 0: from PEAK_TFLOPS for the detected device, if known
    ynn_convolutions: bool = False  # True: XLA:CPU's default library for convolutions
    torch_threads: int = 0  # 0: as many as JAX uses (every core this process may run on)
    torch_device: str = "auto"  # diffusers' side: "auto" (where ours runs), "cpu", "cuda"
    skip_with: str = "cond"  # how the train step skips a non-finite update (train_step.SKIP_FORMS)
    retain_freed_memory: bool = True  # host_memory.retain_freed_memory(), as training runs
    profile_steps: int = 0  # > 0: a profile of that many train steps, per XLA operation
    profile_dir: str = "/tmp/diffusion_jax_profile"  # where the profiler writes its trace
    seed: int = 0
    log_to: tuple[str, ...] = ()  # workdirs (local, gs://...) to time the logged step against
    model: str = "config"  # MODELS
    tiny: bool = False  # sd15_unet, sd_vae: their architectures at tiny widths
    prompts: int = 1  # sd15_unet: prompts per batch; the U-Net's batch is 2 x prompts (guided)
    latent_size: int = 64  # sd15_unet: latents of latent_size^2 (64: 512 x 512 images)
    text_tokens: int = 77  # sd15_unet: text states per prompt (CLIP's 77)
    generation_steps: int = 25  # sd15_unet: steps of each sampler's generation loop
    image_size: int = 256  # sd_vae: images of image_size^2
    vae_batch_size: int = 1  # sd_vae: images per encode / decode call


def compiler_options(options: BenchOptions) -> dict[str, str]:
    """The XLA options of our runs (`compilation.compiler_options`: on the CPU, convolutions
    and matrix products in Eigen), or XLA's defaults with `ynn_convolutions`."""
    return {} if options.ynn_convolutions else compilation.compiler_options()
