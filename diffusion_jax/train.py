"""Training: the objective of `config.diffusion`, the optimizer, a pure train step, the loop.

    state = train_and_evaluate(config, workdir)

The train step is a pure function `(state, batch, rng) -> (state, metrics)`; step s draws
its randomness from `fold_in(rng, s)`, so with the data iterator's position saved in the same
checkpoint, a run restarted from any checkpoint continues exactly as the uninterrupted run.
An update whose loss or gradient is not finite is never applied: `training.on_nonfinite`
says whether to skip it ("skip") or stop the run with a message ("stop").
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from diffusion_jax import (
    checkpointing,
    clipping,
    compilation,
    config_validation,
    data,
    likelihood,
    losses,
    metrics_writer,
    models,
    parallel,
    sampling_run,
    timestep_sampling,
)
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.train_state import TrainState

# ---------------------------------------------------------------- objective and optimizer


def make_loss_fn(config: ml_collections.ConfigDict, model) -> losses.LossFn:
    """`loss_fn(params, batch, rng, loss_history)` of `diffusion.loss_type`, with label
    dropout for classifier-free guidance when the model is class-conditional."""
    diffusion = config.diffusion
    apply_fn = sampling_run.network_fn(model, train=True)
    if diffusion.loss_type in sampling_run.DISCRETE_LOSSES:
        loss_fn = losses.make_diffusion_loss_fn(
            sampling_run.make_process(diffusion),
            apply_fn,
            loss_type=diffusion.loss_type,
            target=diffusion.target,
            weighting=diffusion.loss_weighting,
            snr_gamma=diffusion.snr_gamma,
            variance_type=diffusion.variance_type,
            hybrid_lambda=diffusion.hybrid_lambda,
        )
    elif diffusion.loss_type == "flow_matching":
        loss_fn = losses.make_flow_matching_loss_fn(
            apply_fn,
            time_distribution=diffusion.flow_time_distribution,
            time_scale=diffusion.flow_time_scale,
        )
    elif diffusion.loss_type == "edm":
        loss_fn = losses.make_edm_loss_fn(
            apply_fn,
            sigma_data=diffusion.edm_sigma_data,
            p_mean=diffusion.edm_p_mean,
            p_std=diffusion.edm_p_std,
        )
    else:
        raise ValueError(
            f"diffusion.loss_type={diffusion.loss_type!r}; allowed: {list(losses.LOSS_TYPES)}"
        )
    if config.model.num_classes > 0 and diffusion.label_dropout > 0:
        loss_fn = losses.with_label_dropout(
            loss_fn, rate=diffusion.label_dropout, null_label=config.model.num_classes
        )
    return loss_fn


def make_lr_schedule(optim: ml_collections.ConfigDict, *, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay."""
    peak = optim.learning_rate
    decay_steps = max(num_steps - optim.warmup_steps, 1)
    final = peak * optim.final_lr_fraction
    decays = {
        "constant": lambda: optax.constant_schedule(peak),
        "cosine": lambda: optax.cosine_decay_schedule(
            peak, decay_steps, alpha=optim.final_lr_fraction
        ),
        "linear": lambda: optax.linear_schedule(peak, final, decay_steps),
    }
    if optim.decay not in decays:
        raise ValueError(f"optim.decay={optim.decay!r}; allowed: {list(decays)}")
    if optim.warmup_steps == 0:
        return decays[optim.decay]()
    warmup = optax.linear_schedule(0.0, peak, optim.warmup_steps)
    return optax.join_schedules([warmup, decays[optim.decay]()], [optim.warmup_steps])


def make_optimizer(
    optim: ml_collections.ConfigDict, *, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam or AdamW on the learning-rate schedule, after clipping by global norm."""
    schedule = make_lr_schedule(optim, num_steps=num_steps)
    if optim.optimizer == "adam":
        update = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.optimizer == "adamw":
        update = optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
    else:
        raise ValueError(f"optim.optimizer={optim.optimizer!r}; allowed: ['adam', 'adamw']")
    if optim.grad_clip_norm > 0:
        return optax.chain(clipping.clip_by_global_norm(optim.grad_clip_norm), update), schedule
    return update, schedule


def make_create_fn(config: ml_collections.ConfigDict, model, tx) -> Callable:
    """`create(rng) -> TrainState` at step 0 (jit it with the state's shardings)."""
    diffusion = config.diffusion

    def create(rng):
        params = models.init_params(model, config.model, rng)
        history = None
        if diffusion.timestep_sampling == "importance":
            history = timestep_sampling.init_loss_history(
                diffusion.num_timesteps, history_length=diffusion.loss_history_length
            )
        return train_state_lib.create_train_state(
            params, tx, num_ema=len(config.training.ema_decays), loss_history=history
        )

    return create


# ---------------------------------------------------------------- the train step

SKIP_FORMS = ("cond", "select")  # how `make_train_step` skips a non-finite update


def make_train_step(
    loss_fn: losses.LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    ema_decays: tuple[float, ...],
    ema_warmup: bool = True,
    axis_name: str | None = None,
    skip_with: str = "cond",
) -> Callable:
    """The pure `train_step(state, batch, rng) -> (state, metrics)`.

    One Adam step on the loss, the EMAs and the loss history updated; nothing but the step
    counter and `num_skipped` changes when the loss or gradient norm is not finite. `tx` gets
    that gradient norm as the extra argument `global_norm` (`clipping` clips by it). Under
    `jax.pmap` pass `axis_name`: gradients are averaged over it and each device draws its own
    noise; under `jax.jit` on a mesh the batch is one global array and XLA does the rest.
    `skip_with` is how a non-finite update is skipped (`SKIP_FORMS`): "cond" (a branch) or
    "select" (`where(finite, new, old)`); the same results, different programs
    (`--skip_with` of the benchmark times both).
    """
    if skip_with not in SKIP_FORMS:
        raise ValueError(f"skip_with={skip_with!r}; allowed: {SKIP_FORMS}")

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, batch, rng, state.loss_history)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
            aux = jax.lax.all_gather(aux, axis_name, tiled=True)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(state: TrainState) -> TrainState:
            # The norm computed once, for clipping too (`clipping`).
            updates, opt_state = optax.with_extra_args_support(tx).update(
                grads, state.opt_state, state.params, global_norm=grad_norm
            )
            params = optax.apply_updates(state.params, updates)
            ema_params = tuple(
                train_state_lib.update_ema(
                    ema, params, train_state_lib.ema_decay_at(decay, state.step, warmup=ema_warmup)
                )
                for ema, decay in zip(state.ema_params, ema_decays, strict=True)
            )
            history = state.loss_history
            if history is not None:
                history = timestep_sampling.update_loss_history(
                    history, aux["t"], aux["per_example"]
                )
            return state.replace(
                params=params, ema_params=ema_params, opt_state=opt_state, loss_history=history
            )

        # A branch by default: a select of old and new made XLA:CPU copy the parameters and
        # both Adam moments at the start of every step (docs/benchmarks.md).
        if skip_with == "cond":
            kept = jax.lax.cond(finite, apply_update, lambda state: state, state)
        else:
            kept = jax.tree.map(functools.partial(jnp.where, finite), apply_update(state), state)
        new_state = kept.replace(
            step=state.step + 1, num_skipped=state.num_skipped + (~finite).astype(jnp.int32)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # optax counts applied updates only: a skipped step does not advance the schedule
            "learning_rate": lr_schedule(state.step - state.num_skipped),
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def make_bits_per_dim_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """`bpd(params, batch, rng) -> [B]`: the discrete ELBO in bits/dim (Ho et al., Eq. 5)."""
    process = sampling_run.make_process(config.diffusion)
    apply_fn = sampling_run.network_fn(model, train=False)

    def bits_per_dim(params, batch, rng):
        model_fn = lambda x, t: apply_fn(params, x, t, batch.get("label"), None)
        return likelihood.bits_per_dim(
            process,
            model_fn,
            batch["x"],
            rng,
            prediction=config.diffusion.target,
            variance_type=config.diffusion.variance_type,
            decoder=config.eval.decoder,
        )["total"]

    return bits_per_dim


# ---------------------------------------------------------------- setting up a run


@dataclasses.dataclass
class Run:
    """Everything the training loop touches."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    strategy: parallel.Strategy
    model: object
    state: TrainState
    train_step: Callable
    data_iterator: data.DataIterator
    manager: object
    writer: metrics_writer.MetricsWriter
    sigterm: checkpointing.SigtermFlag
    train_rng: jax.Array
    sample_rng: jax.Array
    generate: Callable  # jitted generate(params, rng) -> samples
    bits_per_dim: Callable  # jitted bits_per_dim(params, batch, rng) -> [B]

    @property
    def host_step(self) -> int:
        return int(self.strategy.checkpointable(self.state).step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.close()
        self.sigterm.close()
        self.data_iterator.close()


def _build_model_and_optimizer(config: ml_collections.ConfigDict):
    model = models.build_model(config.model)
    tx, lr_schedule = make_optimizer(config.optim, num_steps=config.training.num_steps)
    return model, tx, lr_schedule


def restore_or_init(
    strategy: parallel.Strategy, manager, create_fn: Callable, rng: jax.Array, iterator=None
) -> TrainState:
    """The latest checkpoint's state (and iterator position), else a fresh state."""
    abstract = jax.eval_shape(create_fn, rng)
    restored = checkpointing.restore_latest(manager, strategy.restore_target(abstract))
    if restored is None:
        return strategy.init_state(create_fn, rng)
    state, data_state = restored
    if iterator is not None:
        iterator.set_state(data_state)
    logging.info("Restored the checkpoint of step %d", int(state.step))
    return strategy.place_restored(state)


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


def setup_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Run:
    """Mesh, model, optimizer, data, checkpoint manager and the restored or fresh state."""
    workdir = pathlib.Path(workdir)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(config.training.batch_size, strategy.num_devices)
    if config.training.eval_every > 0:
        check_evaluation_data(config, strategy.num_devices)
    model, tx, lr_schedule = _build_model_and_optimizer(config)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.training.seed), 3)
    create_fn = make_create_fn(config, model, tx)
    iterator = data.make_dataset(
        config.data,
        split=config.data.train_split,
        seed=config.training.seed,
        global_batch_size=config.training.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    manager = checkpointing.make_checkpoint_manager(workdir, keep=config.training.keep_checkpoints)
    state = restore_or_init(strategy, manager, create_fn, init_rng, iterator)
    axis_name = parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None
    train_step = make_train_step(
        make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        ema_warmup=config.training.ema_warmup,
        axis_name=axis_name,
    )
    abstract = jax.eval_shape(create_fn, init_rng)
    writer = metrics_writer.MetricsWriter(
        workdir,
        enabled=jax.process_index() == 0,
        progress_bar=config.training.progress_bar,
        start_step=int(strategy.checkpointable(state).step),
    )
    return Run(
        config=config,
        workdir=workdir,
        strategy=strategy,
        model=model,
        state=state,
        train_step=strategy.compile_train_step(train_step, abstract),
        data_iterator=iterator,
        manager=manager,
        writer=writer,
        sigterm=checkpointing.SigtermFlag(),
        train_rng=train_rng,
        sample_rng=sample_rng,
        generate=compilation.CompiledTogether(
            jax.jit(sampling_run.make_generate_fn(config, model, count=config.sampling.num_images)),
            "generate",
        ),
        bits_per_dim=compilation.CompiledTogether(
            jax.jit(make_bits_per_dim_fn(config, model)), "bits_per_dim"
        ),
    )


# ---------------------------------------------------------------- what happens every N steps


def inference_params(state: TrainState, config: ml_collections.ConfigDict, strategy=None):
    """The EMA (or raw) parameters named by `sampling.ema_index`, ready for jit."""
    params = train_state_lib.ema_or_params(state, config.sampling.ema_index)
    return params if strategy is None else strategy.params_for_inference(params)


def save_checkpoint(run: Run, step: int) -> None:
    if run.manager.latest_step() == step:
        return
    state = run.strategy.checkpointable(run.state)
    checkpointing.save(run.manager, state, run.data_iterator.get_state(), step=step, force=True)


def write_sample_grid(run: Run, step: int, *, final: bool = False) -> None:
    """Samples from the EMA parameters with the configured sampler, as PNG (and TensorBoard)."""
    params = inference_params(run.state, run.config, run.strategy)
    samples = parallel.to_host(run.generate(params, run.sample_rng))
    if jax.process_index() != 0:
        return
    path = sampling_run.write_samples(run.workdir / "samples", f"step_{step:07d}", samples)
    if final:
        sampling_run.write_samples(run.workdir, "samples", samples)
    if samples.ndim == 4:
        run.writer.write_image(step, "samples", metrics_writer.image_grid(samples))
    logging.info("Wrote samples of step %d to %s", step, path)


def evaluate_bits_per_dim(run: Run, step: int) -> float:
    """Mean bits/dim of the EMA model on `eval.num_batches` batches of `data.eval_split`."""
    config = run.config
    iterator = data.make_eval_dataset(
        config.data,
        split=config.data.eval_split,
        seed=config.training.seed,
        global_batch_size=config.eval.batch_size,
    )
    params = inference_params(run.state, config, run.strategy)
    rng = jax.random.fold_in(run.sample_rng, step)
    values = []
    for index, batch in zip(range(config.eval.num_batches), iterator):
        values.append(
            parallel.to_host(run.bits_per_dim(params, run.strategy.inference_batch(batch), rng))
        )
        rng = jax.random.fold_in(rng, index)
    iterator.close()
    value = float(np.mean(np.concatenate(values)))
    run.writer.write_scalars(step, {"eval_bits_per_dim": value})
    logging.info("Step %d: %.4f bits/dim on %s", step, value, config.data.eval_split)
    return value


class Throughput:
    """Images and steps per second since the last call."""

    def __init__(self, step: int):
        self.step, self.time = step, time.monotonic()

    def update(self, step: int, batch_size: int) -> tuple[float, float]:
        now = time.monotonic()
        seconds = max(now - self.time, 1e-9)
        steps_per_s = (step - self.step) / seconds
        self.step, self.time = step, now
        return steps_per_s * batch_size, steps_per_s


def log_metrics(run: Run, step: int, pending: list[dict], throughput: Throughput) -> dict:
    """Average the metrics of the last steps and write them; returns what it wrote."""
    host = jax.device_get(pending)
    finite = np.array([m["finite"] for m in host])
    losses_ = np.array([m["loss"] for m in host])
    grad_norms = np.array([m["grad_norm"] for m in host])
    img_per_s, steps_per_s = throughput.update(step, run.config.training.batch_size)
    scalars = {  # loss and gradient norm of the applied (finite) steps only
        "loss": float(np.mean(losses_[finite])) if finite.any() else float("nan"),
        "grad_norm": float(np.mean(grad_norms[finite])) if finite.any() else float("nan"),
        "learning_rate": float(host[-1]["learning_rate"]),
        "skipped_updates": int(np.sum(~finite)),
        "img_per_s": img_per_s,
        "steps_per_s": steps_per_s,
    }
    run.writer.write_scalars(step, scalars)
    run.writer.progress(
        step,
        run.config.training.num_steps,
        loss=scalars["loss"],
        img_per_s=img_per_s,
        steps_per_s=steps_per_s,
    )
    return scalars


def stop_if_nonfinite(run: Run, step: int, metrics: dict) -> None:
    if bool(jax.device_get(metrics["finite"])):
        return
    raise FloatingPointError(
        f"Non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the last "
        f"checkpoint (step {run.manager.latest_step()}) is intact. training.on_nonfinite='stop'; "
        "set it to 'skip' to skip such updates, or lower optim.learning_rate."
    )


# ---------------------------------------------------------------- the loop


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _after_step(run: Run, step: int) -> None:
    """Checkpoint first: a sample grid or an evaluation that fails loses no training."""
    training = run.config.training
    if _every(step, training.checkpoint_every):
        save_checkpoint(run, step)
    if _every(step, training.sample_every) and step < training.num_steps:
        write_sample_grid(run, step)
    if _every(step, training.eval_every):
        evaluate_bits_per_dim(run, step)


def train_loop(run: Run) -> bool:
    """Train up to `training.num_steps`; returns False if stopped early by preemption."""
    training = run.config.training
    step = run.host_step
    throughput, pending = Throughput(step), []
    # Steps dispatched ahead of the device: one more on accelerators keeps them busy. XLA:CPU
    # runs the collectives of all (fake) devices on one thread pool, where two executions in
    # flight can deadlock, so there each step waits for the previous one.
    in_flight = 1 if jax.default_backend() == "cpu" else 2
    while step < training.num_steps:
        batch = run.strategy.device_batch(next(run.data_iterator))
        if len(pending) >= in_flight:
            jax.block_until_ready(pending[-in_flight])
        run.state, metrics = run.train_step(run.state, batch, run.train_rng)
        step += 1
        pending.append(metrics)
        if training.on_nonfinite == "stop":
            stop_if_nonfinite(run, step, metrics)
        if _every(step, training.log_every) or step == training.num_steps:
            log_metrics(run, step, pending, throughput)
            pending = []
        _after_step(run, step)
        if checkpointing.preemption_requested(run.manager, run.sigterm, step):
            save_checkpoint(run, step)
            logging.warning("Stopped at step %d for preemption; the checkpoint is saved.", step)
            return False
    save_checkpoint(run, step)
    return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), log, sample and evaluate."""
    config_validation.validate(config)
    run = setup_run(config, workdir)
    try:
        finished = train_loop(run)
        if finished:
            write_sample_grid(run, run.host_step, final=True)
    finally:
        run.close()
    return run.state


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
    """(model, state, step) of the latest checkpoint in `workdir`, for sampling or evaluation."""
    config_validation.validate(config)
    strategy = parallel.make_strategy(config.parallel)
    model, tx, _ = _build_model_and_optimizer(config)
    create_fn = make_create_fn(config, model, tx)
    manager = checkpointing.make_checkpoint_manager(workdir, keep=config.training.keep_checkpoints)
    rng = jax.random.key(config.training.seed)
    try:
        target = strategy.restore_target(jax.eval_shape(create_fn, rng))
        restored = checkpointing.restore_latest(manager, target)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(
            f"No checkpoint in {pathlib.Path(workdir) / checkpointing.CHECKPOINT_DIR}; "
            "train first with --mode=train and the same --workdir."
        )
    state = restored[0]
    return model, state, int(state.step)
