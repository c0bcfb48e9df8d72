"""Run the main entry point on every worker of a Cloud TPU VM or pod slice.

Steps, each one `gcloud compute tpus tpu-vm` command: `describe` the TPU (does it exist?),
`create` it when missing and `--create` is given, install the package on all workers
(`--worker=all`), then `ssh --worker=all` to start `python3 -m diffusion_jax.main` on every
host at once. On TPU the main entry point calls `jax.distributed.initialize()` without
arguments (empty `parallel.coordinator_address`): the TPU runtime supplies the coordinator,
the process count and each host's id. On a multi-host slice the workdir must be one every
host shares, so that all read and write the same checkpoints and TensorBoard events: a Cloud
Storage URL (gs://bucket/run, written directly, with the TPU VM's service account as
application-default credentials), or a directory every worker mounts (a Filestore/NFS path,
or a bucket mounted with gcsfuse).

    python launch/tpu_pod.py --tpu my-tpu --zone us-central2-b --accelerator-type v4-32 \
        --config configs/cifar10.py --workdir gs://bucket/run --create --dry-run \
        -- --config.training.batch_size=256

`--dry-run` prints each command on its own line (shell-quoted) and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/tpu_pod.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import entry_point  # noqa: E402

# Runtime ("software version") per TPU generation, from cloud.google.com/tpu/docs/runtimes.
RUNTIME_BY_GENERATION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
INSTALL_METHODS = ("git", "scp", "none")
REPO_ROOT = Path(__file__).resolve().parent.parent


def check_remote_dir(remote_dir: str) -> None:
    """The install step runs `rm -rf remote_dir` on every worker: allow only a plain subpath."""
    parts = Path(remote_dir).parts
    if not parts or Path(remote_dir).is_absolute() or any(p in (".", "..", "~") for p in parts):
        raise ValueError(
            f"remote_dir {remote_dir!r}: must be a relative path under $HOME made of plain "
            "names (no '.', '..', '~' or leading '/'), e.g. diffusion_jax"
        )


def default_runtime(accelerator_type: str) -> str:
    """The TPU software version for `accelerator_type` (v4-32 -> tpu-ubuntu2204-base)."""
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_BY_GENERATION:
        raise ValueError(
            f"accelerator_type {accelerator_type!r}: unknown generation {generation!r}; "
            f"known: {', '.join(RUNTIME_BY_GENERATION)} (or pass --version explicitly)"
        )
    return RUNTIME_BY_GENERATION[generation]


def _gcloud(verb: str, tpu: str, *, zone: str, project: str | None) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, tpu, f"--zone={zone}"]
    return command + ([f"--project={project}"] if project else [])


def describe_command(*, tpu: str, zone: str, project: str | None = None) -> list[str]:
    """The existence check: exits non-zero when the TPU is missing."""
    return _gcloud("describe", tpu, zone=zone, project=project) + ["--format=value(state)"]


def create_command(
    *,
    tpu: str,
    zone: str,
    accelerator_type: str,
    version: str,
    project: str | None = None,
    spot: bool = False,
) -> list[str]:
    """Creates the TPU VM / pod slice with the given runtime version."""
    command = _gcloud("create", tpu, zone=zone, project=project)
    command += [f"--accelerator-type={accelerator_type}", f"--version={version}"]
    return command + (["--spot"] if spot else [])


def ssh_command(
    *, tpu: str, zone: str, remote_command: str, project: str | None = None
) -> list[str]:
    """Runs `remote_command` (one shell string) on every worker at once."""
    command = _gcloud("ssh", tpu, zone=zone, project=project)
    return command + ["--worker=all", f"--command={remote_command}"]


def _and(*argvs: Sequence[str]) -> str:
    """One remote shell string: the argvs, each quoted, joined by `&&`."""
    return " && ".join(shlex.join(argv) for argv in argvs)


def install_commands(
    *,
    tpu: str,
    zone: str,
    project: str | None,
    method: str,
    remote_dir: str,
    repo_url: str | None,
    ref: str | None,
    archive: str,
) -> list[list[str]]:
    """Puts the package in `remote_dir` on every worker and pip-installs it with jax[tpu].

    "git" clones `repo_url` (branch or tag `ref`, default branch if None) on each worker;
    "scp" ships `git archive` of the local checkout at `ref` (default HEAD): committed files
    only, so every worker runs exactly one known tree.
    """
    if method not in INSTALL_METHODS:
        raise ValueError(f"install {method!r}: must be one of {', '.join(INSTALL_METHODS)}")
    if method == "none":
        return []
    check_remote_dir(remote_dir)
    pip_install = _and(
        ["cd", remote_dir],
        ["python3", "-m", "pip", "install", "--upgrade", "pip"],
        ["python3", "-m", "pip", "install", "-e", ".", "jax[tpu]"],
    )
    where = {"tpu": tpu, "zone": zone, "project": project}
    if method == "git":
        return [_git_clone_and_install(where, remote_dir, repo_url, ref, pip_install)]
    return _ship_archive_and_install(where, remote_dir, ref, archive, pip_install)


def _git_clone_and_install(where: dict, remote_dir, repo_url, ref, pip_install) -> list[str]:
    """One ssh command for every worker: a fresh shallow clone of `repo_url`, then pip."""
    if not repo_url:
        raise ValueError("repo_url: --install=git needs --repo-url (the git URL to clone)")
    branch = [f"--branch={ref}"] if ref else []
    fetch = _and(
        ["rm", "-rf", remote_dir],
        ["git", "clone", "--depth=1", *branch, repo_url, remote_dir],
    )
    return ssh_command(**where, remote_command=f"{fetch} && {pip_install}")


def _ship_archive_and_install(where: dict, remote_dir, ref, archive, pip_install):
    """`git archive` here, scp to every worker, unpack into `remote_dir`, then pip."""
    remote_archive = Path(archive).name
    unpack = _and(
        ["rm", "-rf", remote_dir],
        ["mkdir", "-p", remote_dir],
        ["tar", "-xzf", remote_archive, "-C", remote_dir],
    )
    tpu, zone, project = where["tpu"], where["zone"], where["project"]
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{tpu}:{remote_archive}"]
    scp += [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    git_archive = ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz"]
    return [
        [*git_archive, f"--output={archive}", ref or "HEAD"],
        scp + ["--worker=all"],
        ssh_command(**where, remote_command=f"{unpack} && {pip_install}"),
    ]


def run_command(
    *,
    tpu: str,
    zone: str,
    project: str | None,
    remote_dir: str,
    main_argv: Sequence[str],
    env: Sequence[str] = (),
) -> list[str]:
    """Starts the main entry point on all workers, from the package directory."""
    for assignment in env:
        if "=" not in assignment:
            raise ValueError(f"env {assignment!r}: must look like NAME=VALUE")
    exports = [["export", assignment] for assignment in env]
    remote = _and(["cd", remote_dir], *exports, main_argv)
    return ssh_command(tpu=tpu, zone=zone, project=project, remote_command=remote)


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> list[list[str]]:
    """Every command of a launch, in order; `describe` decides at run time whether to create."""
    where = dict(tpu=args.tpu, zone=args.zone, project=args.project)
    main_argv = entry_point.main_command(
        config=args.config,
        workdir=args.workdir,
        mode=args.mode,
        overrides=overrides,
        python="python3",
    )
    entry_point.check_overrides(overrides, reserved_keys=entry_point.PARALLEL_WIRING_KEYS)
    commands = [describe_command(**where)]
    if args.create:
        version = args.version or default_runtime(args.accelerator_type)
        commands.append(
            create_command(
                **where, accelerator_type=args.accelerator_type, version=version, spot=args.spot
            )
        )
    commands += install_commands(
        **where,
        method=args.install,
        remote_dir=args.remote_dir,
        repo_url=args.repo_url,
        ref=args.ref,
        archive=args.archive,
    )
    commands.append(
        run_command(**where, remote_dir=args.remote_dir, main_argv=main_argv, env=args.env)
    )
    return commands


def execute(commands: Sequence[Sequence[str]], *, create: bool) -> int:
    """Runs the plan: skips `create` when `describe` finds the TPU, stops at the first failure."""
    describe, *rest = commands
    exists = subprocess.run(describe, check=False).returncode == 0
    if exists and create:
        rest = rest[1:]
    elif not exists and not create:
        print(f"TPU {describe[5]} not found; pass --create to create it", file=sys.stderr)
        return 1
    for command in rest:
        print("+", shlex.join(command), file=sys.stderr, flush=True)
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0:
            return returncode
    return 0


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before `--`, config overrides (--config.section.key=value) after it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM / pod slice name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-32, v5litepod-16")
    parser.add_argument("--version", default=None, help="TPU runtime (default: by generation)")
    parser.add_argument("--create", action="store_true", help="create the TPU if missing")
    parser.add_argument("--spot", action="store_true", help="create it as a Spot VM")
    parser.add_argument("--install", choices=INSTALL_METHODS, default="scp")
    parser.add_argument("--repo-url", default=None, help="git URL for --install=git")
    parser.add_argument("--ref", default=None, help="branch/tag to clone, ref to archive")
    parser.add_argument("--archive", default="/tmp/diffusion_jax_src.tar.gz")
    parser.add_argument("--remote-dir", default="diffusion_jax", help="relative to $HOME")
    parser.add_argument("--config", required=True, help="e.g. configs/cifar10.py")
    parser.add_argument(
        "--workdir", required=True, help="a workdir all hosts share, e.g. gs://bucket/run"
    )
    parser.add_argument("--mode", choices=entry_point.MODES, default="train")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE on workers")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    launcher_argv, overrides = entry_point.split_overrides(argv)
    return parser.parse_args(launcher_argv), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if "://" not in args.workdir:
        print(
            f"note: on a multi-host slice, --workdir {args.workdir!r} must be shared by all "
            "workers (a Filestore or gcsfuse mount), or each keeps its own checkpoints; "
            "gs://BUCKET/RUN is shared by all",
            file=sys.stderr,
        )
    commands = plan(args, overrides)
    if args.dry_run:
        print("\n".join(shlex.join(command) for command in commands))
        return 0
    return execute(commands, create=args.create)


if __name__ == "__main__":
    sys.exit(main())
