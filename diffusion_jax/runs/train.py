"""--mode=train: the training run of a config, resumed from the latest checkpoint in its
workdir, with sample grids and bits/dim evaluations along the way.

    state = train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import data
from diffusion_jax.runs import build, generate, restore, validate
from diffusion_jax.runtime import compilation, images, metrics_writer, parallel
from diffusion_jax.training import loop, preemption, train_step
from diffusion_jax.training.train_state import TrainState


def loop_options(config: ml_collections.ConfigDict) -> loop.LoopOptions:
    training = config.training
    return loop.LoopOptions(
        num_steps=training.num_steps,
        batch_size=training.batch_size,
        log_every=training.log_every,
        checkpoint_every=training.checkpoint_every,
        sample_every=training.sample_every,
        eval_every=training.eval_every,
        stop_on_nonfinite=training.on_nonfinite == "stop",
    )


def check_evaluation_data(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Before training: the periodic bits/dim evaluation has at least one whole batch of
    `data.eval_split` that divides over the devices (not a failure eval_every steps in)."""
    evaluation = config.eval
    parallel.check_batch_size(evaluation.batch_size, num_devices, option="eval.batch_size")
    data.local_batch_size(evaluation.batch_size, jax.process_count(), option="eval.batch_size")
    if evaluation.num_batches < 1:
        raise ValueError(f"eval.num_batches={evaluation.num_batches} must be >= 1")
    num_examples = len(data.build_source(config.data, split=config.data.eval_split))
    if num_examples < evaluation.batch_size:
        raise ValueError(
            f"data.eval_split={config.data.eval_split!r} has {num_examples} examples, fewer "
            f"than one batch of eval.batch_size={evaluation.batch_size}; allowed: "
            f"eval.batch_size <= {num_examples}, or training.eval_every=0"
        )


def make_sample_grid_hook(config, model, strategy, writer, workdir: pathlib.Path, rng):
    """`hook(state, step, final=False)`: samples of the EMA parameters with the configured
    sampler, as workdir/samples/step_<step>.png (and TensorBoard; workdir/samples.png at the
    end)."""
    count = config.sampling.num_images
    generate_fn = compilation.CompiledTogether(
        jax.jit(generate.make_generate_fn(config, model, count=count)), "generate"
    )

    def write_sample_grid(state: TrainState, step: int, *, final: bool = False) -> None:
        params = restore.inference_params(state, config, strategy)
        samples = parallel.to_host(generate_fn(params, rng))
        if jax.process_index() != 0:
            return
        path = images.write_samples(workdir / "samples", f"step_{step:07d}", samples)
        if final:
            images.write_samples(workdir, "samples", samples)
        if samples.ndim == 4:
            writer.write_image(step, "samples", images.image_grid(samples))
        logging.info("Wrote samples of step %d to %s", step, path)

    return write_sample_grid


def make_bits_per_dim_hook(config, model, strategy, writer, rng):
    """`hook(state, step) -> float`: the EMA model's mean bits/dim on `eval.num_batches`
    batches of `data.eval_split`."""
    bits_per_dim = compilation.CompiledTogether(
        jax.jit(build.make_bits_per_dim_fn(config, model)), "bits_per_dim"
    )

    def evaluate_bits_per_dim(state: TrainState, step: int) -> float:
        iterator = data.make_eval_dataset(
            config.data,
            split=config.data.eval_split,
            seed=config.training.seed,
            global_batch_size=config.eval.batch_size,
        )
        params = restore.inference_params(state, config, strategy)
        step_rng = jax.random.fold_in(rng, step)
        values = []
        for index, batch in zip(range(config.eval.num_batches), iterator):
            batch = strategy.inference_batch(batch)
            values.append(parallel.to_host(bits_per_dim(params, batch, step_rng)))
            step_rng = jax.random.fold_in(step_rng, index)
        iterator.close()
        value = float(np.mean(np.concatenate(values)))
        writer.write_scalars(step, {"eval_bits_per_dim": value})
        logging.info("Step %d: %.4f bits/dim on %s", step, value, config.data.eval_split)
        return value

    return evaluate_bits_per_dim


def setup_trainer(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> loop.Trainer:
    """Mesh, model, optimizer, data, checkpoint manager, the restored or fresh state, hooks."""
    workdir = pathlib.Path(workdir)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(config.training.batch_size, strategy.num_devices)
    if config.training.eval_every > 0:
        check_evaluation_data(config, strategy.num_devices)
    model, tx, lr_schedule = restore.build_model_and_optimizer(config)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.training.seed), 3)
    create_fn = build.make_create_fn(config, model, tx)
    iterator = data.make_dataset(
        config.data,
        split=config.data.train_split,
        seed=config.training.seed,
        global_batch_size=config.training.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    manager = restore.checkpoint_manager(config, workdir)
    state = restore.restore_or_init(strategy, manager, create_fn, init_rng, iterator)
    step_fn = train_step.make_train_step(
        build.make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        ema_warmup=config.training.ema_warmup,
        axis_name=parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None,
    )
    writer = metrics_writer.MetricsWriter(
        workdir,
        enabled=jax.process_index() == 0,
        progress_bar=config.training.progress_bar,
        start_step=int(strategy.checkpointable(state).step),
    )
    return loop.Trainer(
        options=loop_options(config),
        strategy=strategy,
        state=state,
        train_step=strategy.compile_train_step(step_fn, jax.eval_shape(create_fn, init_rng)),
        data_iterator=iterator,
        manager=manager,
        writer=writer,
        sigterm=preemption.SigtermFlag(),
        rng=train_rng,
        on_sample=make_sample_grid_hook(config, model, strategy, writer, workdir, sample_rng),
        on_eval=make_bits_per_dim_hook(config, model, strategy, writer, sample_rng),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), log, sample and evaluate."""
    validate.validate(config)
    trainer = setup_trainer(config, workdir)
    try:
        if loop.train_loop(trainer):
            trainer.on_sample(trainer.state, trainer.host_step, final=True)
    finally:
        trainer.close()
    return trainer.state
