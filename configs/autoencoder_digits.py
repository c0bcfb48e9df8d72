"""A KL autoencoder for scikit-learn's digits at 32 x 32 (f = 4: 8 x 8 x 4 latents), the
first stage of configs/ldm_digits.py; needs no download.

    python -m diffusion_jax.main --config configs/autoencoder_digits.py --workdir /tmp/ae
    python -m diffusion_jax.main --config configs/autoencoder_digits.py --workdir /tmp/ae \
        --mode eval

LDM's recipe (Rombach et al. 2022, App. G): L1 reconstruction, KL weight 1e-6, a learned
log-variance, Adam with betas (0.5, 0.9); the PatchGAN starts at step 1,500 of 3,000 (LDM:
50,001). Reconstruction grids (inputs above reconstructions) go to WORKDIR/samples; --mode
eval writes PSNR, SSIM and the Frechet distance of reconstructions of the test split in the
digits classifier's features to WORKDIR/eval.
"""

from configs import autoencoders, default


def get_config(size: str = ""):
    config = default.get_config()
    config.task = "autoencoder"
    config.data.name = "digits"
    config.data.image_size = 32
    config.data.num_channels = 1
    config.data.random_flip = False
    config.autoencoder = autoencoders.architecture("digits_f4")
    config.autoencoder_loss = autoencoders.loss()
    config.autoencoder_loss.disc_start = 1500
    config.optim.learning_rate = 2e-4
    config.optim.b1, config.optim.b2 = 0.5, 0.9
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    config.training.batch_size = 32
    config.training.num_steps = 3000
    config.training.ema_decays = (0.999,)
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1000
    config.training.eval_every = 0
    config.sampling.num_images = 16
    config.sampling.ema_index = -1
    config.eval.batch_size = 64
    return default.finalize(config, size)
