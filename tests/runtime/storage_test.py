"""Tests of runtime/storage.py on a local directory and on the GCS emulator: whole-file
writes, atomic exclusive creation, the start-up access check, mirrored directories."""

import fsspec
import fsspec.implementations.memory
import numpy as np
import pytest

from diffusion_jax.runtime import storage


@pytest.fixture(params=["local", "gcs"])
def directory(request, tmp_path):
    """A local directory, or a folder of a new bucket on the emulator."""
    if request.param == "local":
        return storage.as_path(tmp_path)
    return storage.as_path(request.getfixturevalue("gcs_emulator").new_bucket()) / "run"


def test_is_remote_tells_urls_from_local_paths():
    assert storage.is_remote("gs://bucket/run") and storage.is_remote("s3://b/x")
    assert not storage.is_remote("/tmp/run") and not storage.is_remote("relative/run")
    assert not storage.is_remote("file:///tmp/run")
    assert str(storage.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert storage.absolute("run").is_absolute()


def test_whole_file_writes_read_back_and_replace(directory):
    path = directory / "reports" / "summary.json"
    storage.write_text(path, "first")
    storage.write_text(path, "second")
    assert path.read_text() == "second"
    assert [child.name for child in path.parent.iterdir()] == ["summary.json"]  # no temporary


def test_exclusive_creation_refuses_a_second_writer(directory):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lock.json"
    assert storage.create_exclusive(path, b"one")
    assert not storage.create_exclusive(path, b"two")  # on GCS: ifGenerationMatch=0 refused
    assert path.read_bytes() == b"one"


def test_access_check_names_a_missing_bucket(gcs_emulator):
    with pytest.raises(storage.StorageError, match=r"--workdir=gs://no-such-bucket/run: the "):
        storage.check_access("gs://no-such-bucket/run", write=False)
    with pytest.raises(storage.StorageError, match="gs://no-such-bucket does not exist"):
        storage.check_access("gs://no-such-bucket/run", write=True)


def test_access_check_writes_and_removes_its_probe(gcs_emulator):
    workdir = storage.as_path(gcs_emulator.new_bucket()) / "run"
    storage.check_access(workdir, write=True)
    storage.check_access(workdir, write=False)
    assert not workdir.exists()  # the probe object is gone, so is the "folder"
    storage.check_access("/no/such/local/dir", write=True)  # local: left to the file functions


def test_a_mirrored_directory_uploads_on_sync_and_close(gcs_emulator):
    remote = storage.as_path(gcs_emulator.new_bucket()) / "run"
    storage.write_text(remote / "train.log", "line 1\n")
    mirror = storage.MirroredDirectory(remote, pull=("train.log", "absent.log"), interval_s=3600)
    assert mirror.is_mirrored and (mirror.local / "train.log").read_text() == "line 1\n"
    with open(mirror.local / "train.log", "a") as file:
        file.write("line 2\n")
    (mirror.local / "tensorboard").mkdir()
    (mirror.local / "tensorboard" / "events").write_bytes(b"\x00\x01")
    assert (remote / "train.log").read_text() == "line 1\n"  # not uploaded yet
    mirror.sync()
    assert (remote / "train.log").read_text() == "line 1\nline 2\n"
    with open(mirror.local / "train.log", "a") as file:
        file.write("line 3\n")
    mirror.close()
    assert (remote / "train.log").read_text() == "line 1\nline 2\nline 3\n"
    assert (remote / "tensorboard" / "events").read_bytes() == b"\x00\x01"
    assert not mirror.local.exists()  # staging removed once uploaded


def test_a_mirrored_local_directory_is_the_directory_itself(tmp_path):
    mirror = storage.MirroredDirectory(tmp_path / "logs", pull=("train.log",))
    assert not mirror.is_mirrored and mirror.local == tmp_path / "logs" and mirror.local.is_dir()
    mirror.close()
    assert mirror.local.is_dir()


def test_npz_files_round_trip_under_any_name_and_are_never_unpickled(directory):
    path = directory / "weights.converted"  # np.savez(path) would have added ".npz"
    storage.save_npz(path, mu=np.arange(3.0), name=np.asarray("digits"))
    with storage.load_npz(path) as archive:
        np.testing.assert_array_equal(archive["mu"], [0.0, 1.0, 2.0])
        assert str(archive["name"]) == "digits"
    storage.save_npz(directory / "objects.npz", payload=np.asarray([{"a": 1}], dtype=object))
    with storage.load_npz(directory / "objects.npz") as archive, pytest.raises(ValueError):
        archive["payload"]  # a pickled object array: refused, not loaded


class _WriteDeniedFileSystem(fsspec.implementations.memory.MemoryFileSystem):
    """An object store whose account may list but not write (what GCS answers with 403)."""

    protocol = "denied"
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("denied://").rstrip("/")

    def pipe_file(self, path, value, **kwargs):
        raise PermissionError(f"403 Forbidden: no storage.objects.create on {path}")


def test_access_check_names_a_path_this_account_may_not_write():
    """The permission error (here from a store that refuses writes; the GCS emulator does not
    check permissions) names the option, the path and where credentials come from."""
    fsspec.register_implementation("denied", _WriteDeniedFileSystem, clobber=True)
    fsspec.filesystem("denied").mkdir("bucket")
    storage.check_access("denied://bucket/run", write=False)  # reading is allowed
    with pytest.raises(storage.StorageError) as error:
        storage.check_access("denied://bucket/run", write=True)
    message = str(error.value)
    assert message.startswith("--workdir=denied://bucket/run cannot be used: PermissionError")
    assert "403 Forbidden" in message and "application-default" in message
