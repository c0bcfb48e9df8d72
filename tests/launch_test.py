"""Launchers: the dry-run commands they print, the SLURM wiring run against fake SLURM tools,
and real multi-process runs on 127.0.0.1 (a gloo all-reduce, and the tiny training config
trained by 2 processes that must report the same loss)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import entry_point, local, slurm, tpu_pod

REPO_ROOT = Path(__file__).resolve().parent.parent
TPU_EXAMPLE = [
    "--tpu", "my-tpu", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
    "--config", "configs/cifar10.py", "--workdir", "/gcs/bucket/run",
]  # fmt: skip


def run_script(name: str, *argv: str) -> str:
    """Runs `python launch/<name>.py argv` as a user would and returns its stdout."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / f"{name}.py"), *argv],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return result.stdout


def remote_argvs(ssh_argv: list[str]) -> list[list[str]]:
    """The `&&`-separated commands inside an ssh `--command=...`, each split like a shell."""
    (payload,) = [a.removeprefix("--command=") for a in ssh_argv if a.startswith("--command=")]
    argvs, current = [], []
    for token in shlex.split(payload):
        if token == "&&":
            argvs.append(current)
            current = []
        else:
            current.append(token)
    return [*argvs, current]


def test_tpu_dry_run_prints_describe_create_install_and_run_on_all_workers():
    overrides = ["--config.training.batch_size=256", "--config.data.name=folder name"]
    out = run_script("tpu_pod", *TPU_EXAMPLE, "--create", "--dry-run", "--", *overrides)
    describe, create, archive, scp, install, run = [shlex.split(line) for line in out.splitlines()]
    gcloud_tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert describe[:6] == [*gcloud_tpu, "describe", "my-tpu"]
    assert "--zone=us-central2-b" in describe
    assert create[:6] == [*gcloud_tpu, "create", "my-tpu"]
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"} <= set(create)
    assert archive[:3] == ["git", "-C", str(REPO_ROOT)] and archive[3] == "archive"
    output = next(a.removeprefix("--output=") for a in archive if a.startswith("--output="))
    assert scp[:7] == [*gcloud_tpu, "scp", output, f"my-tpu:{Path(output).name}"]
    for ssh in (install, run):
        assert ssh[:6] == [*gcloud_tpu, "ssh", "my-tpu"] and "--worker=all" in ssh
    assert "--worker=all" in scp
    assert ["python3", "-m", "pip", "install", "-e", ".", "jax[tpu]"] in remote_argvs(install)
    cd, main_argv = remote_argvs(run)
    assert cd == ["cd", "diffusion_jax"]
    assert main_argv == [
        "python3", "-m", "diffusion_jax.main", "--config=configs/cifar10.py",
        "--workdir=/gcs/bucket/run", "--mode=train",
        "--config.training.batch_size=256", "--config.data.name=folder name",
    ]  # fmt: skip


def test_tpu_dry_run_without_create_reuses_and_clones_with_git():
    out = run_script("tpu_pod", *TPU_EXAMPLE, "--install=git", "--repo-url",
                     "https://example.org/diffusion_jax.git", "--ref", "v1", "--mode", "eval",
                     "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--dry-run")  # fmt: skip
    describe, install, run = [shlex.split(line) for line in out.splitlines()]
    assert describe[4] == "describe"
    assert ["git", "clone", "--depth=1", "--branch=v1", "https://example.org/diffusion_jax.git",
            "diffusion_jax"] in remote_argvs(install)  # fmt: skip
    cd, export, main_argv = remote_argvs(run)
    assert export == ["export", "TF_CPP_MIN_LOG_LEVEL=2"]
    assert "--mode=eval" in main_argv and "--workdir=/gcs/bucket/run" in main_argv


def write_executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.mark.parametrize("tpu_exists", [True, False])
def test_tpu_launch_creates_only_a_missing_tpu(tmp_path, monkeypatch, capsys, tpu_exists):
    log = tmp_path / "gcloud.log"
    write_executable(
        tmp_path / "gcloud",
        f"""\
        echo "$*" >> {log}
        [[ "$4" == describe && -n "$TPU_MISSING" ]] && exit 1
        exit 0
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("TPU_MISSING", "" if tpu_exists else "1")
    argv = [*TPU_EXAMPLE, "--install=git", "--repo-url=https://example.org/r.git"]
    assert tpu_pod.main([*argv, "--create"]) == 0
    verbs = [line.split()[3] for line in log.read_text().splitlines()]
    assert verbs == (
        ["describe", "ssh", "ssh"] if tpu_exists else ["describe", "create", "ssh", "ssh"]
    )
    log.unlink()
    assert tpu_pod.main(argv) == (0 if tpu_exists else 1)  # a missing TPU needs --create
    assert "--create" in capsys.readouterr().err or tpu_exists


def test_tpu_bad_options_raise_naming_the_option():
    with pytest.raises(ValueError, match="accelerator_type 'v9-8'.*v5litepod"):
        tpu_pod.default_runtime("v9-8")
    assert tpu_pod.default_runtime("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu_pod.default_runtime("v6e-256") == "v2-alpha-tpuv6e"
    for remote_dir in (".", "", "/home/me", "../x", "~/x"):
        with pytest.raises(ValueError, match="remote_dir"):
            tpu_pod.check_remote_dir(remote_dir)
    with pytest.raises(ValueError, match="launcher sets parallel.process_id"):
        tpu_pod.main([*TPU_EXAMPLE, "--dry-run", "--", "--config.parallel.process_id=3"])
    with pytest.raises(ValueError, match="--config.section.key=value"):
        tpu_pod.main([*TPU_EXAMPLE, "--dry-run", "--", "--workdir=/elsewhere"])
    with pytest.raises(ValueError, match="mode 'fit'"):
        entry_point.main_command(config="c.py", workdir="w", mode="fit")


def test_tpu_pod_passes_a_gs_workdir_to_every_host_without_the_shared_disk_note(capsys):
    url = [*TPU_EXAMPLE[:-1], "gs://bucket/run"]  # written directly by every host
    assert tpu_pod.main([*url, "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "--workdir=gs://bucket/run" in printed.out and "must be shared" not in printed.err


SLURM_EXAMPLE = [
    "--nodes", "2", "--gpus-per-node", "2", "--partition", "gpu", "--time", "12:00:00",
    "--account", "lab", "--config", "configs/cifar10.py", "--workdir", "/shared/run",
]  # fmt: skip


def sbatch_options(script: str) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH --") for line in script.splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line and " " not in line)


def test_slurm_dry_run_prints_the_sbatch_script_and_command():
    out = run_script("slurm", *SLURM_EXAMPLE, "--dry-run", "--",
                     "--config.training.batch_size=512")  # fmt: skip
    *script, submit = out.splitlines()
    assert shlex.split(submit) == ["sbatch", "diffusion_jax.sbatch"]
    assert script[0] == "#!/bin/bash"
    assert sbatch_options("\n".join(script)) == {
        "job-name": "diffusion_jax", "nodes": "2", "ntasks-per-node": "2",
        "gpus-per-node": "2", "time": "12:00:00", "output": "slurm-%j.out",
        "partition": "gpu", "account": "lab",
    }  # fmt: skip
    srun, kill, cpus, bash, dash_c, task = shlex.split(script[-1])
    assert (srun, kill, bash, dash_c) == ("srun", "--kill-on-bad-exit=1", "bash", "-c")
    assert cpus == "${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}"
    assert shlex.split(task) == [
        "exec", "python", "-m", "diffusion_jax.main", "--config=configs/cifar10.py",
        "--workdir=/shared/run", "--mode=train", "--config.training.batch_size=512",
        "--config.parallel.coordinator_address=$COORDINATOR_ADDRESS",
        "--config.parallel.num_processes=$SLURM_NTASKS",
        "--config.parallel.process_id=$SLURM_PROCID",
        "--config.parallel.local_device_ids=($SLURM_LOCALID,)",
    ]  # fmt: skip
    per_node = run_script("slurm", *SLURM_EXAMPLE, "--process-per=node", "--gpu-request=gres",
                          "--dry-run")  # fmt: skip
    assert sbatch_options(per_node)["ntasks-per-node"] == "1"
    assert sbatch_options(per_node)["gres"] == "gpu:2"
    assert "--config.parallel.local_device_ids=(0,1,)" in shlex.split(shlex.split(
        per_node.splitlines()[-2])[-1])  # fmt: skip


def fake_slurm_tools(bin_dir: Path, argv_log: Path) -> None:
    """scontrol, srun (2 nodes x 2 tasks, run in turn) and a python that logs its argv."""
    write_executable(bin_dir / "scontrol", 'printf "node001\\nnode002\\n"\n')
    write_executable(
        bin_dir / "srun",
        """\
        export SLURM_NTASKS=4 SLURM_STEP_NODELIST="node[001-002]"
        while [[ $1 == --* ]]; do echo "$1" >> "$(dirname "$0")/srun_options"; shift; done
        for procid in 0 1 2 3; do
          SLURM_PROCID=$procid SLURM_LOCALID=$((procid % 2)) "$@" || exit 1
        done
        """,
    )
    write_executable(
        bin_dir / "python",
        f"""{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" \
        >> {argv_log}\n""",
    )


def test_slurm_script_wires_coordinator_and_process_ids_like_jax(tmp_path):
    """Runs the generated script with fake SLURM tools: every task gets the first node as
    coordinator (at the port jax's own SLURM detection derives from the job id), the task
    count, its own SLURM_PROCID and its GPU."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    argv_log = tmp_path / "argv.jsonl"
    fake_slurm_tools(tmp_path, argv_log)
    script = tmp_path / "job.sbatch"
    args, overrides = slurm.parse_args([*SLURM_EXAMPLE, "--repo-dir", str(tmp_path)])
    script.write_text(slurm.build_script(args, overrides))
    job_env = {
        "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_CPUS_PER_TASK": "12",  # srun of Slurm 22.05-23.02 must be told it again
    }  # fmt: skip
    subprocess.run(
        ["bash", str(script)], check=True, capture_output=True,
        env={**os.environ, **job_env, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )  # fmt: skip
    launched = [json.loads(line) for line in argv_log.read_text().splitlines()]
    srun_options = (tmp_path / "srun_options").read_text().split()
    assert srun_options == ["--kill-on-bad-exit=1", "--cpus-per-task=12"]
    task_env = {**job_env, "SLURM_STEP_NODELIST": "node[001-002]"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in task_env.items():
            patch.setenv(name, value)
        jax_coordinator = SlurmCluster.get_coordinator_address(None, None)
    assert jax_coordinator == f"node001:{123457 % 4096 + 61440}"
    for process_id, argv in enumerate(launched):
        options = dict(a.split("=", 1) for a in argv if a.startswith("--config.parallel."))
        assert options == {
            "--config.parallel.coordinator_address": jax_coordinator,
            "--config.parallel.num_processes": "4",
            "--config.parallel.process_id": str(process_id),
            "--config.parallel.local_device_ids": f"({process_id % 2},)",
        }
    assert len(launched) == 4


def test_slurm_bad_options_raise_naming_the_option():
    with pytest.raises(ValueError, match="time '12h'"):
        slurm.main([*SLURM_EXAMPLE, "--time", "12h", "--dry-run"])
    with pytest.raises(ValueError, match="launcher sets parallel.local_device_ids"):
        slurm.main([*SLURM_EXAMPLE, "--dry-run", "--", "--config.parallel.local_device_ids=(1,)"])
    with pytest.raises(ValueError, match="process_per 'socket'"):
        slurm.sbatch_header(job_name="j", nodes=1, gpus_per_node=1, process_per="socket",
                            time="1:00:00")  # fmt: skip


def test_local_commands_and_environment():
    commands = local.process_commands(["python", "-m", "diffusion_jax.main"], num_processes=3,
                                      port=12345)  # fmt: skip
    for process_id, argv in enumerate(commands):
        assert argv[3:] == [
            "--config.parallel.coordinator_address=127.0.0.1:12345",
            "--config.parallel.num_processes=3",
            f"--config.parallel.process_id={process_id}",
            "--config.parallel.cpu_collectives=gloo",
        ]
    base = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"}
    env = local.process_environment(base, devices_per_process=2)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/d", "--xla_force_host_platform_device_count=2"
    ]  # fmt: skip
    assert env["PYTHONPATH"] == str(REPO_ROOT)  # configs import `configs` from any directory
    env = local.process_environment({"PYTHONPATH": "/mine"}, devices_per_process=1)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/mine"]


ALL_REDUCE = """\
import sys
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
flags = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--config.parallel."))
jax.config.update("jax_cpu_collectives_implementation", flags["--config.parallel.cpu_collectives"])
jax.distributed.initialize(flags["--config.parallel.coordinator_address"],
                           int(flags["--config.parallel.num_processes"]),
                           int(flags["--config.parallel.process_id"]))
values = multihost_utils.process_allgather(jnp.arange(2.0) + 10 * jax.process_index())
print("devices", jax.device_count(), "sum", float(values.sum()))
"""


def test_local_processes_join_one_gloo_collective():
    commands = local.process_commands([sys.executable, "-c", ALL_REDUCE], num_processes=2,
                                      port=local.free_port())  # fmt: skip
    env = local.process_environment(os.environ, devices_per_process=2)
    sink = io.StringIO()
    assert local.run_processes(commands, env=env, sink=sink, timeout=240) == [0, 0]
    lines = sink.getvalue().splitlines()
    # Process p gathers [10p, 10p + 1] from both: 0 + 1 + 10 + 11 = 22; 2 x 2 devices.
    assert sorted(line for line in lines if "sum" in line) == [
        "[0] devices 4 sum 22.0", "[1] devices 4 sum 22.0"
    ]  # fmt: skip


def test_local_failure_stops_the_other_processes():
    commands = [
        [sys.executable, "-c", "import time; time.sleep(600)"],
        [sys.executable, "-c", "print('failing'); raise SystemExit(3)"],
    ]
    sink = io.StringIO()
    returncodes = local.run_processes(commands, env=os.environ, sink=sink, timeout=120)
    assert returncodes[1] == 3 and returncodes[0] != 0
    assert "[1] failing" in sink.getvalue()


LOSS_IN_LINE = re.compile(r"\bloss[=: ]+([-+0-9.eE]+|nan)")


def reported_losses(output: str, process_id: int) -> list[float]:
    """Loss values in the launcher's output lines prefixed by `[process_id]`."""
    prefix = f"[{process_id}] "
    lines = [line.removeprefix(prefix) for line in output.splitlines() if line.startswith(prefix)]
    return [float(m.group(1)) for line in lines for m in [LOSS_IN_LINE.search(line)] if m]


@pytest.mark.slow
def test_local_launcher_trains_tiny_config_on_two_processes(tmp_path, capsys):
    """The tiny toy config trained by 2 processes of 1 CPU device each, through the CLI:
    both succeed, metrics.jsonl records finite losses, and the processes report the same
    losses (they train one model on one global batch, so any difference is a bug)."""
    main_module = REPO_ROOT / "diffusion_jax" / "main.py"
    assert main_module.exists(), "diffusion_jax/main.py (the training entry point) is missing"
    returncode = local.main([
        "--num-processes=2", "--devices-per-process=1", "--timeout=540",
        "--config=configs/toy2d.py:tiny", f"--workdir={tmp_path}",
        "--", "--config.training.num_steps=20", "--config.training.log_every=10",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert returncode == 0, output[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(logged) == [10, 20] and all(math.isfinite(v) for v in logged.values())
    losses_0, losses_1 = reported_losses(output, 0), reported_losses(output, 1)
    assert losses_0, f"process 0 reported no loss:\n{output[-4000:]}"
    assert losses_0[-1] == pytest.approx(logged[20], rel=1e-3)
    assert losses_1, f"process 1 reported no loss:\n{output[-4000:]}"
    assert losses_0 == losses_1


def _train_with_pmap(workdir: Path, num_steps: int, capsys) -> tuple[str, list[int]]:
    """2 processes x 2 devices train toy2d:tiny with pmap to `num_steps`: (output, logged
    steps); the run must succeed."""
    returncode = local.main([
        "--num-processes=2", "--devices-per-process=2", "--timeout=540",
        "--config=configs/toy2d.py:tiny", f"--workdir={workdir}",
        "--", f"--config.training.num_steps={num_steps}", "--config.training.log_every=2",
        "--config.parallel.strategy=pmap",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert returncode == 0, output[-4000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return output, [r["step"] for r in records if "loss" in r]


@pytest.mark.slow
def test_local_launcher_trains_with_pmap_on_two_processes_of_two_devices(tmp_path, capsys):
    """parallel.strategy=pmap over 4 devices in 2 processes (as on a TPU pod): a pmap
    compiled ahead of time expects every process's rows, so it must be called itself."""
    output, steps = _train_with_pmap(tmp_path, 4, capsys)
    assert steps == [2, 4]
    losses_0, losses_1 = reported_losses(output, 0), reported_losses(output, 1)
    assert losses_0 and losses_0 == losses_1
    output, steps = _train_with_pmap(tmp_path, 6, capsys)  # resumed from step 4's checkpoint
    log = (tmp_path / "logs" / "train.log").read_text()  # INFO lines go there, not the console
    assert "Restored the checkpoint of step 4" in log, output[-4000:]
    assert steps == [2, 4, 6]


def _gpu_bench(*argv: str, wheels: Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # 1 device
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # our python3
    env["GPU_BENCH_WHEELS"] = str(wheels)  # none: everything is installed here
    env["GPU_BENCH_FLAGS"] = (
        "--tiny --batch_size 4 --repeats 1 --warmup 0 --sample_repeats 1 --sample_warmup 0"
    )
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "gpu_bench.sh"), *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_gpu_bench_rehearsed_on_the_cpu_runs_the_part_it_is_given(tmp_path):
    # The `select` part (ours alone) with the tiny U-Net: the script's own wiring, with the
    # flags it passes and GPU_BENCH_FLAGS after them (tests/bench_test.py tests the module).
    out = tmp_path / "out"  # given relative to the caller's directory, as a user would
    done = _gpu_bench("run", "out", "select", wheels=tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_select.json", "bench_select.log", "gpu.txt",
    ]  # fmt: skip
    results = json.loads((out / "bench_select.json").read_text())
    options = results["environment"]["options"]
    assert options["skip_with"] == "select" and options["dtype"] == "bfloat16"
    assert options["batch_size"] == 4 and options["compare"] == "none"  # GPU_BENCH_FLAGS won
    assert results["train"]["ours"]["items_per_s"] > 0 and results["sampling"] == {}


def test_gpu_bench_refuses_an_unknown_part_naming_the_allowed_ones(tmp_path):
    done = _gpu_bench("run", str(tmp_path / "out"), "bfloat16", "fp8", wheels=tmp_path)
    assert done.returncode != 0
    assert "unknown part 'fp8'; allowed: bfloat16 float32 select" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran
