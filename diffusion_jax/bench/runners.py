"""What the benchmark times: our compiled train step and samplers on synthetic data, and
diffusers' U-Net of the same configuration (`torch_side`)."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from configs import models as model_presets
from diffusion_jax import models, samplers
from diffusion_jax.bench.measure import compile_timed, cost_flops
from diffusion_jax.bench.options import BenchOptions, compiler_options
from diffusion_jax.diffusion import losses
from diffusion_jax.runs import build, generate
from diffusion_jax.runtime import parallel
from diffusion_jax.training import optimizer
from diffusion_jax.training import train_step as train_step_lib


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the tiny U-Net of `configs.models.tiny()` at its image size."""
    config = ml_collections.ConfigDict(config.to_dict())
    model = model_presets.tiny()
    model.image_size = config.model.image_size
    model.in_channels = model.out_channels = config.model.in_channels
    model.attn_resolutions = (config.model.image_size // 2,)
    model.learn_sigma = config.model.learn_sigma
    model.num_classes = config.model.num_classes
    config.model = model
    return config


def model_config(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = dtype
    return config


def _synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape = (batch_size, *models.sample_shape(config.model))
    batch = {"x": rng.uniform(-1.0, 1.0, shape).astype(np.float32)}
    if config.model.num_classes > 0:
        batch["label"] = rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)
    return batch


def _train_step_parts(config: ml_collections.ConfigDict, options: BenchOptions):
    """(model, optimizer, train step function) of `train`, as training runs build them."""
    model = models.build_model(config.model)
    tx, lr_schedule = optimizer.make_optimizer(config.optim, num_steps=config.training.num_steps)
    train_step = train_step_lib.make_train_step(
        build.make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        skip_with=options.skip_with,
    )
    return model, tx, train_step


def model_flops_per_step(config, options: BenchOptions, strategy, state, batch, rng) -> float:
    """FLOPs of one whole train step as the network defines them: XLA's count of the lowered
    program (before it is split over the devices: a compiled program's count is one device's
    share), a U-Net's with direct convolutions. Winograd's convolutions (`models.winograd`)
    need fewer multiplications for the same work, which is speed, not fewer model FLOPs."""
    direct = ml_collections.ConfigDict(config.to_dict())
    if direct.model.name == "unet":
        direct.model.conv_algorithm = "direct"
    train_step = _train_step_parts(direct, options)[2]
    jitted = strategy.compile_train_step(train_step, jax.eval_shape(lambda: state))
    return cost_flops(jitted.lower(state, batch, rng))


def make_train_runner(config: ml_collections.ConfigDict, options: BenchOptions):
    """(run, info): `run()` takes one compiled train step of `train_step_lib.make_train_step` and
    blocks on it; info holds the compile time, the FLOPs per step (the network's, and XLA's
    count of the compiled step) and the parameter count."""
    if config.parallel.strategy == "pmap":
        raise ValueError(
            "parallel.strategy='pmap': the benchmark times jit-compiled train steps; "
            "allowed: 'data', 'fsdp'"
        )
    model, tx, train_step = _train_step_parts(config, options)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(options.batch_size, strategy.num_devices, option="--batch_size")
    create = build.make_create_fn(config, model, tx)
    rng = jax.random.PRNGKey(options.seed)
    state = strategy.init_state(create, rng)
    batch = strategy.device_batch(_synthetic_batch(config, options.batch_size, options.seed))
    jitted = strategy.compile_train_step(train_step, jax.eval_shape(lambda: state))
    compiled, compile_time = compile_timed(
        jitted, state, batch, rng, options=compiler_options(options)
    )
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return jax.block_until_ready((holder["state"], metrics))

    info = {
        "compile": compile_time,
        "flops_per_step": model_flops_per_step(config, options, strategy, state, batch, rng),
        "compiled_flops_per_step": cost_flops(compiled),  # per device, as compiled
        "params": models.count_params(state.params),
        "devices": strategy.num_devices,
    }
    return run, info


def _sampler_options(config: ml_collections.ConfigDict, name: str, prediction: str) -> dict:
    candidates = {
        "prediction": prediction,
        "variance_type": config.diffusion.variance_type,
        "clip_x0": config.sampling.clip_x0,
        "eta": 0.0,
    }
    allowed = samplers.sampler_options(name)
    return {key: value for key, value in candidates.items() if key in allowed}


def make_sample_runner(config, model, params, name: str, num_steps: int, options: BenchOptions):
    """(run, info): `run()` draws one batch of samples with the compiled sampler `name`."""
    if config.diffusion.loss_type not in losses.DISCRETE_LOSSES:
        raise ValueError(
            f"diffusion.loss_type={config.diffusion.loss_type!r}: the sampling benchmark "
            f"needs a discrete process; allowed: {losses.DISCRETE_LOSSES}"
        )
    schedule, prediction = generate.sampling_schedule(config.diffusion)
    sample = samplers.make_sampler(
        name,
        schedule=schedule,
        num_steps=num_steps,
        **_sampler_options(config, name, prediction),
    )
    batch = options.sample_batch_size
    labels = generate.sample_labels(config, batch)
    shape = (batch, *models.sample_shape(config.model))
    noise = jax.random.normal(jax.random.PRNGKey(options.seed), shape)  # [B, H, W, C]
    rng = jax.random.PRNGKey(options.seed + 1)

    def sample_fn(params, noise, rng):  # the network function of sampling runs
        model_fn = generate.model_fn_of(config, model, params, schedule)
        return sample(model_fn, noise, rng, labels)

    compiled, compile_time = compile_timed(
        jax.jit(sample_fn), params, noise, rng, options=compiler_options(options)
    )
    info = {"compile": compile_time, "nfe": 0}

    def run():
        _, sample_info = jax.block_until_ready(compiled(params, noise, rng))
        info["nfe"] = int(sample_info["nfe"])

    return run, info


def diffusers_side(config: ml_collections.ConfigDict, options: BenchOptions, our_params: int):
    """diffusers' U-Net of the same configuration, after checking the parameter counts, on
    the device `bench_torch.torch_device` picks (ours, where PyTorch sees it)."""
    import torch

    from diffusion_jax.bench import torch_side as bench_torch

    device = bench_torch.torch_device(options.torch_device, jax.default_backend())
    torch.set_num_threads(options.torch_threads or len(os.sched_getaffinity(0)))
    bench_torch.set_precision(device)
    unet = bench_torch.build_diffusers_unet(config.model, seed=options.seed, device=device)
    their_params = bench_torch.count_torch_params(unet)
    if their_params != our_params:
        raise ValueError(
            f"--compare diffusers: diffusers' UNet2DModel has {their_params} parameters, ours "
            f"{our_params}; the model config has no exact diffusers counterpart"
        )
    return unet, {**bench_torch.torch_info(device), "params": their_params}
