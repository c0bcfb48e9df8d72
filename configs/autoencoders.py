"""Presets for the `autoencoder` and `autoencoder_loss` config sections of an autoencoder
run (`config.task = "autoencoder"`; see diffusion_jax/runs/autoencoder.py).

Every field of `diffusion_jax.models.autoencoders.AutoencoderConfig` is in the section, so
that any can be overridden on the command line, e.g. `--config.autoencoder.latent_channels=8`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from diffusion_jax.models.autoencoders import PRESETS


def architecture(preset: str) -> ml_collections.ConfigDict:
    """The `autoencoder` section of a preset of `autoencoders.PRESETS` ("sd", "digits_f4",
    ...), with the computation dtype."""
    section = ml_collections.ConfigDict(dataclasses.asdict(PRESETS[preset]))
    section.dtype = "float32"
    return section


def loss() -> ml_collections.ConfigDict:
    """LDM's KL-f8 loss (`autoencoder_kl_32x32x4.yaml`): L1, LPIPS x 1.0 once `lpips_weights`
    names a weights file (none by default, and then no perceptual term), KL weight 1e-6, a
    learned log-variance, a 3-layer PatchGAN of width 64 with hinge loss and the adaptive
    weight x 0.5 from step 50,001.

    LPIPS weights are never downloaded; convert them once (diffusion_jax/convert/lpips.py):
        python -m diffusion_jax.convert.lpips --out lpips_vgg.npz --vgg vgg16-397923af.pth
    and pass `--config.autoencoder_loss.lpips_weights=lpips_vgg.npz`."""
    section = ml_collections.ConfigDict()
    section.reconstruction = "l1"  # "l1" | "l2"
    section.lpips_weights = ""  # our LPIPS .npz; "" = no perceptual term
    section.perceptual_weight = 1.0  # LDM's; used only with lpips_weights
    section.kl_weight = 1e-6
    section.learn_logvar = True
    section.disc_weight = 0.5  # 0: no discriminator
    section.disc_start = 50001
    section.disc_channels = 64
    section.disc_layers = 3
    return section
