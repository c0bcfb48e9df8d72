"""One training run per workdir: a lock file, `WORKDIR/lock.json`.

    with workdir.lock(path, force=False):  # a second training run on `path` is refused
        train(...)

Two training runs in one workdir write each other's checkpoints and logs: every row of
metrics.jsonl twice, and one run crashed when the other deleted its temporary checkpoint
folder. So a training run holds the workdir's lock while it runs:

- The lock file holds the owner's host, pid, start time, command and a random token. It is created
  atomically (`O_CREAT | O_EXCL`: of two runs started together, one gets it) and removed
  when the run ends, also by an exception or SIGTERM (a context manager); only its owner
  removes it.
- A second run refuses with `WorkdirLockedError`, which names the owner (host, pid, start
  time) and says how to proceed: wait for it, use another --workdir, or `--force`.
- A stale lock (a run killed with SIGKILL, a machine that crashed) is detected where it can
  be: on the same host, a pid that no longer runs (or runs another program, started after
  the lock) is taken over with a warning naming the old owner. A lock of another host
  cannot be checked (its pid means nothing here) and is refused unless `force`.
- `force=True` (`--force`) takes over any lock, with a warning naming the old owner: for a
  run known to be gone, e.g. on a host that no longer exists. If that run is in fact alive,
  both write the workdir, and the old one no longer removes the lock.
- On a multi-host run, process 0 holds the lock for all processes (they share the workdir).
- A workdir in an object store (gs://bucket/run) has its lock there too, created as atomically
  (an upload with the precondition ifGenerationMatch=0: of two runs, one gets it). A lock
  taken over there is deleted and created again, as object stores have no rename: two runs
  taking over the same stale lock at once are told apart by that creation, but a run that
  took it over between another's read and delete loses it (a window of one request). A stale
  lock is still detected only on the host that wrote it: the pid check is per host, so a lock
  left by a preempted TPU VM is refused until `--force`.

Only training takes the lock. `--mode sample` and `--mode eval` only read checkpoints (and
write their own samples/ and evaluation files), and sampling a checkpoint of a run that is
still training is legitimate and useful, so they neither take nor check it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import uuid
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath

from diffusion_jax.runtime import storage

LOCK_FILE = "lock.json"


class WorkdirLockedError(RuntimeError):
    """Another training run holds the workdir's lock."""


def _process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux /proc), to tell a reused pid."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command's name


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "token": uuid.uuid4().hex,  # tells this lock from any other, even of the same process
    }


def describe(owner: dict) -> str:
    """'host H, pid P, started T' of a lock's owner."""
    return (
        f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
        f"started {owner.get('started', '?')}"
    )


def _is_alive(owner: dict) -> bool | None:
    """Whether the owner still runs: None when it cannot be told (another host)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    recorded, now = owner.get("process_start"), _process_start(owner["pid"])
    return recorded is None or now is None or recorded == now  # else the pid was reused


def _read(path: epath.Path) -> dict | None:
    """The lock's owner; None if there is no lock; {} if it cannot be parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _create(path: epath.Path, owner: dict) -> bool:
    """Write the lock atomically; False if one exists."""
    return storage.create_exclusive(path, (json.dumps(owner, indent=1) + "\n").encode())


def _refusal(path: epath.Path, owner: dict, reason: str) -> WorkdirLockedError:
    command = f" ({owner['command']})" if owner.get("command") else ""
    return WorkdirLockedError(
        f"The workdir {path.parent} is in use by another training run: {describe(owner)}"
        f"{command}; {reason} (lock file {path}). Wait for that run to finish, use another "
        "--workdir, or pass --force to take the workdir over (only if that run is gone: two "
        "runs in one workdir overwrite each other's checkpoints and logs)."
    )


def _set_aside_remote(path: epath.Path, old: dict) -> None:
    """An object store's take-over: delete the lock if it is still `old`'s (no rename there)."""
    if _read(path) != old:
        raise _refusal(path, _read(path) or {}, "it has just taken the lock over")
    path.unlink(missing_ok=True)


def _take_over(path: epath.Path, old: dict, mine: dict, why: str) -> None:
    """Replace the lock whose owner is `old` by `mine`, unless another run replaced it first."""
    if storage.is_remote(path):
        _set_aside_remote(path, old)
        logging.warning("Taking over the lock of %s: %s (%s).", path.parent, describe(old), why)
        if not _create(path, mine):
            raise _refusal(path, _read(path) or {}, "it has just taken the lock over")
        return
    aside = path.with_name(f"{path.name}.{mine['pid']}.old")
    try:
        os.rename(path, aside)  # of two runs taking over, one moves the old lock
    except FileNotFoundError:
        aside = None
    if aside is not None and _read(aside) != old:  # a newer run's lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        os.unlink(aside)
        raise _refusal(path, _read(path) or {}, "it has just taken the lock over")
    if aside is not None:
        os.unlink(aside)
    logging.warning("Taking over the lock of %s: %s (%s).", path.parent, describe(old), why)
    if not _create(path, mine):
        raise _refusal(path, _read(path) or {}, "it has just taken the lock over")


def acquire(workdir: str | os.PathLike, *, force: bool = False) -> dict:
    """Take the lock of `workdir` (created if need be); returns the owner record written.

    WorkdirLockedError if another run holds it (see the module docstring)."""
    path = storage.as_path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = _owner()
    while not _create(path, mine):
        old = _read(path)
        if old is None:  # removed meanwhile: try again
            continue
        if force:
            _take_over(path, old, mine, "--force")
            break
        alive = _is_alive(old)
        if alive is False:
            _take_over(path, old, mine, "a stale lock: that process no longer runs")
            break
        if alive:
            raise _refusal(path, old, "it is running")
        if old.get("host") not in (None, mine["host"]):
            raise _refusal(path, old, "it runs on another host, where this one cannot check it")
        raise _refusal(path, old, "its lock file cannot be read")
    return mine


def release(workdir: str | os.PathLike, owner: dict) -> None:
    """Remove the lock if it is still `owner`'s (a forced take-over made it another's)."""
    path = storage.as_path(workdir) / LOCK_FILE
    if _read(path) == owner:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(
    workdir: str | os.PathLike, *, force: bool = False, exclusive: bool = True
) -> Iterator[None]:
    """Hold the workdir's lock for the duration (process 0 of a multi-host run; the others,
    and `exclusive=False`, do nothing)."""
    if not exclusive or jax.process_index() != 0:
        yield
        return
    owner = acquire(workdir, force=force)
    try:
        yield
    finally:
        release(workdir, owner)
