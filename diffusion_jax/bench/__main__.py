"""python -m diffusion_jax.bench --config configs/cifar10.py [--compare diffusers]"""

from absl import app

from diffusion_jax.bench import cli

if __name__ == "__main__":
    app.run(cli.main)
