"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021, arXiv:2102.09672).

    python -m diffusion_jax.main --config configs/cifar10_iddpm.py --workdir /tmp/iddpm

The paper's best-likelihood-with-good-FID row: T = 4000, cosine schedule, L_hybrid
(L_simple + 0.001 L_vlb, stop-gradient on the mean in L_vlb), learned-range variance
Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t); its CIFAR-10 U-Net (3 blocks,
attention at 16 and 8 with 4 heads, scale-shift norm, dropout 0.3); Adam 1e-4, batch 128,
EMA 0.9999, 500K steps, no warmup or clipping (as in openai/improved-diffusion).
Reported: 3.17 bits/dim, FID 3.19 (Table 2 of the paper, see REFERENCE.md).
"""

from configs import default, models


def get_config(size: str = ""):
    config = default.get_config()
    config.model = models.iddpm_cifar10()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.loss_type = "hybrid"
    config.diffusion.variance_type = "learned_range"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    config.training.num_steps = 500_000
    config.training.eval_every = 50_000
    config.sampling.num_steps = 4000
    return default.finalize(config, size)
