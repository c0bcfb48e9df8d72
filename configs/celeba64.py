"""DDPM on CelebA at 64x64, the CelebA setting of DDIM (Song et al. 2021, arXiv:2010.02502).

    python -m diffusion_jax.main --config configs/celeba64.py --workdir /tmp/celeba64

DDIM trained their CelebA model as DDPM (Ho et al. 2020) does CIFAR-10, with a U-Net of
ch_mult (1, 2, 2, 2, 4) for 64x64 images: T = 1000 linear betas, L_simple, Adam 2e-4, batch
128, random flips, EMA 0.9999. Samples use 100 DDIM steps (eta = 0). Needs the TFDS celeb_a
data set prepared (see the README).
"""

from configs import default


def get_config(size: str = ""):
    config = default.get_config()
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.eval_split = "validation"
    config.model.image_size = 64
    config.model.ch_mult = (1, 2, 2, 2, 4)
    config.training.num_steps = 500_000
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 100
    return default.finalize(config, size)
