"""Run the main entry point as N processes on this machine, joined by CPU collectives.

This is the multi-host code path (`jax.distributed.initialize` with a coordinator, one
process per host) run where no cluster is at hand: N processes on 127.0.0.1, each with K
fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`), collectives over
gloo. Every output line is prefixed with its process index; the launcher waits for all of
them, stops the others as soon as one fails, and exits non-zero if any failed.

    python launch/local.py --num-processes 2 --devices-per-process 2 \
        --config configs/cifar10.py:tiny --workdir /tmp/local_run -- --config.training.num_steps=20
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as `python launch/local.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import entry_point  # noqa: E402

HOST = "127.0.0.1"  # never anything else: these processes must not leave this machine
REPO_ROOT = Path(__file__).resolve().parent.parent
RESERVED_KEYS = (*entry_point.PARALLEL_WIRING_KEYS, "parallel.cpu_collectives")
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def process_environment(base: Mapping[str, str], *, devices_per_process: int) -> dict[str, str]:
    """`base` with CPU-only JAX, K fake devices (other XLA_FLAGS are kept) and this checkout
    first on PYTHONPATH, so that a config's `from configs import ...` works from any
    directory."""
    if devices_per_process < 1:
        raise ValueError(f"devices_per_process={devices_per_process}: must be >= 1")
    other_flags = _DEVICE_COUNT_FLAG.sub("", base.get("XLA_FLAGS", "")).split()
    device_flag = f"--xla_force_host_platform_device_count={devices_per_process}"
    python_path = [str(REPO_ROOT), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **base,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*other_flags, device_flag]),
        "PYTHONPATH": os.pathsep.join(python_path),
    }


def process_commands(main_argv: Sequence[str], *, num_processes: int, port: int) -> list[list[str]]:
    """One argv per process: the same run, told the coordinator, the count and its index."""
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: must be >= 1")
    return [
        [
            *main_argv,
            f"--config.parallel.coordinator_address={HOST}:{port}",
            f"--config.parallel.num_processes={num_processes}",
            f"--config.parallel.process_id={process_id}",
            "--config.parallel.cpu_collectives=gloo",
        ]
        for process_id in range(num_processes)
    ]


def _relay(process_id: int, stream: TextIO, sink: TextIO) -> None:
    for line in stream:
        sink.write(f"[{process_id}] {line}")
        sink.flush()


def run_processes(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str],
    sink: TextIO | None = None,
    timeout: float | None = None,
) -> list[int]:
    """Starts every command, relays their prefixed output, returns their exit codes.

    When one fails the others are terminated: they would otherwise wait forever in a
    collective for the process that is gone.
    """
    sink = sys.stdout if sink is None else sink
    processes = [
        subprocess.Popen(
            list(command),
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for command in commands
    ]
    relays = [
        threading.Thread(target=_relay, args=(i, p.stdout, sink), daemon=True)
        for i, p in enumerate(processes)
    ]
    for relay in relays:
        relay.start()
    try:
        _wait_all(processes, timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for relay in relays:
            relay.join()
    return [process.returncode for process in processes]


def _wait_all(processes: Sequence[subprocess.Popen], *, timeout: float | None) -> None:
    """Waits until all exit, or one fails (then terminates the rest), or `timeout` passes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while None in (returncodes := [p.poll() for p in processes]):  # poll every process
        if any(code not in (None, 0) for code in returncodes):
            for process in processes:
                if process.poll() is None:
                    process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"processes still running after timeout={timeout} s")
        time.sleep(0.2)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before `--`, config overrides (--config.section.key=value) after it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--config", required=True, help="e.g. configs/cifar10.py:tiny")
    parser.add_argument("--workdir", required=True, help="shared by all processes")
    parser.add_argument("--mode", choices=entry_point.MODES, default="train")
    parser.add_argument("--timeout", type=float, default=None, help="seconds, then kill all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    launcher_argv, overrides = entry_point.split_overrides(argv)
    return parser.parse_args(launcher_argv), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    entry_point.check_overrides(overrides, reserved_keys=RESERVED_KEYS)
    main_argv = entry_point.main_command(
        config=args.config,
        workdir=args.workdir,
        mode=args.mode,
        overrides=overrides,
        python=args.python,
    )
    port = args.port or free_port()
    commands = process_commands(main_argv, num_processes=args.num_processes, port=port)
    env = process_environment(os.environ, devices_per_process=args.devices_per_process)
    if args.dry_run:
        prefix = " ".join(
            f"{name}={shlex.quote(env[name])}"
            for name in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH")
        )
        print("\n".join(f"{prefix} {shlex.join(command)}" for command in commands))
        return 0
    returncodes = run_processes(commands, env=env, timeout=args.timeout)
    for process_id, returncode in enumerate(returncodes):
        if returncode != 0:
            print(f"process {process_id} exited with {returncode}", file=sys.stderr)
    return next((code for code in returncodes if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
