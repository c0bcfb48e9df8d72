"""The training loop: steps, logs, checkpoints, and the hooks a run adds (samples, evals).

    trainer = Trainer(options=LoopOptions(...), strategy=..., state=..., ...)
    finished = train_loop(trainer)

It reads a small frozen `LoopOptions`, not the config; what to do with samples and
evaluations is the run's business, handed in as hooks `(state, step) -> None`. What the run
did (steps, losses, skipped updates, why it stopped) is kept in `trainer.record`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from diffusion_jax.runtime import metrics_writer, parallel, progress
from diffusion_jax.training import checkpointing, preemption
from diffusion_jax.training.train_state import TrainState

Hook = Callable[[TrainState, int], object]  # (state, step) -> anything; e.g. a sample grid


class TrainingDiverged(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient."""


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
    max_consecutive_skips: int = 0  # > 0: stop when this many updates in a row are skipped
    progress_bar: bool = True


@dataclasses.dataclass
class LoopRecord:
    """What this run of the loop did, for its closing summary."""

    start_step: int
    start_time: float = dataclasses.field(default_factory=time.monotonic)
    final_loss: float | None = None  # of the last logged window
    best_loss: float | None = None  # the lowest logged window mean, at `best_step`
    best_step: int | None = None
    skipped: int = 0  # non-finite updates, not applied
    skipped_in_a_row: int = 0
    save_deferred: bool = False  # a checkpoint was due during skipped updates
    last_finite: tuple[int, float] | None = None  # (step, loss) of the last applied update
    observed_step: int = 0  # the last step whose metrics were read on the host
    stopped_by: str | None = None  # the signal or sync point that stopped it early
    last_eval: tuple[int, object] | None = None  # (step, what the eval hook returned)
    first_window: tuple[int, float] | None = None  # (step, time) of the first log: compiled

    def steady_steps_per_s(self, step: int) -> float | None:
        """Steps per second after the first logged window (which holds the compilation)."""
        if self.first_window is None or step <= self.first_window[0]:
            return None
        return (step - self.first_window[0]) / max(time.monotonic() - self.first_window[1], 1e-9)

    def observe(self, step: int, metrics: dict) -> None:
        """Count the outcome of step `step` (each step once, in order)."""
        if step <= self.observed_step:
            return
        self.observed_step = step
        finite, loss = jax.device_get((metrics["finite"], metrics["loss"]))
        if bool(finite):
            self.skipped_in_a_row, self.last_finite = 0, (step, float(loss))
        else:
            self.skipped += 1
            self.skipped_in_a_row += 1

    def observe_window(self, step: int, loss: float) -> None:
        if self.first_window is None:
            self.first_window = (step, time.monotonic())
        if not math.isfinite(loss):
            return
        self.final_loss = loss
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step


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
    stop_flag: preemption.StopFlag
    rng: jax.Array
    on_sample: Hook | None = None
    on_eval: Hook | None = None
    record: LoopRecord | None = None

    @property
    def host_step(self) -> int:
        return int(self.strategy.checkpointable(self.state).step)

    def close(self) -> None:
        checkpointing.wait_for_save(self.manager)  # CheckpointSaveError if it failed
        self.manager.close()
        self.writer.close()
        self.stop_flag.close()
        self.data_iterator.close()


def save_checkpoint(trainer: Trainer, step: int) -> None:
    if trainer.manager.latest_step() == step:
        return
    state = trainer.strategy.checkpointable(trainer.state)
    data_state = trainer.data_iterator.get_state()
    checkpointing.save(trainer.manager, state, data_state, step=step, force=True)
    trainer.writer.flush()  # a remote workdir: its metrics uploaded soon, as far as this step


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


_STEP_METRICS = {"loss", "grad_norm", "learning_rate", "finite"}


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
    for name in sorted(set(host[-1]) - _STEP_METRICS):  # the loss's own terms (aux["metrics"])
        values = np.array([m[name] for m in host], np.float64)
        scalars[name] = float(np.mean(values[finite])) if finite.any() else float("nan")
    trainer.writer.write_scalars(step, scalars)
    return scalars


def check_divergence(trainer: Trainer) -> None:
    """Stop when `max_consecutive_skips` updates in a row were not applied (a diverged run
    skips every update from then on), naming the step and the last finite loss."""
    record, limit = trainer.record, trainer.options.max_consecutive_skips
    if limit <= 0 or record.skipped_in_a_row < limit:
        return
    last = "no update was applied in this run"
    if record.last_finite is not None:
        last = (
            f"the last finite loss was {record.last_finite[1]:.4g} at step {record.last_finite[0]}"
        )
    saved = trainer.manager.latest_step()
    raise TrainingDiverged(
        f"Training diverged: the last {record.skipped_in_a_row} updates, up to step "
        f"{record.observed_step}, had a non-finite loss or gradient and were skipped; {last}. "
        + (
            f"The last checkpoint (step {saved}) is kept. "
            if saved
            else "No checkpoint was saved. "
        )
        + "Lower optim.learning_rate, or raise training.max_consecutive_skips "
        f"(now {limit}; 0: never stop)."
    )


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


def after_step(trainer: Trainer, step: int, metrics: dict) -> None:
    """Checkpoint first: a sample grid or an evaluation that fails loses no training. No
    checkpoint is saved while updates are being skipped (it could replace a good one with the
    state of a diverging run): the save waits for the next applied update."""
    options, record = trainer.options, trainer.record
    if _every(step, options.checkpoint_every) or record.save_deferred:
        record.observe(step, metrics)  # saving waits for this step anyway
        record.save_deferred = record.skipped_in_a_row > 0
        if not record.save_deferred:
            save_checkpoint(trainer, step)
    if trainer.on_sample and _every(step, options.sample_every) and step < options.num_steps:
        trainer.on_sample(trainer.state, step)
    if trainer.on_eval and _every(step, options.eval_every):
        record.last_eval = (step, trainer.on_eval(trainer.state, step))


def _log_window(trainer: Trainer, bar, step: int, pending: list[dict], throughput) -> None:
    """Log the steps since the last log (up to `step`) and show them on the progress bar."""
    record = trainer.record
    for offset, window_metrics in enumerate(pending):
        record.observe(step - len(pending) + 1 + offset, window_metrics)
    scalars = log_metrics(trainer, step, pending, throughput)
    record.observe_window(step, scalars["loss"])
    bar.update(step, loss=scalars["loss"], skipped=record.skipped or None)


def train_loop(trainer: Trainer) -> bool:
    """Train up to `options.num_steps`; returns False if stopped early by a signal or the
    pod's preemption sync point (after saving a checkpoint)."""
    options = trainer.options
    step = trainer.host_step
    trainer.record = record = LoopRecord(start_step=step, observed_step=step)
    bar = progress.ProgressBar(
        "training",
        options.num_steps,
        unit="img",
        items_per_step=options.batch_size,
        start=step,
        enabled=options.progress_bar,
    )
    throughput, pending = Throughput(step), []
    # Steps dispatched ahead of the device: one more on accelerators keeps them busy. XLA:CPU
    # runs the collectives of all (fake) devices on one thread pool, where two executions in
    # flight can deadlock, so there each step waits for the previous one.
    in_flight = 1 if jax.default_backend() == "cpu" else 2
    try:
        while step < options.num_steps:
            batch = trainer.strategy.device_batch(next(trainer.data_iterator))
            if len(pending) >= in_flight:
                done = pending[-in_flight]
                jax.block_until_ready(done)
                record.observe(step - in_flight + 1, done)  # read at no cost: it is done
                check_divergence(trainer)
            trainer.state, metrics = trainer.train_step(trainer.state, batch, trainer.rng)
            step += 1
            pending.append(metrics)
            if options.stop_on_nonfinite:
                stop_if_nonfinite(trainer, step, metrics)
            if _every(step, options.log_every) or step == options.num_steps:
                _log_window(trainer, bar, step, pending, throughput)
                pending = []
                check_divergence(trainer)
            after_step(trainer, step, metrics)
            checkpointing.raise_if_save_failed(trainer.manager, save_checkpoint, trainer, step)
            if preemption.preemption_requested(trainer.manager, trainer.stop_flag, step):
                save_checkpoint(trainer, step)
                record.stopped_by = trainer.stop_flag.signal_name
                logging.warning(
                    "Stopped at step %d for %s; the checkpoint is saved.", step, record.stopped_by
                )
                return False
        save_checkpoint(trainer, step)
        return True
    except TrainingDiverged:
        if pending:  # the skipped updates of the last window are recorded too
            _log_window(trainer, bar, step, pending, throughput)
        raise
    finally:
        bar.close()
