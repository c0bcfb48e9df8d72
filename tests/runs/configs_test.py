"""Tests of configs/: every config validates at both sizes, documents its command, and the
paper configs carry the papers' settings (REFERENCE.md)."""

import importlib

import pytest

from diffusion_jax import models
from diffusion_jax.runs import validate

CONFIG_NAMES = ("cifar10", "cifar10_iddpm", "cifar10_cond", "celeba64", "mnist", "digits", "toy2d",
                "txt2img_digits")  # fmt: skip


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("size", ["", "tiny"])
def test_config_validates_builds_its_model_and_is_locked(name, size):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(size)
    validate.validate(config)
    models.build_model(config.model)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.training.no_such_option = 1
    assert f"--config configs/{name}.py --workdir" in module.__doc__


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_tiny_shrinks_batch_steps_and_model(name):
    module = importlib.import_module(f"configs.{name}")
    full, tiny = module.get_config(), module.get_config("tiny")
    assert tiny.training.batch_size <= 8 and tiny.training.num_steps <= 40
    assert tiny.data.name == full.data.name and tiny.diffusion == full.diffusion
    if full.model.name == "unet":
        assert tiny.model.ch <= 16 and tiny.model.learn_sigma == full.model.learn_sigma
        assert tiny.model.num_classes == full.model.num_classes
    if full.model.name == "text_unet":
        assert tiny.model.block_out_channels[0] <= 16
        assert tiny.model.cross_attention_dim == tiny.model.text_encoder.hidden_size <= 16


def test_unknown_size_is_named():
    from configs import cifar10

    with pytest.raises(ValueError, match=r"Unknown config size 'huge'.*allowed"):
        cifar10.get_config("huge")


def test_cifar10_is_the_ddpm_setting():
    from configs import cifar10

    config = cifar10.get_config()
    assert (config.model.ch, tuple(config.model.ch_mult), config.model.num_res_blocks) == (
        128, (1, 2, 2, 2), 2,
    )  # fmt: skip
    assert tuple(config.model.attn_resolutions) == (16,) and config.model.dropout == 0.1
    assert (config.diffusion.schedule, config.diffusion.num_timesteps) == ("linear", 1000)
    assert (config.diffusion.loss_type, config.diffusion.target) == ("simple", "eps")
    assert config.diffusion.variance_type == "fixed_large"
    assert (config.optim.optimizer, config.optim.learning_rate) == ("adam", 2e-4)
    assert (config.optim.warmup_steps, config.optim.grad_clip_norm) == (5000, 1.0)
    assert config.training.batch_size == 128 and tuple(config.training.ema_decays) == (0.9999,)
    assert config.data.random_flip


def test_cifar10_iddpm_is_the_improved_ddpm_setting():
    from configs import cifar10_iddpm

    config = cifar10_iddpm.get_config()
    assert (config.diffusion.schedule, config.diffusion.num_timesteps) == ("cosine", 4000)
    assert (config.diffusion.loss_type, config.diffusion.hybrid_lambda) == ("hybrid", 1e-3)
    assert config.diffusion.variance_type == "learned_range" and config.model.learn_sigma


def test_cifar10_cond_drops_labels_and_guides():
    from configs import cifar10_cond

    config = cifar10_cond.get_config()
    assert config.data.use_labels and config.model.num_classes == 10
    assert config.diffusion.label_dropout == 0.1 and config.sampling.guidance_scale > 1.0


def test_zero_terminal_snr_with_eps_target_is_named():
    from configs import cifar10

    config = cifar10.get_config("tiny")
    with config.unlocked():
        config.diffusion.zero_terminal_snr = True
    with pytest.raises(ValueError, match=r"diffusion.target='eps'.*allowed targets: 'v', 'x0'"):
        validate.validate(config)
    with config.unlocked():
        config.diffusion.target = "v"
    validate.validate(config)


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("cifar10_cond", "label", 10, r"sampling.label=10; allowed: -1 \(cycle .*\) or 0..9"),
        ("cifar10_cond", "label", 99, r"sampling.label=99; allowed: -1 \(cycle .*\) or 0..9"),
        ("cifar10_cond", "label", -5, r"sampling.label=-5; allowed: -1 \(cycle .*\) or 0..9"),
        ("cifar10", "label", 0, r"sampling.label=0 but model.num_classes=0.*allowed: -1"),
        ("cifar10", "guidance_scale", 2.0, r"sampling.guidance_scale=2.0.*allowed: 1.0"),
        ("cifar10", "guidance_scale", 0.0, r"sampling.guidance_scale=0.0.*allowed: 1.0"),
        ("cifar10_cond", "num_images", 0, r"sampling.num_images=0 must be >= 1"),
        ("cifar10", "batch_size", 0, r"sampling.batch_size=0 must be >= 1"),
        ("cifar10_cond", "batch_size", -3, r"sampling.batch_size=-3 must be >= 1"),
    ],
)
def test_bad_sampling_options_are_named(name, key, value, message):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.sampling[key] = value
    with pytest.raises(ValueError, match=message):
        validate.validate(config)


def test_sampling_labels_of_every_class_and_no_guidance_are_accepted():
    from configs import cifar10, cifar10_cond

    conditional = cifar10_cond.get_config("tiny")
    for label in (-1, 0, 9):
        conditional.sampling.label = label
        validate.validate(conditional)
    unconditional = cifar10.get_config("tiny")
    assert unconditional.sampling.guidance_scale == 1.0  # the default: no guidance
    validate.validate(unconditional)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optim", "learning_rate", 0.0, r"optim.learning_rate=0.0 must be > 0"),
        ("optim", "learning_rate", -1e-3, r"optim.learning_rate=-0.001 must be > 0"),
        ("optim", "b1", 1.5, r"optim.b1=1.5; allowed: \[0.0, 1.0\)"),
        ("optim", "b2", 1.0, r"optim.b2=1.0; allowed: \[0.0, 1.0\)"),
        ("optim", "eps", -1.0, r"optim.eps=-1.0 must be > 0"),
        ("optim", "final_lr_fraction", 2.0, r"optim.final_lr_fraction=2.0; allowed: \[0.0, 1.0\]"),
        ("optim", "grad_clip_norm", -1.0, r"optim.grad_clip_norm=-1.0; allowed: > 0, or 0"),
        ("optim", "weight_decay", 0.1, r"optim.weight_decay=0.1 with optim.optimizer='adam'"),
        ("training", "seed", -1, r"training.seed=-1 must be >= 0"),
        ("training", "checkpoint_retries", -1, r"training.checkpoint_retries=-1 must be >= 0"),
    ],
)
def test_bad_optimizer_and_seed_values_are_named(section, key, value, message):
    from configs import cifar10

    config = cifar10.get_config("tiny")
    setattr(config[section], key, value)
    with pytest.raises(ValueError, match=message):
        validate.validate(config)


def test_adamw_takes_weight_decay():
    from configs import cifar10

    config = cifar10.get_config("tiny")
    config.optim.optimizer, config.optim.weight_decay = "adamw", 0.1
    validate.validate(config)
