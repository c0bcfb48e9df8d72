"""End-to-end tests of the command line: a killed run resumes bitwise, SIGTERM saves and
exits cleanly, sample mode writes samples, bad options are named."""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from configs import digits
from diffusion_jax.runs import restore, sample
from diffusion_jax.runtime import compilation
from diffusion_jax.training import checkpointing
from tests.label_recorder import LabelRecorder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 30
OVERRIDES = {
    "training.num_steps": NUM_STEPS,
    "training.checkpoint_every": 10,
    "training.log_every": 10,
    "sampling.num_steps": 5,
    "sampling.num_images": 4,
}


def _command(workdir, *extra: str) -> list[str]:
    overrides = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    return [
        sys.executable, "-m", "diffusion_jax.main", "--config=configs/digits.py:tiny",
        f"--workdir={workdir}", *overrides, *extra,
    ]  # fmt: skip


def _environment() -> dict:
    # One CPU device per process keeps these runs fast on a small machine; the runs of a test
    # compile the same programs, so they share a compilation cache.
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_COMPILATION_CACHE_DIR": str(
            pathlib.Path(tempfile.gettempdir()) / "dj_main_test_cache"
        ),
    }


def _run(workdir, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, *extra),
        cwd=REPO_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(workdir, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(workdir, *extra),
        cwd=REPO_ROOT,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_checkpoint(process: subprocess.Popen, workdir, *, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not checkpointing.checkpoint_steps(workdir):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)


def _config():
    config = digits.get_config("tiny")
    with config.unlocked():
        for key, value in OVERRIDES.items():
            section, name = key.split(".")
            config[section][name] = value
    return config


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_bitwise_identical_parameters(tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    completed = _run(uninterrupted)
    assert completed.returncode == 0, completed.stderr[-3000:]

    process = _start(resumed)
    _wait_for_checkpoint(process, resumed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < max(checkpointing.checkpoint_steps(resumed)) < NUM_STEPS  # killed part-way
    completed = _run(resumed)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Restored the checkpoint of step" in (resumed / "logs" / "train.log").read_text()

    config = _config()
    _, state_a, step_a = restore.restore_for_inference(config, str(uninterrupted))
    _, state_b, step_b = restore.restore_for_inference(config, str(resumed))
    assert step_a == step_b == NUM_STEPS
    for name in ("params", "ema_params", "opt_state"):
        for a, b in zip(
            _leaves(getattr(state_a, name)), _leaves(getattr(state_b, name)), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert (uninterrupted / "samples.png").exists() and (resumed / "samples.png").exists()

    # --mode=sample (in process): samples of the EMA parameters, as .npz and PNG.
    path = sample.sample(config, str(uninterrupted))
    saved = np.load(uninterrupted / "samples" / f"sample_{NUM_STEPS}.npz")["samples"]
    assert path.exists() and saved.shape == (4, 8, 8, 1) and np.all(np.isfinite(saved))


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process = _start(tmp_path, "--config.training.num_steps=100000")
    _wait_for_checkpoint(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    steps = checkpointing.checkpoint_steps(tmp_path)
    assert 10 <= steps[-1] < 100000
    _, state, step = restore.restore_for_inference(_config(), str(tmp_path))  # readable
    assert step == steps[-1] == int(state.step)


@pytest.mark.slow
def test_resumed_run_loads_its_programs_from_the_cache_in_its_workdir(tmp_path):
    env = {**_environment(), "JAX_LOG_COMPILES": "1"}  # logs persistent cache hits
    del env["JAX_COMPILATION_CACHE_DIR"]  # which would win over the workdir's
    for num_steps in (10, 20):
        completed = subprocess.run(
            _command(tmp_path, f"--config.training.num_steps={num_steps}"),
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert list((tmp_path / "compilation_cache").glob("jit_train_step-*"))
    log = (tmp_path / "logs" / "train.log").read_text()  # the console shows none of it
    assert "Restored the checkpoint of step 10" in log
    assert "Persistent compilation cache hit for 'jit_train_step'" in log


def test_unknown_config_key_is_named():
    completed = _run("/tmp/unused", "--config.training.bogus_option=3", timeout=120)
    assert completed.returncode != 0
    assert "bogus_option" in completed.stderr


def test_missing_checkpoint_in_sample_mode_says_to_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first with --mode=train"):
        sample.sample(_config(), str(tmp_path))


def _conditional_config(**sampling):
    config = _config()
    config.data.use_labels, config.model.num_classes = True, 10
    config.sampling.update(sampling)
    return config


def test_sample_mode_cycles_labels_over_batches_and_saves_them(tmp_path, monkeypatch):
    """3 batches of 4 with 10 classes: image n has label n % 10 (0..9, 0, 1), from one
    compiled program, and the .npz holds the labels beside the samples."""
    config = _conditional_config(num_images=12, batch_size=4)
    recorder = LabelRecorder(batch_size=4)
    monkeypatch.setattr(restore, "restore_for_inference", lambda config, workdir: (recorder, {}, 7))
    monkeypatch.setattr(restore, "inference_params", lambda state, config: {})
    made = []

    class Recording(compilation.CompiledTogether):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(compilation, "CompiledTogether", Recording)
    sample.sample(config, str(tmp_path))
    jax.effects_barrier()
    assert len(made) == 1 and len(made[0].compiled) == 1  # one program for every batch
    seen = {tuple(int(label) for label in labels) for labels in recorder.seen}
    assert seen == {(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 0, 1)}
    with np.load(tmp_path / "samples" / "sample_7.npz") as saved:
        assert saved["samples"].shape == (12, 8, 8, 1)
        np.testing.assert_array_equal(saved["labels"], np.arange(12) % 10)


@pytest.mark.parametrize(
    ("num_classes", "key", "value", "message"),
    [
        (10, "label", 10, r"sampling.label=10; allowed: -1 \(cycle through the classes\) or 0..9"),
        (10, "label", -5, r"sampling.label=-5; allowed: -1"),
        (0, "label", 3, r"sampling.label=3 but model.num_classes=0"),
        (10, "num_images", 0, r"sampling.num_images=0 must be >= 1"),
        (10, "batch_size", 0, r"sampling.batch_size=0 must be >= 1"),
        (0, "guidance_scale", 2.0, r"sampling.guidance_scale=2.0.*model.num_classes=0"),
    ],
)
def test_bad_sampling_options_are_named_before_sample_mode_restores(
    tmp_path, num_classes, key, value, message
):
    config = _conditional_config() if num_classes else _config()
    config.sampling[key] = value  # tmp_path has no checkpoint: restoring would fail
    with pytest.raises(ValueError, match=message):
        sample.sample(config, str(tmp_path))
