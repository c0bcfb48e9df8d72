"""A 2-D swiss roll learned by a residual MLP: watch a diffusion model learn a density.

    python -m diffusion_jax.main --config configs/toy2d.py --workdir /tmp/toy2d

Offline, about two minutes on two CPU cores; `/tmp/toy2d/samples.png` is a scatter plot of
1,000 samples. DDPM (Ho et al. 2020) on points: linear betas, T = 1000, eps-prediction,
L_simple, 1000-step ancestral sampling. `--config.data.toy_distribution=eight_gaussians`
(or `checkerboard`) changes the target.
"""

from configs import default, models


def get_config(size: str = ""):
    config = default.get_config()
    config.data.name = "toy2d"
    config.data.toy_distribution = "swiss_roll"
    config.data.image_size = 0
    config.data.num_channels = 0
    config.data.random_flip = False
    config.model = models.mlp2d()
    config.diffusion.variance_type = "fixed_small"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "cosine"
    config.optim.final_lr_fraction = 0.1
    config.training.batch_size = 256
    config.training.num_steps = 4000
    config.training.ema_decays = (0.999,)
    config.training.log_every = 200
    config.training.checkpoint_every = 1000
    config.training.sample_every = 0
    config.sampling.num_images = 1000
    config.sampling.batch_size = 1000
    config.sampling.clip_x0 = False
    config.eval.decoder = "gaussian"
    config.eval.num_bins = 0  # continuous points: no dequantization
    return default.finalize(config, size)
