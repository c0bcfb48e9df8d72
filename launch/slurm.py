"""Run the main entry point on a multi-node GPU cluster under SLURM.

Writes an sbatch script and submits it with `sbatch`. Inside the job, `srun` starts one
process per GPU (`--process-per=gpu`, each process sees one GPU) or one per node
(`--process-per=node`, each process sees all the node's GPUs), and each process calls
`jax.distributed.initialize` with values read from SLURM's environment:

- coordinator: the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`, at a port
  derived from the job id (the rule jax's own SLURM detection uses) unless `--port` is given;
- process count: `$SLURM_NTASKS`; process id: `$SLURM_PROCID`, read inside each task.

`--wiring=auto` passes none of these and leaves `jax.distributed.initialize()` to detect
SLURM itself (jax 0.10 reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID
and SLURM_LOCALID). Either way the launcher passes `parallel.local_device_ids`: the GPU
numbered SLURM_LOCALID per process, or all of the node's GPUs in per-node mode.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \
        --config configs/cifar10.py --workdir /shared/runs/cifar10 --dry-run \
        -- --config.training.batch_size=512

`--dry-run` prints the script, then the sbatch command, and submits nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/slurm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import entry_point  # noqa: E402

PROCESS_PER = ("gpu", "node")
WIRINGS = ("explicit", "auto")
GPU_REQUESTS = ("gpus-per-node", "gres")
REPO_ROOT = Path(__file__).resolve().parent.parent

# jax's SLURM detection (jax/_src/clusters/slurm_cluster.py) picks a port in the top 4096
# ephemeral ports from the job id; the explicit wiring uses the same rule.
PORT_FROM_JOB_ID = "$((SLURM_JOB_ID % 4096 + 61440))"
RESERVED_KEYS = (*entry_point.PARALLEL_WIRING_KEYS, "parallel.local_device_ids")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")


def sbatch_header(
    *,
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    process_per: str,
    time: str,
    partition: str | None = None,
    account: str | None = None,
    cpus_per_task: int | None = None,
    gpu_request: str = "gpus-per-node",
    output: str = "slurm-%j.out",
) -> list[str]:
    """The `#SBATCH` lines: one task per GPU or per node, GPUs requested per node."""
    if process_per not in PROCESS_PER:
        raise ValueError(f"process_per {process_per!r}: must be one of {', '.join(PROCESS_PER)}")
    if gpu_request not in GPU_REQUESTS:
        raise ValueError(f"gpu_request {gpu_request!r}: must be one of {', '.join(GPU_REQUESTS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes={nodes}, gpus_per_node={gpus_per_node}: both must be >= 1")
    if not _TIME.match(time):
        raise ValueError(f"time {time!r}: must be MINUTES, HH:MM:SS or D-HH:MM:SS")
    tasks_per_node = gpus_per_node if process_per == "gpu" else 1
    gpus = f"--gpus-per-node={gpus_per_node}" if gpu_request == "gpus-per-node" else ""
    options = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        gpus or f"--gres=gpu:{gpus_per_node}",
        f"--time={time}",
        f"--output={output}",
    ]
    options += [f"--partition={partition}"] if partition else []
    options += [f"--account={account}"] if account else []
    options += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    return [f"#SBATCH {option}" for option in options]


def task_command(
    main_argv: Sequence[str], *, process_per: str, wiring: str, gpus_per_node: int
) -> str:
    """The shell string each task runs; SLURM_PROCID etc. are expanded inside the task.

    GPUs are chosen with `parallel.local_device_ids`, not CUDA_VISIBLE_DEVICES, so every
    process still sees its node's GPUs (NVLink peer access) and only uses its own. Passing
    them matters even with `--wiring=auto`: under SLURM, jax otherwise gives each process
    the single GPU numbered SLURM_LOCALID, which would leave 7 of 8 idle in per-node mode.
    """
    if wiring not in WIRINGS:
        raise ValueError(f"wiring {wiring!r}: must be one of {', '.join(WIRINGS)}")
    if process_per not in PROCESS_PER:
        raise ValueError(f"process_per {process_per!r}: must be one of {', '.join(PROCESS_PER)}")
    if (wiring, process_per) == ("auto", "node"):
        # diffusion_jax.runtime.parallel.initialize_distributed passes local_device_ids only with a
        # coordinator address, and jax alone would use 1 GPU per node under SLURM.
        raise ValueError(
            "wiring 'auto' with process_per 'node' would use one GPU per node; "
            "use wiring 'explicit' (or process_per 'gpu')"
        )
    parts = [shlex.join(main_argv)]
    if wiring == "explicit":
        parts += [
            '--config.parallel.coordinator_address="$COORDINATOR_ADDRESS"',
            '--config.parallel.num_processes="$SLURM_NTASKS"',
            '--config.parallel.process_id="$SLURM_PROCID"',
        ]
    if process_per == "gpu":
        parts.append('--config.parallel.local_device_ids="($SLURM_LOCALID,)"')
    else:
        all_gpus = "(" + ",".join(str(i) for i in range(gpus_per_node)) + ",)"
        parts.append(f'--config.parallel.local_device_ids="{all_gpus}"')
    return "exec " + " ".join(parts)


def sbatch_script(
    *,
    header: Sequence[str],
    main_argv: Sequence[str],
    process_per: str,
    wiring: str,
    gpus_per_node: int,
    repo_dir: str,
    setup: Sequence[str] = (),
    port: int | None = None,
) -> str:
    """The whole sbatch script: header, environment setup, coordinator address, one srun."""
    lines = ["#!/bin/bash", *header, "set -euo pipefail", f"cd {shlex.quote(repo_dir)}"]
    lines += list(setup)  # e.g. "module load cuda", "source .venv/bin/activate": verbatim
    if wiring == "explicit":
        port_expression = str(port) if port else PORT_FROM_JOB_ID
        lines += [
            # `sed -n 1p` reads every line: `head -n 1` would exit early, SIGPIPE scontrol and,
            # under pipefail, fail the job.
            'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
            f'export COORDINATOR_ADDRESS="$COORDINATOR_HOST:{port_expression}"',
            'echo "jax.distributed coordinator: $COORDINATOR_ADDRESS"',
        ]
    inner = task_command(
        main_argv, process_per=process_per, wiring=wiring, gpus_per_node=gpus_per_node
    )
    # Single quotes: the batch shell must not expand $SLURM_PROCID, each task does.
    # srun of Slurm 22.05-23.02 does not pass the job's --cpus-per-task on to its tasks.
    srun = "srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}"
    lines.append(f"{srun} bash -c {shlex.quote(inner)}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before `--`, config overrides (--config.section.key=value) after it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--process-per", choices=PROCESS_PER, default="gpu")
    parser.add_argument("--wiring", choices=WIRINGS, default="explicit")
    parser.add_argument("--gpu-request", choices=GPU_REQUESTS, default="gpus-per-node")
    parser.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--job-name", default="diffusion_jax")
    parser.add_argument("--output", default="slurm-%j.out", help="sbatch --output pattern")
    parser.add_argument("--port", type=int, default=None, help="coordinator port")
    parser.add_argument("--setup", action="append", default=[], help="shell line before srun")
    parser.add_argument("--repo-dir", default=str(REPO_ROOT), help="checkout on shared disk")
    parser.add_argument("--python", default="python")
    parser.add_argument("--script", default=None, help="where to write the sbatch script")
    parser.add_argument("--config", required=True, help="e.g. configs/cifar10.py")
    parser.add_argument("--workdir", required=True, help="on a filesystem all nodes share")
    parser.add_argument("--mode", choices=entry_point.MODES, default="train")
    parser.add_argument("--dry-run", action="store_true", help="print script and command only")
    launcher_argv, overrides = entry_point.split_overrides(argv)
    return parser.parse_args(launcher_argv), overrides


def build_script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The sbatch script for the parsed options."""
    entry_point.check_overrides(overrides, reserved_keys=RESERVED_KEYS)
    main_argv = entry_point.main_command(
        config=args.config,
        workdir=args.workdir,
        mode=args.mode,
        overrides=overrides,
        python=args.python,
    )
    header = sbatch_header(
        job_name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        process_per=args.process_per,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        gpu_request=args.gpu_request,
        output=args.output,
    )
    return sbatch_script(
        header=header,
        main_argv=main_argv,
        process_per=args.process_per,
        wiring=args.wiring,
        gpus_per_node=args.gpus_per_node,
        repo_dir=args.repo_dir,
        setup=args.setup,
        port=args.port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    script = build_script(args, overrides)
    script_path = args.script or f"{args.job_name}.sbatch"
    submit = ["sbatch", script_path]
    if args.dry_run:
        print(script, end="")
        print(shlex.join(submit))
        return 0
    Path(script_path).write_text(script)
    return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
