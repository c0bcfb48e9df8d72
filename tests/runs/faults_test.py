"""End-to-end tests of the faults of issue 30, each through the real entry point in a
subprocess: a checkpoint write that fails, a disk too small, two runs on one workdir, a
stale or forced lock, an unreadable checkpoint, sampling or evaluating an empty workdir.
Each asserts what the user sees (exit code, one message, tracebacks counted) and that no
work is lost (the previous checkpoint restores, metrics.jsonl holds each step once)."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import tensorstore as ts

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
    """The run's exit code and its output (stdout and stderr together, in order)."""
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=_environment(shared_cache=shared_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def _tracebacks(output: str) -> int:
    return output.count("Traceback (most recent call last)")


def _lines_with(output: str, *texts: str) -> list[str]:
    return [line for line in output.splitlines() if all(text in line for text in texts)]


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


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
    assert _tracebacks(output) == 0 and "Event loop is closed" not in output, output[-5000:]
    for step in (4, 6):
        (warning,) = _lines_with(output, f"Checkpoint {step} in", "could not be read")
        assert "is not valid for value of size 100" in warning and "restored step 2" in warning
    assert "Restored the checkpoint of step 2" in output
    assert sorted(os.listdir(tmp_path / "corrupted_checkpoints")) == ["4", "6"]
    assert _logged_steps(tmp_path) == list(range(1, 7))
