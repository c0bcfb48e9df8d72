"""Checks across config sections, before any work starts.

Each section's own options are checked where they are read (models, data, losses,
samplers; the data options that need no data set are checked here too, through
`data.check_options`, so that a run stops before any work); here are the choices of the
training loop and the agreements between sections (the model's input is the data's shape,
its classes the data's labels, a learned variance the model's doubled output). Every error
is a `ValueError` naming the option and what is allowed.
"""

from __future__ import annotations

import ml_collections

from diffusion_jax import data
from diffusion_jax.diffusion import losses, timestep_sampling
from diffusion_jax.diffusion.process import VARIANCE_TYPES
from diffusion_jax.diffusion.vlb import DECODERS
from diffusion_jax.runs.text_conditioning import TEXT_MODEL
from diffusion_jax.runtime import parallel


def _check_choice(value, allowed, option: str) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r}; allowed: {list(allowed)}")


def _check_positive(value, option: str, *, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{option}={value} must be >= {minimum}")


def _check_range(value, low, high, option: str, *, closed_high: bool = False) -> None:
    """low <= value < high (or <= high with `closed_high`)."""
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{option}={value}; allowed: [{low}, {high}{bracket}")


def check_optim(config: ml_collections.ConfigDict) -> None:
    """Adam's numbers and the schedule's: each outside its range is an error naming it."""
    optim = config.optim
    _check_choice(optim.optimizer, ("adam", "adamw"), "optim.optimizer")
    _check_choice(optim.decay, ("constant", "cosine", "linear"), "optim.decay")
    _check_positive(optim.warmup_steps, "optim.warmup_steps", minimum=0)
    if not optim.learning_rate > 0:
        raise ValueError(f"optim.learning_rate={optim.learning_rate} must be > 0")
    _check_range(optim.b1, 0.0, 1.0, "optim.b1")
    _check_range(optim.b2, 0.0, 1.0, "optim.b2")
    if not optim.eps > 0:
        raise ValueError(f"optim.eps={optim.eps} must be > 0")
    _check_range(optim.final_lr_fraction, 0.0, 1.0, "optim.final_lr_fraction", closed_high=True)
    if optim.grad_clip_norm < 0:
        raise ValueError(
            f"optim.grad_clip_norm={optim.grad_clip_norm}; allowed: > 0, or 0 for no clipping"
        )
    if optim.weight_decay < 0 or (optim.weight_decay and optim.optimizer != "adamw"):
        raise ValueError(
            f"optim.weight_decay={optim.weight_decay} with optim.optimizer={optim.optimizer!r}; "
            "allowed: >= 0 with 'adamw' (decoupled weight decay), 0 with 'adam'"
        )


def check_training(config: ml_collections.ConfigDict) -> None:
    training = config.training
    _check_positive(training.seed, "training.seed", minimum=0)
    _check_positive(training.batch_size, "training.batch_size")
    _check_positive(training.num_steps, "training.num_steps")
    _check_positive(training.log_every, "training.log_every")
    _check_positive(training.checkpoint_every, "training.checkpoint_every")
    _check_positive(training.keep_checkpoints, "training.keep_checkpoints")
    _check_positive(training.checkpoint_retries, "training.checkpoint_retries", minimum=0)
    _check_positive(training.sample_every, "training.sample_every", minimum=0)
    _check_positive(training.eval_every, "training.eval_every", minimum=0)
    _check_choice(training.on_nonfinite, ("skip", "stop"), "training.on_nonfinite")
    _check_positive(training.max_consecutive_skips, "training.max_consecutive_skips", minimum=0)
    if not training.ema_decays or not all(0.0 <= d < 1.0 for d in training.ema_decays):
        raise ValueError(
            f"training.ema_decays={tuple(training.ema_decays)}: give one or more decay rates "
            "in [0, 1), e.g. (0.9999,)"
        )
    if not -1 <= config.sampling.ema_index < len(training.ema_decays):
        raise ValueError(
            f"sampling.ema_index={config.sampling.ema_index}; allowed: -1 (raw parameters) or "
            f"0..{len(training.ema_decays) - 1} (an index into training.ema_decays)"
        )


def check_diffusion(config: ml_collections.ConfigDict) -> None:
    diffusion = config.diffusion
    _check_choice(diffusion.loss_type, losses.LOSS_TYPES, "diffusion.loss_type")
    _check_choice(diffusion.variance_type, VARIANCE_TYPES, "diffusion.variance_type")
    _check_choice(
        diffusion.timestep_sampling, timestep_sampling.METHODS, "diffusion.timestep_sampling"
    )
    learned = diffusion.variance_type in ("learned", "learned_range")
    if learned != bool(config.model.learn_sigma):
        raise ValueError(
            f"diffusion.variance_type={diffusion.variance_type!r} needs "
            f"model.learn_sigma={learned} (a learned variance doubles the output channels), "
            f"got model.learn_sigma={config.model.learn_sigma}"
        )
    discrete = diffusion.loss_type in losses.DISCRETE_LOSSES
    if discrete and diffusion.zero_terminal_snr:
        losses.check_target_at_terminal_snr(diffusion.target, alpha_last=0.0)
    if diffusion.timestep_sampling == "importance" and not discrete:
        raise ValueError(
            "diffusion.timestep_sampling='importance' needs a discrete loss; "
            f"diffusion.loss_type={diffusion.loss_type!r}; allowed: {list(losses.DISCRETE_LOSSES)}"
        )
    if config.training.eval_every > 0 and not discrete:
        raise ValueError(
            "training.eval_every > 0 computes bits/dim through the discrete chain, undefined "
            f"for diffusion.loss_type={diffusion.loss_type!r}; set training.eval_every=0"
        )
    _check_choice(config.eval.decoder, DECODERS, "eval.decoder")


def check_model_matches_data(config: ml_collections.ConfigDict) -> None:
    data, model = config.data, config.model
    if data.name == "toy2d":
        if model.name != "mlp":
            raise ValueError(
                f"data.name='toy2d' has 2-D points; model.name={model.name!r}, allowed: 'mlp'"
            )
    elif config.latent.autoencoder:
        pass  # the model's input is the latent of the images (`runs.latent.check_model_fits`)
    elif (model.image_size, model.in_channels) != (data.image_size, data.num_channels):
        raise ValueError(
            f"model.image_size={model.image_size}, model.in_channels={model.in_channels} "
            f"must equal data.image_size={data.image_size}, data.num_channels={data.num_channels}"
            " (or set latent.autoencoder for a latent diffusion model)"
        )
    expected_classes = data.num_classes if data.use_labels else 0
    if model.num_classes != expected_classes:
        raise ValueError(
            f"model.num_classes={model.num_classes} but data.use_labels={data.use_labels} with "
            f"data.num_classes={data.num_classes}; allowed: model.num_classes={expected_classes}"
        )


def _check_label(label, num_classes: int) -> None:
    """-1 (every class in turn) or one of the model's classes; only -1 if it has none."""
    if num_classes == 0 and label != -1:
        raise ValueError(
            f"sampling.label={label} but model.num_classes=0 (an unconditional model); allowed: -1"
        )
    if not -1 <= label < num_classes:
        raise ValueError(
            f"sampling.label={label}; allowed: -1 (cycle through the classes) or "
            f"0..{num_classes - 1} (one of the model.num_classes={num_classes} classes)"
        )


def check_sampling(config: ml_collections.ConfigDict) -> None:
    """The `sampling` options: image counts, the class label, guidance of a conditional model."""
    sampling, num_classes = config.sampling, config.model.num_classes
    _check_positive(sampling.num_images, "sampling.num_images")
    _check_positive(sampling.batch_size, "sampling.batch_size")
    _check_label(sampling.label, num_classes)
    guidance = sampling.guidance_scale
    text = config.model.name == TEXT_MODEL
    if sampling.prompts and not text:
        raise ValueError(
            f"sampling.prompts={tuple(sampling.prompts)} with model.name={config.model.name!r}; "
            f"allowed: () (prompts need model.name={TEXT_MODEL!r})"
        )
    if num_classes == 0 and not text and guidance is not None and guidance != 1.0:
        raise ValueError(
            f"sampling.guidance_scale={guidance}: classifier-free guidance needs a "
            "class-conditional model, but model.num_classes=0; allowed: 1.0 (no guidance)"
        )


def check_text_model(config: ml_collections.ConfigDict) -> None:
    """A text-conditional model: captions to condition on, prompts to sample, no bits/dim
    (the bound needs a condition per example of data.eval_split; not computed)."""
    if config.model.name != TEXT_MODEL:
        return
    data_config = config.data
    captioned = bool(data_config.caption_templates or data_config.caption_feature)
    if not captioned and data_config.name != "captioned_folder":
        raise ValueError(
            f"model.name={TEXT_MODEL!r} needs captions; allowed: data.caption_templates, "
            "data.name='captioned_folder', or data.caption_feature"
        )
    prompts = tuple(config.sampling.prompts)
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(
            f"sampling.prompts={prompts}; allowed: one or more strings (the prompts that sample "
            f"grids and --mode sample draw), for model.name={TEXT_MODEL!r}"
        )
    for key, value in (("training.eval_every", config.training.eval_every),
                       ("eval.likelihoods", tuple(config.eval.likelihoods))):  # fmt: skip
        if value:
            raise ValueError(
                f"{key}={value}: bits/dim of a text-conditional model are not computed; "
                f"allowed: {key}=0 or ()"
            )
    scales = tuple(config.eval.guidance_scales)
    if not all(isinstance(s, int | float) and s >= 0 for s in scales):
        raise ValueError(f"eval.guidance_scales={scales}; allowed: numbers >= 0 (1: no guidance)")


def check_loop(config: ml_collections.ConfigDict) -> None:
    """The options every training run reads: parallelism, optimizer, training loop."""
    _check_choice(config.parallel.strategy, parallel.STRATEGIES, "parallel.strategy")
    check_optim(config)
    check_training(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the first inconsistent option of a run config."""
    check_loop(config)
    check_diffusion(config)
    data.check_options(config.data)  # crops, captions, skipping: each error names its key
    check_model_matches_data(config)
    check_text_model(config)
    check_sampling(config)
