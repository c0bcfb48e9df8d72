"""diffusion_jax: diffusion models (the DDPM family) in JAX/Flax."""

__version__ = "0.1.0"
