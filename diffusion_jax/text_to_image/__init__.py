"""Text-to-image generation with Stable Diffusion-style latent diffusion models: the pipeline
(`pipeline.generate`, one compiled program per size, step count and sampler) and the choice of
its sampler from a diffusers scheduler config (`scheduling`). The command is
`python -m diffusion_jax.generate`."""

from diffusion_jax.text_to_image.pipeline import GenerationOptions, generate

__all__ = ["GenerationOptions", "generate"]
