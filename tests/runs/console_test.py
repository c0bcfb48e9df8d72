"""What a person sees when running `diffusion_jax.main`: only our progress and the closing
summary on the console, one line per error, and Ctrl-C and a diverged run handled."""

import json
import re
import signal
import subprocess
import time

import pytest

from diffusion_jax.training import checkpointing
from tests.runs.main_test import REPO_ROOT, _command, _environment, _run

PROGRESS_OR_SUMMARY = (
    "training ",  # progress: "training 10/30 [###---] loss 0.97 | 52 img/s | ETA 0:00:08"
    "sampling ",
    "  ",  # the summary's rows
)


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_the_console_shows_only_progress_and_the_summary(tmp_path):
    completed = _run(tmp_path, "--config.training.num_steps=20")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == ""  # no "Unable to initialize backend 'tpu'", no Orbax INFO
    lines = completed.stdout.splitlines()
    assert [line for line in lines if line.startswith("training 10/20")]
    assert lines[-6].startswith("training finished: steps 0 -> 20 of 20 in ")
    assert all(line.startswith(PROGRESS_OR_SUMMARY) for line in lines), lines
    assert f"checkpoint  {tmp_path / 'checkpoints' / '20'}" in completed.stdout
    assert f"samples     {tmp_path / 'samples.png'}" in completed.stdout
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"]["end"] == 20
    assert summary["loss"]["final"] > 0 and summary["skipped_updates"] == 0
    log = (tmp_path / "logs" / "train.log").read_text()  # what the console left out
    assert "Config:" in log and "orbax" in log.lower()


def test_bad_input_is_one_line_naming_the_key_without_a_traceback(tmp_path):
    completed = _run(tmp_path, "--config.training.batch_size=0", timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: training.batch_size=0 must be >= 1")
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "Traceback" in log and "training.batch_size=0" in log


def _wait_for_text(path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.1)


def _start_logged(workdir, stderr_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(workdir, "--config.training.num_steps=100000", "--config.training.log_every=1",
                 *extra),
        cwd=REPO_ROOT, env=_environment(), stdout=subprocess.PIPE, stderr=stderr_path.open("w"),
        text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_at_the_next_step_and_exits_cleanly(tmp_path):
    """SIGINT does what SIGTERM does: the step in progress ends, a checkpoint of it is saved,
    one line says so, exit 0; it was a KeyboardInterrupt traceback and no checkpoint."""
    stderr = tmp_path / "stderr.txt"
    process = _start_logged(tmp_path / "run", stderr)
    process.stdout.readline()  # the first progress line: training has started
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.read_text()[-3000:]
    errors = stderr.read_text()
    assert "Traceback" not in errors and errors.count("warning: Ctrl-C: saving") == 1
    stopped = int(errors.split("Stopped at step ")[1].split(" ")[0])
    assert checkpointing.checkpoint_steps(tmp_path / "run") == [stopped]
    assert "training stopped for Ctrl-C (SIGINT)" in output


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    stderr = tmp_path / "stderr.txt"
    process = _start_logged(tmp_path / "run", stderr, "--config.training.checkpoint_every=5")
    process.stdout.readline()
    process.send_signal(signal.SIGINT)
    _wait_for_text(stderr, "warning: Ctrl-C: saving", process)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    errors = stderr.read_text()
    assert process.returncode == 130, errors[-3000:]
    assert "Traceback" not in errors and "error: stopped at once by a second Ctrl-C" in errors


@pytest.mark.slow
def test_a_diverged_run_stops_naming_the_step_and_the_last_finite_loss(tmp_path):
    """Learning rate 1e6: every update after the first few is non-finite. It was 297 of 300
    skipped, exit 0, wrecked checkpoints and NaN samples; now it stops after
    training.max_consecutive_skips in a row, keeps no checkpoint of the diverging run, writes
    no samples, and metrics.jsonl stays strict JSON."""
    completed = _run(
        tmp_path,
        "--config.optim.learning_rate=1e6",
        "--config.training.num_steps=300",
        "--config.training.checkpoint_every=2",
        "--config.training.log_every=5",
        "--config.training.max_consecutive_skips=10",
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    error = completed.stderr
    assert error.startswith("error: Training diverged: the last 10 updates, up to step ")
    assert "Traceback" not in error and error.count("\n") == 1
    last_finite = int(re.search(r"last finite loss was \S+ at step (\d+)\.", error).group(1))
    assert all(step <= last_finite for step in checkpointing.checkpoint_steps(tmp_path))
    assert not (tmp_path / "samples.png").exists()
    rows = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(row["loss"] is None for row in rows)  # a window of skipped updates only
    assert sum(row["skipped_updates"] for row in rows) >= 10
