"""Checkpoints of a run: the train state and the data iterator's position, saved together.

Orbax writes each checkpoint asynchronously into `workdir/checkpoints/<step>` (state with
`StandardSave`, the iterator state with `JsonSave`) and keeps the last K. A checkpoint is
committed only once fully written, so a process killed mid-save leaves the previous one
intact. On restore:

- a checkpoint whose parameters differ in names or shapes from the current model is
  refused with a `ValueError` that names the differences (the workdir belongs to another
  model); nothing is deleted;
- a checkpoint that cannot be read is passed over for the previous one; once an older one
  is restored, the newer unreadable ones are moved to `workdir/corrupted_checkpoints/<step>`
  with one warning each, naming the step and the cause (`orbax_workarounds` keeps orbax's
  failed reads from printing a traceback each). If none can be read, nothing is moved and
  the error names each failure: what fails on every checkpoint (device memory, storage) is
  not the checkpoints' fault, and a run must not silently start again from step 0.

Restoring uses the shardings of the current mesh, so a run can continue on another number
of devices.

Saving (`save`) first checks the free space of the checkpoint directory, where its file system
reports it, against the state's bytes, and refuses a checkpoint that cannot fit. A background
write that fails (a full disk, a storage error) is reported by `raise_if_save_failed`, which
the loop calls after every step, or at the latest by the next `save` or `wait_for_save`, as
one `CheckpointSaveError` naming the directory and the cause; the run stops (or saves again,
up to `retries` times in a row) rather than train on without a checkpoint. A failed save is
never committed and deletes no older checkpoint: the previous one stays restorable.

A workdir in an object store (gs://bucket/run) works alike, through Orbax's own support: there
Orbax writes a step in place, `checkpoints/<step>/`, and commits it last by writing
`commit_success.txt` (an object store has no atomic rename of a folder); a step without it (a
save interrupted by a kill or a preemption) is not listed, so never restored, and the previous
one is (other stores get Orbax's temporary folder and rename, as a local disk does). There is
no free space to check (the free-space check is skipped), and setting a checkpoint aside
copies its objects and deletes them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import weakref
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax.runtime import storage, tree_shapes
from diffusion_jax.training import orbax_workarounds

CHECKPOINT_DIR = "checkpoints"
CORRUPTED_DIR = "corrupted_checkpoints"
# What Orbax writes last into a step's folder in an object store, to commit it.
COMMIT_MARKER = "commit_success.txt"


class CheckpointSaveError(OSError):
    """A checkpoint could not be saved (no space for it, a failed write); the run stops."""


@dataclasses.dataclass
class _Saves:
    """What `save` remembers of a manager: the step being written, the retries left."""

    retries: int
    retries_left: int
    pending: int | None = None


_SAVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_checkpoint_manager(
    workdir: str | os.PathLike, *, keep: int, create: bool = True, retries: int = 0
) -> ocp.CheckpointManager:
    """A manager of `workdir/checkpoints` keeping the last `keep` checkpoints.

    `create=False` (sampling, evaluation) leaves a workdir without checkpoints untouched;
    `retries`: how many failed saves in a row are saved again before the run stops."""
    if keep < 1:
        raise ValueError(f"training.keep_checkpoints={keep} must be >= 1")
    if retries < 0:
        raise ValueError(f"training.checkpoint_retries={retries} must be >= 0")
    orbax_workarounds.install()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=create
    )
    directory = storage.absolute(workdir) / CHECKPOINT_DIR
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    _SAVES[manager] = _Saves(retries=retries, retries_left=retries)
    return manager


def _saves(manager: ocp.CheckpointManager) -> _Saves:
    return _SAVES.setdefault(manager, _Saves(retries=0, retries_left=0))


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    """One bool per array: all its values finite (one compiled program per state layout)."""
    return jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(leaf)) for leaf in leaves])


def _check_floats_finite(tree) -> None:
    named = [
        (tree_shapes.leaf_name(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
    ]
    gathered = multihost_utils.process_allgather(
        _finite_flags([leaf for _, leaf in named]), tiled=True
    )  # [L] of global arrays; [processes x L] of each process's own (pmap's)
    flags = np.asarray(gathered).reshape(-1, len(named)).all(axis=0)
    bad = [name for (name, _), finite in zip(named, flags, strict=True) if not finite]
    if bad:
        raise FloatingPointError(
            f"refusing to save a checkpoint: non-finite values in {', '.join(bad[:5])}"
        )


def describe_error(error: BaseException, *, limit: int = 500) -> str:
    """The type and first line of an error's innermost cause (TensorStore's name the file and
    end with the OS error, kept when a long one is shortened; orbax's wrappers add a page of
    TensorStore spec)."""
    while True:
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            break
        error = cause
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [source locations=")[0] if lines else ""
    text = text if len(text) <= limit else f"{text[: limit // 3]} ... {text[-2 * limit // 3 :]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# Orbax's metadata per array (_METADATA, _sharding, array_metadatas: about 750 bytes each).
METADATA_BYTES_PER_ARRAY = 1024


def checkpoint_bytes(tree) -> int:
    """The size of a pytree's checkpoint, uncompressed: its arrays' bytes (arrays or abstract
    arrays) and orbax's metadata of each (the digits U-Net's state: 2.83 MB + 0.53 MB; its
    checkpoint once trained a few steps: 3.3 MB)."""
    leaves = jax.tree.leaves(tree)
    data = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
    return data + METADATA_BYTES_PER_ARRAY * len(leaves)


def _free_bytes(directory: os.PathLike) -> int | None:
    """Free bytes of the file system of `directory` (process 0's figure, for all processes);
    None where the file system does not say (it reports a total size of 0, or it is an object
    store, which has no such figure)."""
    if storage.is_remote(directory):
        return None
    free = -1
    if jax.process_index() == 0:
        existing = storage.as_path(directory)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        free = usage.free if usage.total > 0 else -1
    if jax.process_count() > 1:
        free = int(multihost_utils.broadcast_one_to_all(np.int64(free)))
    return None if free < 0 else free


def _last_good(manager: ocp.CheckpointManager) -> str:
    steps = checkpoint_steps(manager.directory.parent)  # committed ones, as a restart sees them
    if not steps:
        return "there is no checkpoint to resume from yet"
    return f"the last good checkpoint, step {steps[-1]}, is intact: the run resumes from it"


def check_free_space(manager: ocp.CheckpointManager, needed: int, *, step: int | None = None):
    """CheckpointSaveError, naming the directory and both figures, if fewer than `needed` bytes
    are free where the checkpoints go (old checkpoints are deleted only after a new one is
    written, so a new one needs its full size)."""
    free = _free_bytes(manager.directory)
    if free is None or free >= needed:
        return
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    raise CheckpointSaveError(
        f"Not enough free space for {what} in {manager.directory}: {free:,} bytes free, about "
        f"{needed:,} needed (the train state uncompressed). Free some space or use a --workdir "
        f"on a larger disk; {_last_good(manager)}."
    )


def _save_error(manager: ocp.CheckpointManager, step: int, error: BaseException):
    saves = _saves(manager)
    return CheckpointSaveError(
        f"Saving the checkpoint of step {step} to {manager.directory} failed: "
        f"{describe_error(error)}. The run stops rather than train on without a checkpoint "
        f"(training.checkpoint_retries={saves.retries}); {_last_good(manager)}."
    )


def _take_failure(manager: ocp.CheckpointManager, *, block: bool):
    """(step, error) of the save in flight once it has failed; None while it is being
    written (with `block`, it waits for it) or if it succeeded."""
    saves = _saves(manager)
    if saves.pending is None or (not block and manager.is_saving_in_progress()):
        return None
    step, saves.pending = saves.pending, None
    try:
        manager.wait_until_finished()  # a failed save raises here (orbax drops its step)
    except Exception as error:  # noqa: BLE001  (any failure of the write: reported below)
        return step, error
    saves.retries_left = saves.retries
    return None


def _retry_or_raise(manager: ocp.CheckpointManager, failure, retry: Callable | None, *args):
    step, error = failure
    saves = _saves(manager)
    if saves.retries_left == 0 or retry is None:
        raise _save_error(manager, step, error) from None  # the cause is in the message
    saves.retries_left -= 1
    logging.warning(
        "Saving the checkpoint of step %d to %s failed (%s); saving again (retry %d of "
        "training.checkpoint_retries=%d).",
        step,
        manager.directory,
        describe_error(error),
        saves.retries - saves.retries_left,
        saves.retries,
    )
    retry(*args)


def raise_if_save_failed(manager: ocp.CheckpointManager, retry: Callable | None = None, *args):
    """After each step: CheckpointSaveError if the background save has failed (with retries
    left, a warning and `retry(*args)`, which saves the current state). Waits for nothing."""
    failure = _take_failure(manager, block=False)
    if failure is not None:
        _retry_or_raise(manager, failure, retry, *args)


def wait_for_save(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight; CheckpointSaveError if it failed (the run is ending)."""
    failure = _take_failure(manager, block=True)
    if failure is not None:
        _retry_or_raise(manager, failure, None)


def save(
    manager: ocp.CheckpointManager, state, data_state: dict, *, step: int, force: bool = False
) -> bool:
    """Start an asynchronous save of (state, data iterator state); never a non-finite state.

    CheckpointSaveError if the previous save failed (this save is its retry, where retries
    are left), or if the free space is short of the state's bytes."""
    _check_floats_finite({"params": state.params, "ema_params": state.ema_params})
    failure = _take_failure(manager, block=True)  # orbax's save would wait for it too
    if failure is not None:
        _retry_or_raise(manager, failure, lambda: None)  # the retry: this save
    check_free_space(manager, checkpoint_bytes(state), step=step)
    try:
        started = manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )
    except (OSError, ValueError) as error:  # the blocking part of the write
        raise _save_error(manager, step, error) from None
    if started:
        _saves(manager).pending = step
    return started


def _check_same_model(manager: ocp.CheckpointManager, step: int, target) -> None:
    metadata = manager.item_metadata(step)["state"]
    saved = tree_shapes.leaf_shapes(metadata.tree if hasattr(metadata, "tree") else metadata)
    mismatch = tree_shapes.describe_mismatch(saved, tree_shapes.leaf_shapes(target))
    if mismatch:
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} belongs to a different model "
            f"or training setup ({mismatch}). Use another --workdir, or restore the config "
            "that wrote it."
        )


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
    if jax.process_index() == 0:
        corrupted = manager.directory.parent / CORRUPTED_DIR
        corrupted.mkdir(exist_ok=True)
        destination = corrupted / str(step)
        if destination.exists():
            destination.rmtree()
        (manager.directory / str(step)).rename(destination)  # objects: copied, then deleted
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    manager.reload()


def _restore_step(manager: ocp.CheckpointManager, step: int, target) -> tuple[object, dict]:
    _check_same_model(manager, step, target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["data"]


def restore_latest(manager: ocp.CheckpointManager, target) -> tuple[object, dict] | None:
    """(state, data iterator state) of the newest readable checkpoint, or None if there is none.

    `target` is the abstract state (`jax.ShapeDtypeStruct`s with the shardings to restore
    onto). Raises RuntimeError, moving nothing, if no checkpoint can be read.
    """
    failures = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = _restore_step(manager, step, target)
        except Exception as error:  # noqa: BLE001  (judged below, against the older ones)
            if isinstance(error, ValueError) and "belongs to a different model" in str(error):
                raise
            logging.info(
                "Checkpoint %d in %s cannot be read: %s",
                step,
                manager.directory,
                describe_error(error),
            )
            failures[step] = error
            continue
        for unreadable, error in failures.items():
            _set_aside_unreadable(manager, unreadable, error, restored=step)
        return restored
    if failures:
        listed = "; ".join(f"step {s}: {describe_error(e)}" for s, e in failures.items())
        raise RuntimeError(
            f"No checkpoint in {manager.directory} could be restored ({listed}). Nothing was "
            f"moved: if they are damaged, move them away to start afresh."
        )
    return None


def _set_aside_unreadable(
    manager: ocp.CheckpointManager, step: int, error: Exception, *, restored: int
) -> None:
    logging.warning(
        "Checkpoint %d in %s could not be read (%s); restored step %d instead, moved %d to %s.",
        step,
        manager.directory,
        describe_error(error),
        restored,
        step,
        manager.directory.parent / CORRUPTED_DIR,
    )
    _set_aside(manager, step)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the committed checkpoints in a workdir (for tests and tools): in an object
    store, only the steps with Orbax's commit marker (see the module docstring)."""
    directory = storage.as_path(workdir) / CHECKPOINT_DIR
    if not directory.exists():
        return []
    return sorted(
        int(path.name)
        for path in directory.iterdir()
        if path.name.isdigit() and _is_committed(path)
    )


def _is_committed(step_directory) -> bool:
    """A step's folder is final: renamed from its temporary name (so any folder named by a
    number), except on GCS, where Orbax writes in place and commits with a marker."""
    if not os.fspath(step_directory).startswith("gs://"):
        return True
    return (step_directory / COMMIT_MARKER).exists()
