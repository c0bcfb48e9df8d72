"""Text-to-image on scikit-learn's 8x8 digits: a small cross-attention U-Net conditioned on a
small CLIP-architecture text encoder trained with it, from templated captions ("a handwritten
digit seven", "the number 7"); needs no download (the tokenizer's vocabulary is learned from
the captions, `diffusion_jax.models.text.vocabulary`).

    python -m diffusion_jax.main --config configs/txt2img_digits.py --workdir /tmp/txt2img
    python -m diffusion_jax.main --config configs/txt2img_digits.py --workdir /tmp/txt2img \
        --mode sample --config.sampling.prompts='("the number 3", "a handwritten digit five")'
    python -m diffusion_jax.main --config configs/txt2img_digits.py --workdir /tmp/txt2img \
        --mode eval

Latent diffusion's conditioning (Rombach et al. 2022, Sec. 3.3: the U-Net's spatial
transformers cross-attend to the text encoder's states) in pixel space, with Stable
Diffusion's classifier-free guidance training (Ho & Salimans 2022): 10% of captions are
replaced by "", the unconditional branch at sampling time. The DDPM recipe of
configs/digits.py otherwise (linear betas, T = 1000, eps-prediction, Adam with warm-up, EMA
0.999), sampled with 50 DDIM steps. `--config.model.text_encoder.trainable=False` keeps the
encoder at its initialisation (or at `model.text_encoder.pretrained`) and out of the
optimizer. `--mode eval` classifies samples of "the number k", k = 0..9, with the digits
classifier at each of `eval.guidance_scales`: after 6,000 steps (27 minutes on two busy CPU
cores) 98.4% of samples show the prompted digit without guidance, 100% at scales 1.5 to 5
(docs/text_to_image.md).
"""

from configs import default, models

TEMPLATES = ("a handwritten digit {name}", "the number {label}", "the digit {name}")


def get_config(size: str = ""):
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False
    config.data.caption_templates = TEMPLATES
    config.data.caption_dropout = 0.1
    config.model = models.text_unet()
    config.diffusion.variance_type = "fixed_large"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.training.batch_size = 64
    config.training.num_steps = 6000
    config.training.ema_decays = (0.999,)
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 0
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 50
    config.sampling.guidance_scale = 2.0
    config.sampling.prompts = tuple(f"the number {k}" for k in range(10))
    config.sampling.num_images = 40  # each prompt 4 times
    config.sampling.batch_size = 40
    config.eval.metrics = ()
    config.eval.likelihoods = ()
    config.eval.sampler = "ddim"
    config.eval.num_steps = (50,)
    config.eval.num_samples = 500  # 50 of each digit per guidance scale
    config.eval.batch_size = 100
    config.eval.guidance_scales = (1.0, 1.5, 2.0, 3.0, 5.0)
    return default.finalize(config, size)
