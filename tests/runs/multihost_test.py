"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) train one model
together through the command line, then evaluate it together: they agree with each other
and with one process."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from diffusion_jax.training import checkpointing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSS_IN_LINE = re.compile(r"^training (\d+)/\d+ .* loss ([-+0-9.eE]+|nan)", re.MULTILINE)
OVERRIDES = [
    "--config.training.num_steps=6",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every=6",
    "--config.sampling.num_steps=2",
    "--config.sampling.num_images=4",
]
EVAL_OVERRIDES = [
    "--mode=eval",
    "--config.eval.num_samples=96",  # > the 64 features of the digits classifier
    "--config.eval.num_steps=(4,)",
    "--config.eval.batch_size=8",
    '--config.eval.likelihoods=("vlb",)',
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(workdir, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "diffusion_jax.main", "--config=configs/digits.py:tiny",
        f"--workdir={workdir}", *OVERRIDES, *extra,
    ]  # fmt: skip


def _environment(num_devices: int) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
        "JAX_COMPILATION_CACHE_DIR": str(
            pathlib.Path(tempfile.gettempdir()) / "dj_multihost_cache"
        ),
    }


def _losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS_IN_LINE.findall(output)}


def _run_two_processes(workdir, *extra: str) -> list[str]:
    """Run the main job as processes 0 and 1 of one cluster (two CPU devices each); stdouts."""
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            _command(
                workdir,
                f"--config.parallel.coordinator_address={address}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={process_id}",
                *extra,
            ),
            cwd=REPO_ROOT,
            env=_environment(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in (0, 1)
    ]
    outputs = [process.communicate(timeout=480) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def _run_one_process(workdir, *extra: str) -> None:
    single = subprocess.run(
        _command(workdir, *extra), cwd=REPO_ROOT, env=_environment(1),
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]


def _eval_report(workdir) -> dict:
    (path,) = (pathlib.Path(workdir) / "eval").glob("step_6_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_processes_train_and_evaluate_together_and_match_one_process(tmp_path):
    losses_0, losses_1 = (_losses(stdout) for stdout in _run_two_processes(tmp_path / "two"))
    assert sorted(losses_0) == [2, 4, 6] and losses_0 == losses_1

    _run_one_process(tmp_path / "one")
    records = {
        step: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
        for step, name in ((0, "two"), (1, "one"))
    }
    # Four devices in two processes train on the same global batches as one device: the
    # first steps agree to float32 rounding. Gradients summed over 4 devices differ from one
    # device's by ~4e-6 relative (reduction order), and Adam's first updates, divided by a
    # tiny second moment, amplify that about 10x every 2 steps (measured: 0, 1.9e-5, 2.4e-4
    # at steps 2, 4, 6); another global batch would already change the first loss.
    np.testing.assert_allclose(records[0][0], records[1][0], rtol=1e-5)
    np.testing.assert_allclose(records[0], records[1], rtol=2e-3)
    assert (tmp_path / "two" / "checkpoints" / "6").is_dir()

    # --mode=eval of the two-process checkpoint: sampled over the four devices of both
    # processes, features gathered across them; one process on one device must agree.
    shutil.copytree(tmp_path / "two", tmp_path / "two_eval_by_one")
    _run_two_processes(tmp_path / "two", *EVAL_OVERRIDES)
    _run_one_process(tmp_path / "two_eval_by_one", *EVAL_OVERRIDES)
    together, alone = _eval_report(tmp_path / "two"), _eval_report(tmp_path / "two_eval_by_one")
    numbers_together, numbers_alone = _numbers(together["samples"]), _numbers(alone["samples"])
    assert {"fd_digits", "kid_digits_classifier/mean", "recall"} <= set(numbers_together)
    assert numbers_together == pytest.approx(numbers_alone, rel=1e-3, abs=1e-6)
    vlb_together, vlb_alone = (r["likelihood"]["vlb"] for r in (together, alone))
    assert vlb_together["num_examples"] == vlb_alone["num_examples"]
    # The same examples, but a global batch interleaves the processes' rows, so each example
    # meets other noise in the bound's Monte Carlo terms: equal to within that noise.
    assert vlb_together["bits_per_dim"] == pytest.approx(
        vlb_alone["bits_per_dim"], abs=vlb_alone["standard_error"]
    )


def _numbers(samples: list[dict]) -> dict[str, float]:
    """The numeric leaves of the (single) sampler setting's metrics, by slash-joined key."""
    (setting,) = samples
    flat = {}
    for key, value in setting.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{inner}": v for inner, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def _wait_for_a_checkpoint(processes, workdir, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not checkpointing.checkpoint_steps(workdir):
        running = all(process.poll() is None for process in processes)
        assert running and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_stops_both_processes_at_one_step_with_a_checkpoint(tmp_path):
    """Preemption of a multi-host run: SIGTERM to every process, as a pod's scheduler sends
    it, reaches JAX's preemption sync point; both save the checkpoint of one common step and
    exit 0 (a Python SIGTERM handler in each process would hide the signal from JAX)."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [open(tmp_path / f"process_{i}.log", "w") for i in (0, 1)]  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffusion_jax.main",
                "--config=configs/toy2d.py:tiny",
                f"--workdir={tmp_path / 'run'}",
                "--config.training.num_steps=1000000",
                "--config.training.checkpoint_every=100",
                "--config.training.log_every=100",
                f"--config.parallel.coordinator_address={address}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={i}",
            ],
            cwd=REPO_ROOT,
            env=_environment(1),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in (0, 1)
    ]
    try:
        _wait_for_a_checkpoint(processes, tmp_path / "run")
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"process_{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], outputs[0][-3000:]
    stopped = [re.findall(r"Stopped at step (\d+) for preemption", text) for text in outputs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, outputs[0][-3000:]
    assert checkpointing.checkpoint_steps(tmp_path / "run")[-1] == int(stopped[0][0])
