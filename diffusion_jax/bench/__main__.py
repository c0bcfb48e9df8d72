"""python -m diffusion_jax.bench --config configs/cifar10.py [--compare diffusers], or
--model sd15_unet / sd_vae [--compare diffusers] (bench/latent_run.py)."""

from absl import app

from diffusion_jax.bench import cli

if __name__ == "__main__":
    app.run(cli.main)
