"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) train one model
together through the command line: they agree with each other and with one process."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS_IN_LINE = re.compile(r"^step (\d+)/\d+ .* loss ([-+0-9.eE]+|nan)", re.MULTILINE)
OVERRIDES = [
    "--config.training.num_steps=6",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every=6",
    "--config.sampling.num_steps=2",
    "--config.sampling.num_images=4",
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


@pytest.mark.slow
def test_two_processes_train_together_and_match_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            _command(
                tmp_path / "two",
                f"--config.parallel.coordinator_address={address}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={process_id}",
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
    losses_0, losses_1 = (_losses(stdout) for stdout, _ in outputs)
    assert sorted(losses_0) == [2, 4, 6] and losses_0 == losses_1

    single = subprocess.run(
        _command(tmp_path / "one"), cwd=REPO_ROOT, env=_environment(1),
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    records = {
        step: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
        for step, name in ((0, "two"), (1, "one"))
    }
    # Four devices in two processes train on the same global batches as one device.
    np.testing.assert_allclose(records[0], records[1], rtol=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "6").is_dir()
