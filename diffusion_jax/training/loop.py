"""The training loop: steps, logs, checkpoints, and the hooks a run adds (samples, evals).

    trainer = Trainer(options=LoopOptions(...), strategy=..., state=..., ...)
    finished = train_loop(trainer)

It reads a small frozen `LoopOptions`, not the config; what to do with samples and
evaluations is the run's business, handed in as hooks `(state, step) -> None`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from diffusion_jax.runtime import metrics_writer, parallel
from diffusion_jax.training import checkpointing, preemption
from diffusion_jax.training.train_state import TrainState

Hook = Callable[[TrainState, int], object]  # (state, step) -> anything; e.g. a sample grid


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How long to train and how often to log, save, sample and evaluate (0: never)."""

    num_steps: int
    batch_size: int  # global, for images/second
    log_every: int
    checkpoint_every: int
    sample_every: int = 0
    eval_every: int = 0
    stop_on_nonfinite: bool = False  # else a non-finite update is skipped (and counted)


@dataclasses.dataclass
class Trainer:
    """Everything the training loop touches."""

    options: LoopOptions
    strategy: parallel.Strategy
    state: TrainState
    train_step: Callable  # compiled (state, batch, rng) -> (state, metrics)
    data_iterator: object  # next() -> this process's batch; get_state() / close()
    manager: object  # orbax CheckpointManager
    writer: metrics_writer.MetricsWriter
    sigterm: preemption.SigtermFlag
    rng: jax.Array
    on_sample: Hook | None = None
    on_eval: Hook | None = None

    @property
    def host_step(self) -> int:
        return int(self.strategy.checkpointable(self.state).step)

    def close(self) -> None:
        checkpointing.wait_for_save(self.manager)  # CheckpointSaveError if it failed
        self.manager.close()
        self.writer.close()
        self.sigterm.close()
        self.data_iterator.close()


def save_checkpoint(trainer: Trainer, step: int) -> None:
    if trainer.manager.latest_step() == step:
        return
    state = trainer.strategy.checkpointable(trainer.state)
    data_state = trainer.data_iterator.get_state()
    checkpointing.save(trainer.manager, state, data_state, step=step, force=True)


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


def log_metrics(trainer: Trainer, step: int, pending: list[dict], throughput: Throughput) -> dict:
    """Average the metrics of the last steps and write them; returns what it wrote."""
    host = jax.device_get(pending)
    finite = np.array([m["finite"] for m in host])
    losses = np.array([m["loss"] for m in host])
    grad_norms = np.array([m["grad_norm"] for m in host])
    img_per_s, steps_per_s = throughput.update(step, trainer.options.batch_size)
    scalars = {  # loss and gradient norm of the applied (finite) steps only
        "loss": float(np.mean(losses[finite])) if finite.any() else float("nan"),
        "grad_norm": float(np.mean(grad_norms[finite])) if finite.any() else float("nan"),
        "learning_rate": float(host[-1]["learning_rate"]),
        "skipped_updates": int(np.sum(~finite)),
        "img_per_s": img_per_s,
        "steps_per_s": steps_per_s,
    }
    trainer.writer.write_scalars(step, scalars)
    trainer.writer.progress(
        step,
        trainer.options.num_steps,
        loss=scalars["loss"],
        img_per_s=img_per_s,
        steps_per_s=steps_per_s,
    )
    return scalars


def stop_if_nonfinite(trainer: Trainer, step: int, metrics: dict) -> None:
    if bool(jax.device_get(metrics["finite"])):
        return
    raise FloatingPointError(
        f"Non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the last "
        f"checkpoint (step {trainer.manager.latest_step()}) is intact. "
        "training.on_nonfinite='stop'; set it to 'skip' to skip such updates, or lower "
        "optim.learning_rate."
    )


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def after_step(trainer: Trainer, step: int) -> None:
    """Checkpoint first: a sample grid or an evaluation that fails loses no training."""
    options = trainer.options
    if _every(step, options.checkpoint_every):
        save_checkpoint(trainer, step)
    if trainer.on_sample and _every(step, options.sample_every) and step < options.num_steps:
        trainer.on_sample(trainer.state, step)
    if trainer.on_eval and _every(step, options.eval_every):
        trainer.on_eval(trainer.state, step)


def train_loop(trainer: Trainer) -> bool:
    """Train up to `options.num_steps`; returns False if stopped early by preemption."""
    options = trainer.options
    step = trainer.host_step
    throughput, pending = Throughput(step), []
    # Steps dispatched ahead of the device: one more on accelerators keeps them busy. XLA:CPU
    # runs the collectives of all (fake) devices on one thread pool, where two executions in
    # flight can deadlock, so there each step waits for the previous one.
    in_flight = 1 if jax.default_backend() == "cpu" else 2
    while step < options.num_steps:
        batch = trainer.strategy.device_batch(next(trainer.data_iterator))
        if len(pending) >= in_flight:
            jax.block_until_ready(pending[-in_flight])
        trainer.state, metrics = trainer.train_step(trainer.state, batch, trainer.rng)
        step += 1
        pending.append(metrics)
        if options.stop_on_nonfinite:
            stop_if_nonfinite(trainer, step, metrics)
        if _every(step, options.log_every) or step == options.num_steps:
            log_metrics(trainer, step, pending, throughput)
            pending = []
        after_step(trainer, step)
        checkpointing.raise_if_save_failed(trainer.manager, save_checkpoint, trainer, step)
        if preemption.preemption_requested(trainer.manager, trainer.sigterm, step):
            save_checkpoint(trainer, step)
            logging.warning("Stopped at step %d for preemption; the checkpoint is saved.", step)
            return False
    save_checkpoint(trainer, step)
    return True
