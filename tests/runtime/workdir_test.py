"""Tests of diffusion_jax.runtime.workdir: the lock file of a training run's workdir (held,
refused, stale, another host's, forced, released only by its owner), in a local directory
and in a bucket of the GCS emulator. The entry point's own
tests are in tests/runs/faults_test.py."""

import json
import os
import socket
import subprocess
import sys

import pytest

from diffusion_jax.runtime import storage, workdir


@pytest.fixture(params=["local", "gcs"])
def directory(request, tmp_path):
    """A workdir on the local disk, or in a new bucket of the GCS emulator (the lock is an
    object created with a generation-match precondition there)."""
    if request.param == "local":
        return storage.as_path(tmp_path)
    return storage.as_path(request.getfixturevalue("gcs_emulator").new_bucket()) / "run"


def _write_lock(path, **owner):
    path.mkdir(parents=True, exist_ok=True)
    (path / workdir.LOCK_FILE).write_text(json.dumps(owner))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_names_its_owner_and_is_removed_after_an_exception(directory):
    lock_file = directory / "run" / workdir.LOCK_FILE
    with pytest.raises(KeyError), workdir.lock(directory / "run"):
        owner = json.loads(lock_file.read_text())
        assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())
        assert owner["started"] and owner["command"]
        raise KeyError("the run failed")
    assert not lock_file.exists()


def test_a_second_lock_is_refused_naming_the_owner_and_what_to_do(directory):
    with workdir.lock(directory):
        owner = json.loads((directory / workdir.LOCK_FILE).read_text())
        with pytest.raises(workdir.WorkdirLockedError) as refused:
            workdir.acquire(directory)
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started {owner['started']}" in message
    assert "it is running" in message
    assert "Wait for that run to finish, use another --workdir, or pass --force" in message


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(directory, caplog):
    pid = _dead_pid()
    _write_lock(directory, host=socket.gethostname(), pid=pid, started="2020-01-01T00:00:00")
    with caplog.at_level("WARNING"), workdir.lock(directory):
        assert json.loads((directory / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    (warning,) = [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()]
    assert f"pid {pid}, started 2020-01-01T00:00:00" in warning and "no longer runs" in warning


def test_a_reused_pid_is_told_from_the_run_that_held_the_lock(directory):
    mine = workdir._owner()
    _write_lock(directory, **{**mine, "process_start": mine["process_start"] - 1})  # older
    workdir.release(directory, workdir.acquire(directory))  # taken over: not that run


def test_another_hosts_lock_is_refused_unless_forced(directory, caplog):
    _write_lock(directory, host="node-7", pid=1234, started="2020-01-01T00:00:00")
    with pytest.raises(workdir.WorkdirLockedError, match="host node-7, pid 1234.*another host"):
        workdir.acquire(directory)
    with caplog.at_level("WARNING"), workdir.lock(directory, force=True):
        pass
    assert "host node-7, pid 1234" in caplog.text and "--force" in caplog.text
    assert not (directory / workdir.LOCK_FILE).exists()


def test_an_unreadable_lock_is_refused_naming_the_file(directory):
    (directory / workdir.LOCK_FILE).write_text("{not json")
    with pytest.raises(workdir.WorkdirLockedError, match="lock file cannot be read"):
        workdir.acquire(directory)


def test_only_the_owner_removes_the_lock(directory):
    first = workdir.acquire(directory)
    second = workdir.acquire(directory, force=True)  # taken over while the first still runs
    workdir.release(directory, first)
    assert json.loads((directory / workdir.LOCK_FILE).read_text()) == second
    workdir.release(directory, second)
    assert not (directory / workdir.LOCK_FILE).exists()


def test_sampling_neither_takes_nor_checks_the_lock_and_writes_nothing(tmp_path):
    with workdir.lock(tmp_path / "missing", exclusive=False):
        assert not (tmp_path / "missing").exists()
    _write_lock(tmp_path, host="node-7", pid=1234)  # a run trains there: sampling it is fine
    with workdir.lock(tmp_path, exclusive=False):
        pass
    assert sorted(os.listdir(tmp_path)) == [workdir.LOCK_FILE]
