"""Tests of diffusion_jax.training.checkpointing: round trips with the data iterator's position, a
corrupted latest checkpoint, a checkpoint of another model, another number of devices,
non-finite states and SIGTERM."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.runtime import parallel, tree_shapes
from diffusion_jax.training import checkpointing, preemption, train_state


def _state(width: int = 16, value: float = 1.0):
    params = {"dense": {"kernel": jnp.full((8, width), value), "bias": jnp.zeros((width,))}}
    return train_state.create_train_state(params, optax.adam(1e-3), num_ema=2)


def _target(strategy, state):
    return strategy.restore_target(jax.eval_shape(lambda: state))


def _strategy(num_devices: int = 8, kind: str = "fsdp"):
    return parallel.MeshStrategy(
        mesh=parallel.make_mesh(jax.devices()[:num_devices]), strategy=kind, fsdp_min_size=0
    )


def _save(manager, state, step, data_state=None):
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    checkpointing.save(manager, state, data_state or {"next_batch_index": step}, step=step)
    manager.wait_until_finished()
    return state


def test_round_trip_restores_state_and_iterator_position_onto_fewer_devices(tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=2)
    eight = _strategy(8)
    state = eight.init_state(lambda _: _state(value=0.5), jax.random.key(0))
    assert len(state.params["dense"]["kernel"].sharding.device_set) == 8
    _save(manager, state, 7, {"next_batch_index": 7, "seed": 3})
    manager.close()

    two = _strategy(2)
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=2)
    restored, data_state = checkpointing.restore_latest(manager, _target(two, _state()))
    assert data_state == {"next_batch_index": 7, "seed": 3}
    assert int(restored.step) == 7
    assert restored.params["dense"]["kernel"].sharding.device_set == set(jax.devices()[:2])
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((8, 16), 0.5))
    np.testing.assert_array_equal(restored.ema_params[1]["dense"]["kernel"], np.full((8, 16), 0.5))


def test_keeps_only_the_last_k(tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(manager, _state(), step)
    assert checkpointing.checkpoint_steps(tmp_path) == [2, 3]


def test_corrupted_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=3)
    _save(manager, _state(value=1.0), 1)
    _save(manager, _state(value=2.0), 2)
    manager.close()
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=3)
    with caplog.at_level("WARNING"):
        target = _target(_strategy(1), _state())
        restored, data_state = checkpointing.restore_latest(manager, target)
    assert int(restored.step) == 1 and data_state["next_batch_index"] == 1
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((8, 16), 1.0))
    assert "Checkpoint 2" in caplog.text and "could not be read" in caplog.text
    assert (tmp_path / "corrupted_checkpoints" / "2").is_dir()  # set aside, not deleted
    assert checkpointing.checkpoint_steps(tmp_path) == [1]
    _save(manager, _state(value=3.0), 2)  # the run can write step 2 again
    assert checkpointing.checkpoint_steps(tmp_path) == [1, 2]


def test_a_failure_on_every_checkpoint_moves_none_and_names_each(tmp_path, monkeypatch):
    """Device memory or storage failing on every read is not the checkpoints' fault: the
    run stops with every error instead of setting them all aside and starting at step 0."""
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=3)
    _save(manager, _state(), 1)
    _save(manager, _state(), 2)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 24 GiB")

    monkeypatch.setattr(manager, "restore", out_of_memory)
    expected = r"No checkpoint .*\(step 2: RuntimeError: RESOURCE_EXHAUSTED.*step 1: .*Nothing"
    with pytest.raises(RuntimeError, match=expected):
        checkpointing.restore_latest(manager, _target(_strategy(1), _state()))
    assert checkpointing.checkpoint_steps(tmp_path) == [1, 2]
    assert not (tmp_path / "corrupted_checkpoints").exists()


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=3)
    _save(manager, _state(width=16), 5)
    expected = r"different model.*params\.dense\.kernel: saved \(8, 16\)"
    with pytest.raises(ValueError, match=expected):
        checkpointing.restore_latest(manager, _target(_strategy(1), _state(width=32)))
    assert checkpointing.checkpoint_steps(tmp_path) == [5]


def test_no_checkpoint_restores_nothing(tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=1)
    assert checkpointing.restore_latest(manager, _target(_strategy(1), _state())) is None


def test_non_finite_state_is_never_saved(tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=1)
    with pytest.raises(FloatingPointError, match=r"non-finite values in .*\bparams\.dense\.kernel"):
        _save(manager, _state(value=float("nan")), 1)
    assert checkpointing.checkpoint_steps(tmp_path) == []


def test_sigterm_is_left_to_jax_when_several_processes_run(monkeypatch):
    """jax.distributed's preemption service watches SIGTERM on a multi-host run: a Python
    handler would replace its handler, and no process would ever reach the sync point."""
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    flag = preemption.StopFlag()
    assert signal.getsignal(signal.SIGTERM) is before
    flag.close()


def test_sigterm_sets_the_flag_instead_of_killing():
    flag = preemption.StopFlag()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
    finally:
        flag.close()
    assert signal.getsignal(signal.SIGTERM) is not flag._handle


def test_leaf_shapes_names_paths():
    shapes = tree_shapes.leaf_shapes(_state())
    assert shapes["params.dense.kernel"] == (8, 16)
    assert shapes["ema_params.1.dense.bias"] == (16,)


def test_a_checkpoint_that_cannot_fit_is_refused_naming_the_path_and_both_sizes(
    tmp_path, monkeypatch
):
    manager = checkpointing.make_checkpoint_manager(tmp_path, keep=2)
    state = _state()  # 6 arrays of 8x16 + 16 floats (params, 2 EMAs, Adam's mu and nu)
    needed = checkpointing.checkpoint_bytes(state)
    arrays = jax.tree.leaves(state)
    assert needed == sum(x.nbytes for x in arrays) + 1024 * len(arrays)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    expected = (
        rf"Not enough free space for the checkpoint of step 3 in {tmp_path}/checkpoints: "
        rf"{needed - 1:,} bytes free, about {needed:,} needed .* no checkpoint to resume"
    )
    with pytest.raises(checkpointing.CheckpointSaveError, match=expected):
        _save(manager, state, 3)
    assert checkpointing.checkpoint_steps(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(total=0, free=0))
    _save(manager, state, 3)  # a file system that does not say: not checked
    assert checkpointing.checkpoint_steps(tmp_path) == [3]


class _FailingSaves:
    """The few manager methods the save bookkeeping uses; its saves fail `failures` times."""

    def __init__(self, directory, failures: int):
        self.directory, self.failures, self.saved = directory / "checkpoints", failures, []

    def is_saving_in_progress(self) -> bool:
        return False

    def wait_until_finished(self) -> None:
        if self.failures:
            self.failures -= 1
            raise ValueError("OUT_OF_RANGE: Failed to write 1514936 bytes: File too large")

    def save(self, step, **kwargs) -> bool:
        self.saved.append(step)
        return True


@pytest.mark.parametrize("retries", [0, 2])
def test_a_failed_background_save_is_saved_again_up_to_retries_then_stops(
    tmp_path, caplog, retries
):
    manager = _FailingSaves(tmp_path, failures=3)  # more failures than retries
    checkpointing._SAVES[manager] = checkpointing._Saves(retries=retries, retries_left=retries)
    state = _state()

    def save_again(step):
        checkpointing.save(manager, state, {}, step=step)

    checkpointing.save(manager, state, {}, step=10)
    message = (
        rf"Saving the checkpoint of step {10 + retries} to {tmp_path}/checkpoints failed: "
        r"ValueError: OUT_OF_RANGE: .*File too large\. The run stops rather than train on "
        rf"without a checkpoint \(training.checkpoint_retries={retries}\)"
    )
    with (
        caplog.at_level("WARNING"),
        pytest.raises(checkpointing.CheckpointSaveError, match=message),
    ):
        for step in range(11, 20):  # after each step, as the loop checks
            checkpointing.raise_if_save_failed(manager, save_again, step)
    assert manager.saved == list(range(10, 11 + retries))  # each retry saved the next step
    warnings = [r.getMessage() for r in caplog.records if "saving again" in r.getMessage()]
    assert len(warnings) == retries and all("File too large" in w for w in warnings)
    checkpointing.wait_for_save(manager)  # reported once: nothing left to raise


def test_a_save_that_succeeds_resets_the_retries(tmp_path):
    manager = _FailingSaves(tmp_path, failures=1)
    checkpointing._SAVES[manager] = checkpointing._Saves(retries=1, retries_left=1)
    for step in (1, 2, 3):
        checkpointing.save(manager, _state(), {}, step=step)  # 1 fails, 2 retries it and succeeds
    manager.failures = 1
    checkpointing.save(manager, _state(), {}, step=4)  # 3 succeeded: a retry is left again
    assert manager.saved == [1, 2, 3, 4]
    manager.failures = 1
    with pytest.raises(checkpointing.CheckpointSaveError, match="step 4"):
        checkpointing.wait_for_save(manager)  # at the end of a run: no retry
