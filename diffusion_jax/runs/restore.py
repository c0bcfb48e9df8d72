"""The state of a run from its workdir: the latest checkpoint, or a fresh one to train."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
from absl import logging

from diffusion_jax import models
from diffusion_jax.runs import build, text_conditioning, validate
from diffusion_jax.runtime import parallel, storage
from diffusion_jax.training import checkpointing, optimizer, train_state
from diffusion_jax.training.train_state import TrainState


def build_model_and_optimizer(config: ml_collections.ConfigDict):
    """(model, tx, lr_schedule) of the config's `model` and `optim` sections (a frozen text
    encoder left out of the optimizer)."""
    model = models.build_model(config.model)
    tx, lr_schedule = optimizer.make_optimizer(config.optim, num_steps=config.training.num_steps)
    return model, text_conditioning.without_frozen_text_encoder(config, tx), lr_schedule


def checkpoint_manager(config: ml_collections.ConfigDict, workdir: str, *, create: bool = True):
    """The manager of `workdir/checkpoints` with the `training` section's options."""
    return checkpointing.make_checkpoint_manager(
        workdir,
        keep=config.training.keep_checkpoints,
        create=create,
        retries=config.training.checkpoint_retries,
    )


def restore_or_init(
    strategy: parallel.Strategy, manager, create_fn: Callable, rng: jax.Array, iterator=None
) -> TrainState:
    """The latest checkpoint's state (and iterator position), else a fresh state; first,
    CheckpointSaveError if the checkpoint directory has no room for one more checkpoint."""
    abstract = jax.eval_shape(create_fn, rng)
    checkpointing.check_free_space(manager, checkpointing.checkpoint_bytes(abstract))
    restored = checkpointing.restore_latest(manager, strategy.restore_target(abstract))
    if restored is None:
        return strategy.init_state(create_fn, rng)
    state, data_state = restored
    if iterator is not None:
        iterator.set_state(data_state)
    logging.info("Restored the checkpoint of step %d", int(state.step))
    return strategy.place_restored(state)


def inference_params(state: TrainState, config: ml_collections.ConfigDict, strategy=None):
    """The EMA (or raw) parameters named by `sampling.ema_index`, ready for jit."""
    params = train_state.ema_or_params(state, config.sampling.ema_index)
    return params if strategy is None else strategy.params_for_inference(params)


def restore_latest_state(config: ml_collections.ConfigDict, workdir: str, create_fn: Callable):
    """(state, step) of the latest checkpoint in `workdir` of the state `create_fn` makes.

    A workdir without checkpoints is left as it was (nothing is created in it)."""
    if not checkpointing.checkpoint_steps(workdir):
        raise _no_checkpoint(workdir)
    strategy = parallel.make_strategy(config.parallel)
    manager = checkpoint_manager(config, workdir, create=False)
    rng = jax.random.key(config.training.seed)
    try:
        target = strategy.restore_target(jax.eval_shape(create_fn, rng))
        restored = checkpointing.restore_latest(manager, target)
    finally:
        manager.close()
    if restored is None:
        raise _no_checkpoint(workdir)
    state = restored[0]
    return state, int(state.step)


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
    """(model, state, step) of the latest checkpoint in `workdir`, for sampling or evaluation."""
    validate.validate(config)
    model, tx, _ = build_model_and_optimizer(config)
    state, step = restore_latest_state(config, workdir, build.make_create_fn(config, model, tx))
    return model, state, step


def _no_checkpoint(workdir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No checkpoint in {storage.as_path(workdir) / checkpointing.CHECKPOINT_DIR}; "
        "train first with --mode=train and the same --workdir."
    )
