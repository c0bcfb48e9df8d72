"""A KL autoencoder for natural photographs at 32 x 32 (f = 4: 8 x 8 x 3 latents): random
crops of the photographs scikit-learn and scikit-image ship (data/photos.py), so it needs no
download; the test split crops two photographs the training never sees.

    python -m diffusion_jax.main --config configs/autoencoder_photos.py --workdir /tmp/ae_photos

LDM's recipe as configs/autoencoder_digits.py (L1, KL weight 1e-6, learned log-variance,
Adam (0.5, 0.9), a PatchGAN from half-way), with random horizontal flips; add
`--config.autoencoder_loss.lpips_weights=lpips_vgg.npz` for LDM's perceptual term (README,
"Latent diffusion"). Reconstruction grids go to WORKDIR/samples, the test split's PSNR to the
log every `training.eval_every` steps.
"""

from configs import autoencoder_digits, autoencoders, default


def get_config(size: str = ""):
    config = autoencoder_digits.get_config()
    config.data.name = "photos"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    config.autoencoder = autoencoders.architecture("photos_f4")
    config.training.eval_every = 1000
    config.eval.num_batches = 4
    return default.finalize(config, size)
