"""End-to-end runs with the workdir in a bucket of the GCS emulator (tests/gcs_emulator.py):
a training run killed with SIGKILL resumes from its checkpoint there to the parameters and
losses of an uninterrupted run on the local disk; sampling and evaluation read it; a step
without Orbax's commit marker is never restored; a missing bucket is named before any
compute."""

import json
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from diffusion_jax.convert import diffusers_vae
from diffusion_jax.runs import autoencoder, autoencoder_eval, evaluate, restore, sample, train
from diffusion_jax.runtime import storage
from diffusion_jax.training import checkpointing
from tests.runs import main_test

NUM_STEPS = 20


def _command(workdir, *extra: str) -> list[str]:
    return main_test._command(workdir, f"--config.training.num_steps={NUM_STEPS}", *extra)


def _run(emulator, workdir, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, *extra),
        cwd=main_test.REPO_ROOT,
        env={**main_test._environment(), **emulator.environment()},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _killed_after_first_checkpoint(emulator, workdir, *, timeout: float = 300) -> None:
    process = subprocess.Popen(
        _command(workdir),
        cwd=main_test.REPO_ROOT,
        env={**main_test._environment(), **emulator.environment()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not checkpointing.checkpoint_steps(workdir):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _config():
    config = main_test._config()
    config.training.num_steps = NUM_STEPS
    config.eval.num_steps, config.eval.etas = (4,), (0.0,)
    config.eval.num_samples = 72  # fd_digits needs more samples than its 64 features
    config.eval.metrics, config.eval.likelihoods = ("frechet",), ()
    return config


def _losses(path) -> dict[int, float]:
    rows = [json.loads(line) for line in storage.as_path(path).read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _assert_same_state(state_a, state_b) -> None:
    for name in ("params", "ema_params", "opt_state"):
        leaves_a = jax.tree.leaves(getattr(state_a, name))
        leaves_b = jax.tree.leaves(getattr(state_b, name))
        for a, b in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_bitwise_samples_evaluates_and_skips_uncommitted_steps(
    gcs_emulator, tmp_path
):
    local = tmp_path / "local"
    completed = main_test._run(local, f"--config.training.num_steps={NUM_STEPS}")
    assert completed.returncode == 0, completed.stderr[-3000:]

    workdir = storage.as_path(gcs_emulator.new_bucket()) / "run"
    _killed_after_first_checkpoint(gcs_emulator, str(workdir))
    assert 0 < max(checkpointing.checkpoint_steps(workdir)) < NUM_STEPS  # killed part-way
    completed = _run(gcs_emulator, str(workdir))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"{workdir}/summary.json" in completed.stdout
    log = (workdir / "logs" / "train.log").read_text()
    restored = int(re.search(r"Restored the checkpoint of step (\d+)", log).group(1))
    assert (workdir / "samples.png").exists() and (workdir / "tensorboard").is_dir()
    assert not (workdir / "lock.json").exists()  # released at the end

    config = _config()
    _, state_local, step_local = restore.restore_for_inference(config, str(local))
    _, state_remote, step_remote = restore.restore_for_inference(config, str(workdir))
    assert step_local == step_remote == NUM_STEPS
    _assert_same_state(state_local, state_remote)
    # The losses are the uninterrupted run's, every step after the restored one logged once
    # (rows the killed run had not uploaded yet, at most one storage.SYNC_INTERVAL_S, are lost).
    remote, uninterrupted = _losses(workdir / "metrics.jsonl"), _losses(local / "metrics.jsonl")
    assert remote == {step: uninterrupted[step] for step in remote}
    assert {step for step in uninterrupted if step > restored} <= set(remote)

    # --mode=sample and --mode=eval (in process) read the bucket and write there.
    picture = sample.sample(config, str(workdir))
    assert picture == workdir / "samples" / f"sample_{NUM_STEPS}.png" and picture.exists()
    with storage.load_npz(workdir / "samples" / f"sample_{NUM_STEPS}.npz") as saved:
        assert saved["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(saved["samples"]))
    report = evaluate.evaluate(config, str(workdir))
    written = workdir / "eval" / f"step_{NUM_STEPS}_ema_0.999.json"
    assert json.loads(written.read_text())["samples"][0]["fd_digits"] > 0
    assert report["checkpoint"] == f"{workdir}/checkpoints/{NUM_STEPS}"

    # A step whose save was cut short has no commit marker (Orbax writes it last on GCS):
    # it is not listed, and the previous step is restored.
    (workdir / "checkpoints" / str(NUM_STEPS) / checkpointing.COMMIT_MARKER).unlink()
    steps = checkpointing.checkpoint_steps(workdir)
    assert NUM_STEPS not in steps and steps
    _, _, step = restore.restore_for_inference(config, str(workdir))
    assert step == steps[-1] < NUM_STEPS


def test_a_missing_bucket_is_named_before_any_compute(gcs_emulator):
    completed = _run(gcs_emulator, "gs://no-such-bucket/run", "--config.training.num_steps=1")
    assert completed.returncode == 1
    assert (
        "error: --workdir=gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist"
        in completed.stderr
    )
    assert "Traceback" not in completed.stderr
    assert "Restored" not in completed.stderr and "training" not in completed.stdout


@pytest.mark.slow
def test_an_autoencoder_run_and_a_latent_run_in_a_bucket(gcs_emulator):
    """The autoencoder run writes its checkpoints, grids, summary and export to gs://; the
    latent run reads that export as `latent.autoencoder` and samples decoded images there."""
    from tests.runs import autoencoder_test

    bucket = storage.as_path(gcs_emulator.new_bucket())
    trained = autoencoder.train(autoencoder_test._ae_config(3), str(bucket / "ae"))
    assert (bucket / "ae" / "samples.png").exists() and (bucket / "ae" / "summary.json").exists()
    export = bucket / "ae" / autoencoder.EXPORT_DIR
    _, params = diffusers_vae.load_autoencoder(export)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params["autoencoder"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert autoencoder_eval.reconstruct(autoencoder_test._ae_config(3), str(bucket / "ae")).exists()

    config = autoencoder_test._ldm_config(str(export), 2)
    train.train_and_evaluate(config, str(bucket / "ldm"))
    picture = sample.sample(config, str(bucket / "ldm"))
    with storage.load_npz(picture.with_suffix(".npz")) as saved:
        assert saved["samples"].shape == (8, 32, 32, 1)
