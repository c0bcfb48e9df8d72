"""scikit-learn's 8x8 handwritten digits (1,500 training images): the offline Quick start.

    python -m diffusion_jax.main --config configs/digits.py --workdir /tmp/digits

needs no download; 2,000 steps of batch 64 take about 7 CPU-minutes (under 5 minutes on
two idle cores) and the logged loss falls from 0.45 (mean of steps 1-100) to 0.08. At the
end it writes `/tmp/digits/samples.png`, a grid of 64 samples from the EMA parameters
(each 8x8 digit drawn 4x larger). The DDPM recipe of Ho et al. 2020 (linear betas, T = 1000,
eps-prediction, L_simple, Adam with warmup, gradient clipping, EMA) on a 0.7M-parameter
U-Net (ch 32, ch_mult (1, 2), attention at 4x4); the short run uses a faster EMA (0.999)
than DDPM's 0.9999, and samples with 100 DDIM steps (Song et al. 2021)."""

from configs import default, models


def get_config(size: str = ""):
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False
    config.model = models.tiny()
    config.model.image_size = 8
    config.model.in_channels = config.model.out_channels = 1
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.variance_type = "fixed_large"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.training.batch_size = 64
    config.training.num_steps = 2000
    config.training.ema_decays = (0.999,)
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 0
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 100
    config.eval.batch_size = 64
    return default.finalize(config, size)
