"""End-to-end tests of the faults of issue 30, each through the real entry point in a
subprocess: a checkpoint write that fails, a disk too small, two runs on one workdir, a
stale or forced lock, an unreadable checkpoint, sampling or evaluating an empty workdir.
Each asserts what the user sees (exit code, one message, tracebacks counted) and that no
work is lost (the previous checkpoint restores, metrics.jsonl holds each step once)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import tensorstore as ts

from diffusion_jax.runtime import workdir as workdir_lib
from diffusion_jax.training import checkpointing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = {
    "training.num_steps": 4,
    "training.checkpoint_every": 2,
    "training.log_every": 1,
    "sampling.num_steps": 2,
    "sampling.num_images": 4,
}
# Runs the entry point with writes beyond `limit` bytes per file failing (EFBIG: a real
# write failure, with no mount needed; Python ignores SIGXFSZ, so writes return the error).
FILE_SIZE_LIMITED = (
    "import os, resource, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'diffusion_jax.main', *sys.argv[1:]])"
)


def _command(workdir, *extra: str, prefix: tuple = ("-m", "diffusion_jax.main"), **settings):
    overrides = {**OVERRIDES, **{key.replace("__", "."): v for key, v in settings.items()}}
    return [
        sys.executable, *prefix, "--config=configs/digits.py:tiny", f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in overrides.items()), *extra,
    ]  # fmt: skip


def _environment(*, shared_cache: bool = True) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if shared_cache:  # the runs of these tests compile the same programs
        env["JAX_COMPILATION_CACHE_DIR"] = str(
            pathlib.Path(tempfile.gettempdir()) / "dj_main_test_cache"
        )
    return env


def _run(command: list[str], *, shared_cache: bool = True) -> subprocess.CompletedProcess:
    """The run's exit code, its console output (stdout and stderr together, in order) and,
    as `.log`, what it added to WORKDIR/logs/train.log (where INFO lines and tracebacks go)."""
    workdir = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--workdir="))
    log_file = pathlib.Path(workdir) / "logs" / "train.log"
    before = log_file.stat().st_size if log_file.exists() else 0
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=_environment(shared_cache=shared_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    completed.log = log_file.read_text()[before:] if log_file.exists() else ""
    return completed


def _tracebacks(output: str) -> int:
    return output.count("Traceback (most recent call last)")


def _lines_with(output: str, *texts: str) -> list[str]:
    return [line for line in output.splitlines() if all(text in line for text in texts)]


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- a failed save, a full disk


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_stops_the_run_with_one_message_and_it_resumes(tmp_path):
    """Orbax writes in the background; a write that fails (here EFBIG, beyond a file size
    limit) used to surface at the next save as hundreds of tracebacks."""
    first = _run(_command(tmp_path, training__checkpoint_every=4))
    assert first.returncode == 0, first.stdout[-3000:]
    assert checkpointing.checkpoint_steps(tmp_path) == [4]

    limited = ("-c", FILE_SIZE_LIMITED, "300000")  # checkpoint data files are larger
    failed = _run(
        _command(tmp_path, prefix=limited, training__checkpoint_every=4, training__num_steps=20)
    )
    output = failed.stdout
    assert failed.returncode != 0
    messages = _lines_with(output, "Saving the checkpoint of step 8 to", "failed")
    assert len(messages) == 1, output[-5000:]
    assert str(tmp_path / "checkpoints") in messages[0] and "File too large" in messages[0]
    assert _tracebacks(output) == 0 and _tracebacks(failed.log) <= 1, failed.log[-5000:]
    assert "Event loop is closed" not in output + failed.log
    assert checkpointing.checkpoint_steps(tmp_path) == [4]  # the failed one never committed
    assert max(_logged_steps(tmp_path)) <= 12  # stopped by the next save at the latest

    resumed = _run(_command(tmp_path, training__checkpoint_every=4, training__num_steps=12))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Restored the checkpoint of step 4" in resumed.log
    assert checkpointing.checkpoint_steps(tmp_path) == [4, 8, 12]
    assert _logged_steps(tmp_path) == list(range(1, 13))


@pytest.fixture
def small_disk(tmp_path):
    """(a tmpfs of 2 MiB, resize(size)); a skip where mounting needs privileges we lack (the
    test above covers a failed write everywhere)."""
    point = tmp_path / "disk"
    point.mkdir()

    def mount(size: str, *options: str) -> subprocess.CompletedProcess:
        flags = ",".join((*options, f"size={size}"))
        command = ["mount", "-t", "tmpfs", "-o", flags, "tmpfs", str(point)]
        return subprocess.run(command, capture_output=True, text=True)

    mounted = mount("2m")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield point, lambda size: mount(size, "remount").check_returncode()
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.slow
def test_a_disk_too_small_for_a_checkpoint_is_refused_before_writing_it(small_disk):
    """The tiny digits state needs about 3.36 MB a checkpoint (its first takes 1.3 MB)."""
    disk, resize = small_disk
    workdir = disk / "run"
    refused = _run(_command(workdir))  # 2 MiB: not even one checkpoint fits
    assert refused.returncode != 0
    messages = _lines_with(refused.stdout, "Not enough free space for a checkpoint in")
    assert len(messages) == 1 and str(workdir / "checkpoints") in messages[0], refused.stdout
    assert "bytes free, about 3," in messages[0] and _tracebacks(refused.stdout) <= 1
    assert _logged_steps(workdir) == []  # refused before the first step

    resize("4m")  # the checkpoint of step 2 fits, then too little is left for step 4
    stopped = _run(_command(workdir, training__num_steps=6))
    output = stopped.stdout
    assert stopped.returncode != 0
    messages = _lines_with(output, "Not enough free space for the checkpoint of step 4 in")
    assert len(messages) == 1, output[-5000:]
    assert "the last good checkpoint, step 2, is intact" in messages[0]
    assert _tracebacks(output) <= 1 and "Event loop is closed" not in output
    assert checkpointing.checkpoint_steps(workdir) == [2]
    assert max(_logged_steps(workdir)) == 4  # no step trained beyond the refused save

    resize("64m")
    resumed = _run(_command(workdir, training__num_steps=6))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Restored the checkpoint of step 2" in resumed.log
    assert checkpointing.checkpoint_steps(workdir) == [2, 4, 6]
    assert _logged_steps(workdir) == list(range(1, 7))


# ---------------------------------------------------------------- the workdir's lock


def _wait_for(path: pathlib.Path, process: subprocess.Popen, *, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "run A ended before taking the lock"
        assert time.monotonic() < deadline, f"no {path} within the time limit"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_on_a_workdir_is_refused_and_names_the_first(tmp_path):
    lock = tmp_path / workdir_lib.LOCK_FILE
    run_a = subprocess.Popen(
        _command(tmp_path, training__num_steps=100_000, training__checkpoint_every=10),
        cwd=REPO_ROOT,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lock, run_a)
        owner = json.loads(lock.read_text())
        assert owner["pid"] == run_a.pid and owner["host"] == socket.gethostname()
        run_b = _run(_command(tmp_path))
        assert run_b.returncode != 0
        (message,) = _lines_with(run_b.stdout, "is in use by another training run")
        assert f"pid {run_a.pid}" in message and socket.gethostname() in message
        assert owner["started"] in message and "--force" in message and "--workdir" in message
        assert run_a.poll() is None  # A was running all along
        while not checkpointing.checkpoint_steps(tmp_path):  # A trains on, alone
            assert run_a.poll() is None
            time.sleep(0.2)
    finally:
        run_a.send_signal(signal.SIGTERM)  # A saves and ends cleanly
        assert run_a.wait(timeout=300) == 0
    steps = _logged_steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 10  # each step once
    assert not lock.exists()  # released


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_force_takes_over_a_live_one(tmp_path):
    lock = tmp_path / workdir_lib.LOCK_FILE
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid runs no more
    dead = {"host": socket.gethostname(), "pid": ended.pid, "started": "2020-01-01T00:00:00"}
    lock.write_text(json.dumps(dead))
    stale = _run(_command(tmp_path, training__num_steps=2))
    assert stale.returncode == 0, stale.stdout[-3000:]
    (warning,) = _lines_with(stale.stdout, "Taking over the lock of", f"pid {ended.pid}")
    assert "stale" in warning and "2020-01-01T00:00:00" in warning
    assert not lock.exists()

    live = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2020-01-02T00:00:00"}
    lock.write_text(json.dumps(live))  # this test's own process: alive
    refused = _run(_command(tmp_path, training__num_steps=2))
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stdout
    forced = _run(_command(tmp_path, "--force", training__num_steps=4))
    assert forced.returncode == 0, forced.stdout[-3000:]
    (warning,) = _lines_with(forced.stdout, "Taking over the lock of", f"pid {os.getpid()}")
    assert "--force" in warning
    assert "Restored the checkpoint of step 2" in forced.log and not lock.exists()


# ---------------------------------------------------------------- an unreadable checkpoint


def _data_file_of_the_first_array(state: pathlib.Path) -> pathlib.Path:
    """The OCDBT data file holding the first array stored out of line. Truncated, its reads
    fail while the others are still running: what left orbax's event loop closed under them."""
    kvstore = ts.KvStore.open(f"file://{state}/ocdbt.process_0/").result()
    (version,) = ts.ocdbt.dump(kvstore).result()["versions"][-1:]
    assert version["root_height"] == 0, "a B-tree of one leaf node (1,032 keys) expected"
    leaf = ts.ocdbt.dump(kvstore, version["root"]["location"]).result()
    _, value = min(
        (e["key"], e["indirect_value"]) for e in leaf["entries"] if "indirect_value" in e
    )
    name = value.split("::d/")[1].split(":")[0]  # "value::d/<file>:<offset>:<length>"
    return state / "ocdbt.process_0" / "d" / name


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_passed_over_with_one_warning_and_no_traceback(tmp_path):
    trained = _run(_command(tmp_path, training__num_steps=6))
    assert trained.returncode == 0, trained.stdout[-3000:]
    assert checkpointing.checkpoint_steps(tmp_path) == [2, 4, 6]
    for step in (4, 6):
        path = _data_file_of_the_first_array(tmp_path / "checkpoints" / str(step) / "state")
        os.truncate(path, 100)

    resumed = _run(_command(tmp_path, training__num_steps=6))
    output = resumed.stdout
    assert resumed.returncode == 0, output[-3000:]
    everything = output + resumed.log  # neither the console nor the log file has them
    assert _tracebacks(everything) == 0 and "Event loop is closed" not in everything
    assert _tracebacks(everything) == 0, everything[-5000:]
    for step in (4, 6):
        (warning,) = _lines_with(output, f"Checkpoint {step} in", "could not be read")
        assert "is not valid for value of size 100" in warning and "restored step 2" in warning
    assert "Restored the checkpoint of step 2" in resumed.log
    assert sorted(os.listdir(tmp_path / "corrupted_checkpoints")) == ["4", "6"]
    assert _logged_steps(tmp_path) == list(range(1, 7))


# ---------------------------------------------------------------- inference on an empty workdir


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_sample_and_eval_leave_an_empty_or_missing_workdir_as_it_was(tmp_path, mode):
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    for workdir in (empty, missing):
        # No JAX_COMPILATION_CACHE_DIR: the cache would go to workdir/compilation_cache.
        completed = _run(_command(workdir, f"--mode={mode}"), shared_cache=False)
        assert completed.returncode != 0
        assert f"No checkpoint in {workdir / 'checkpoints'}" in completed.stdout
        assert "train first with --mode=train" in completed.stdout
    assert os.listdir(empty) == [] and not missing.exists()
