"""Latent diffusion on scikit-learn's digits at 32 x 32: the digits U-Net of
configs/digits.py on the 8 x 8 x 4 latents of the autoencoder trained by
configs/autoencoder_digits.py (Rombach et al. 2022); needs no download, and the
autoencoder's folder in `--config.latent.autoencoder`.

    python -m diffusion_jax.main --config configs/autoencoder_digits.py --workdir /tmp/ae
    python -m diffusion_jax.main --config configs/ldm_digits.py --workdir /tmp/ldm \
        --config.latent.autoencoder=/tmp/ae/autoencoder

The latents are scaled by 1 / std of the first batch's (LDM's scale-by-std, kept in the
checkpoint); samples, `--mode sample` and `--mode eval` decode them to 32 x 32 images, whose
Frechet distance is measured in the digits classifier's features. `latent.autoencoder` may
also be a diffusers `vae/` folder or its conversion (README, "Stable Diffusion's VAE").
"""

from configs import default, digits


def get_config(size: str = ""):
    config = digits.get_config()  # locked: work on an unlocked copy
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.image_size = 32
        config.model.image_size = 8
        config.model.in_channels = config.model.out_channels = 4
        config.eval.likelihoods = ()
    return default.finalize(config, size)
