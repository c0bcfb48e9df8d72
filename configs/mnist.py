"""DDPM on MNIST, zero-padded to 32x32: the DDPM recipe at MNIST scale.

    python -m diffusion_jax.main --config configs/mnist.py --workdir /tmp/mnist

No paper trains DDPM on MNIST with a published setting; this applies Ho et al. 2020
(T = 1000 linear betas, eps-prediction, L_simple, Adam 2e-4 with warmup, EMA 0.9999,
clipping 1.0) to a 64-channel U-Net with ch_mult (1, 2, 2), attention at 16x16, and no
flips (digits are not mirror-symmetric). Needs the TFDS mnist data set prepared.
"""

from configs import default


def get_config(size: str = ""):
    config = default.get_config()
    config.data.name = "mnist"
    config.data.num_channels = 1
    config.data.random_flip = False
    config.model.in_channels = config.model.out_channels = 1
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.norm_groups = 16
    config.optim.warmup_steps = 1000
    config.training.num_steps = 100_000
    return default.finalize(config, size)
