"""--mode=train: the training run of a config, resumed from the latest checkpoint in its
workdir, with sample grids and bits/dim evaluations along the way.

    state = train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import data
from diffusion_jax.runs import build, generate, latent, restore, validate
from diffusion_jax.runtime import (
    compilation,
    console,
    images,
    metrics_writer,
    parallel,
    progress,
    storage,
)
from diffusion_jax.training import loop, preemption, train_step
from diffusion_jax.training.train_state import TrainState

SUMMARY_FILE = "summary.json"


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
        max_consecutive_skips=training.max_consecutive_skips,
        progress_bar=training.progress_bar,
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


def make_sample_grid_hook(config, model, strategy, writer, workdir, rng, decode=None):
    """`hook(state, step, final=False) -> path`: samples of the EMA parameters with the
    configured sampler (decoded by `decode` in a latent run), as workdir/samples/
    step_<step>.png (and TensorBoard; at the end workdir/samples.png, the path returned)."""
    count = config.sampling.num_images
    generate_fn = compilation.CompiledTogether(
        jax.jit(generate.make_generate_fn(config, model, count=count, decode=decode)), "generate"
    )

    def write_sample_grid(state: TrainState, step: int, *, final: bool = False):
        params = restore.inference_params(state, config, strategy)
        samples = parallel.to_host(generate_fn(params, rng))
        if jax.process_index() != 0:
            return
        path = images.write_samples(workdir / "samples", f"step_{step:07d}", samples)
        if final:
            path = images.write_samples(workdir, "samples", samples)
        if samples.ndim == 4:
            writer.write_image(step, "samples", images.image_grid(samples))
        logging.info("Wrote samples of step %d to %s", step, path)
        return path

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


def setup_latents(config, strategy, state, step_fn, fresh: bool, rng):
    """A latent run's (state with its latent scale, step on encoded batches, decode)."""
    ae_config, ae_params = latent.load_autoencoder(config)
    ae_params = latent.replicated(ae_params, strategy.mesh)
    if fresh:
        scale = latent.initial_scale(
            config, ae_config, ae_params, jax.random.fold_in(rng, latent.SCALE_STREAM)
        )
        placed = jax.device_put(np.float32(scale), state.latent_scale.sharding)
        state = state.replace(latent_scale=placed)
    space = latent.latent_space_of(config, ae_config, ae_params, state)
    logging.info("Diffusing the latents of %s, scale %.6g", config.latent.autoencoder, space.scale)
    return state, latent.encoding_train_step(step_fn, space, rng), space.decode


def setup_trainer(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> loop.Trainer:
    """Mesh, model, optimizer, data, checkpoint manager, the restored or fresh state, hooks."""
    workdir = storage.as_path(workdir)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(config.training.batch_size, strategy.num_devices)
    if config.training.eval_every > 0:
        check_evaluation_data(config, strategy.num_devices)
    model, tx, lr_schedule = restore.build_model_and_optimizer(config)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.training.seed), 3)
    create_fn = build.make_create_fn(config, model, tx)
    iterator = build.make_train_iterator(config)
    manager = restore.checkpoint_manager(config, workdir)
    fresh = manager.latest_step() is None
    state = restore.restore_or_init(strategy, manager, create_fn, init_rng, iterator)
    step_fn = train_step.make_train_step(
        build.make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        ema_warmup=config.training.ema_warmup,
        axis_name=parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None,
    )
    decode = None
    if latent.uses_latents(config):
        state, step_fn, decode = setup_latents(config, strategy, state, step_fn, fresh, train_rng)
    writer = metrics_writer.MetricsWriter(
        workdir,
        enabled=jax.process_index() == 0,
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
        stop_flag=preemption.StopFlag(),
        rng=train_rng,
        on_sample=make_sample_grid_hook(
            config, model, strategy, writer, workdir, sample_rng, decode
        ),
        on_eval=make_bits_per_dim_hook(config, model, strategy, writer, sample_rng),
    )


def training_summary(trainer: loop.Trainer, samples, *, eval_name: str = "bits/dim") -> dict:
    """What the run did: steps, losses, skipped updates, time, and where its outputs are."""
    record, options = trainer.record, trainer.options
    end = trainer.host_step
    seconds = time.monotonic() - record.start_time
    latest = trainer.manager.latest_step()
    steady = record.steady_steps_per_s(end)
    return {
        "status": "finished" if record.stopped_by is None else f"stopped for {record.stopped_by}",
        "steps": {"start": record.start_step, "end": end, "num_steps": options.num_steps},
        "loss": {
            "final": record.final_loss,
            "best": record.best_loss,
            "best_step": record.best_step,
        },
        "skipped_updates": record.skipped,
        "wall_time_s": seconds,
        # after the first logged window, which holds the compilation (None: too short a run)
        "img_per_s": None if steady is None else steady * options.batch_size,
        "checkpoint": None if latest is None else str(trainer.manager.directory / str(latest)),
        "samples": None if samples is None else str(samples),
        "eval": None
        if record.last_eval is None
        else {"name": eval_name, "step": record.last_eval[0], "value": record.last_eval[1]},
    }


def show_summary(summary: dict, path: os.PathLike) -> None:
    steps, loss = summary["steps"], summary["loss"]
    losses = None
    if loss["final"] is not None:
        losses = f"final {loss['final']:.4g}, best {loss['best']:.4g} at step {loss['best_step']}"
    evaluated = summary["eval"]
    console.print_summary(
        f"training {summary['status']}: steps {steps['start']} -> {steps['end']} of "
        f"{steps['num_steps']} in {progress.format_duration(summary['wall_time_s'])}"
        + (f" ({summary['img_per_s']:.3g} img/s)" if summary["img_per_s"] else ""),
        [
            ("loss", losses),
            ("skipped", f"{summary['skipped_updates']} updates (non-finite loss or gradient)"),
            ("checkpoint", summary["checkpoint"]),
            ("samples", summary["samples"]),
            (
                evaluated["name"] if evaluated else "eval",
                evaluated and f"{evaluated['value']:.4f} at step {evaluated['step']}",
            ),
            ("summary", path),
        ],
    )


def write_summary(
    trainer: loop.Trainer, workdir: os.PathLike, samples, *, eval_name: str = "bits/dim"
) -> dict:
    """The closing summary on the console and as WORKDIR/summary.json (process 0)."""
    summary = training_summary(trainer, samples, eval_name=eval_name)
    path = storage.as_path(workdir) / SUMMARY_FILE
    if jax.process_index() == 0:
        storage.write_text(path, metrics_writer.dumps(summary, indent=2) + "\n")
        show_summary(summary, path)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), log, sample and evaluate."""
    validate.validate(config)
    trainer = setup_trainer(config, workdir)
    samples = None
    try:
        if loop.train_loop(trainer):
            samples = trainer.on_sample(trainer.state, trainer.host_step, final=True)
    finally:
        trainer.close()
    write_summary(trainer, workdir, samples)
    return trainer.state
