"""DDPM on CIFAR-10, the setting of Ho et al. 2020 (arXiv:2006.11239).

    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/cifar10

The 35.7M-parameter U-Net (ch 128, ch_mult (1, 2, 2, 2), 2 blocks, attention at 16x16,
dropout 0.1); T = 1000 linear betas 1e-4 -> 0.02; eps-prediction with L_simple; Adam 2e-4,
5000 warmup steps, batch 128, gradient clipping 1.0, random flips, EMA 0.9999, 800K steps;
ancestral sampling with sigma^2 = beta_t ("fixed_large", as in hojonathanho/diffusion for
CIFAR-10). The paper reports FID 3.17 and <= 3.75 bits/dim (test) with this setting.
Needs the TFDS cifar10 data set prepared (see the README). On a laptop CPU:
`--config configs/cifar10.py:tiny`.
"""

from configs import default


def get_config(size: str = ""):
    config = default.get_config()  # the default is the DDPM CIFAR-10 setting
    config.data.name = "cifar10"
    config.diffusion.variance_type = "fixed_large"
    config.training.ema_warmup = False  # the paper's plain EMA
    config.training.eval_every = 50_000
    config.eval.num_batches = 4
    return default.finalize(config, size)
