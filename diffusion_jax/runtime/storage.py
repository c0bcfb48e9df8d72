"""Where a run's files live: a local directory or an object store (`gs://bucket/run`, or any
URL that fsspec knows), all named by one path type, `etils.epath.Path`, as Orbax and TFDS do.

    path = storage.as_path("gs://bucket/run") / "summary.json"
    storage.write_text(path, text)         # whole or not at all, locally and remotely
    storage.check_access(workdir, write=True)  # start-up: a missing bucket, no permission
    mirror = storage.MirroredDirectory(workdir / "logs")  # line-at-a-time files, uploaded later

An object store is not a file system: an object is written whole (no append, no rename of a
file being written), and each request is a network round trip. So:

- Files written a line at a time (the log file, metrics.jsonl, TensorBoard's events) are
  written to a local staging directory and uploaded whole by a background thread every
  `SYNC_INTERVAL_S` seconds and once more at close (`MirroredDirectory`): the train step never
  waits for the network, at the price of the last interval's lines when a run is killed with
  SIGKILL. Checkpoints do not go through it: Orbax writes them itself, in the background.
- Whole files (PNGs, .npz, JSON reports) are written with `write_bytes`: one object upload,
  which readers see complete or not at all, as a rename makes it locally.
- What only a local disk has is skipped or replaced for a remote path, by its owner:
  free-space checks (`checkpointing`), the lock file's atomic creation (`create_exclusive`:
  a generation-match precondition on GCS), the staging of the files above.

Credentials: gs:// paths go through gcsfs (epath's fsspec backend; tf.io.gfile where
TensorFlow is installed) and through TensorStore for Orbax's arrays. Both take Google's
application-default credentials: the VM's service account on a TPU VM or GCE,
`gcloud auth application-default login` on a workstation, GOOGLE_APPLICATION_CREDENTIALS
for a key file. STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore)
point them at an emulator instead, as the tests do.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import socket
import tempfile
import threading

import fsspec
import numpy as np
from absl import logging
from etils import epath

# How often the background thread uploads the staged files that changed.
SYNC_INTERVAL_S = 10.0

# gcsfs caches directory listings by default; a run lists what others wrote (TensorStore's
# arrays, the other hosts' files, a training run seen from sampling), so listings are not
# cached. fsspec applies this to every gs:// file system made after this module's import.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

PathLike = str | os.PathLike


class StorageError(OSError):
    """A path cannot be used: its bucket is missing, or this account may not read or write it."""


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: a pathlib-like path, local or a URL (gs://bucket/dir)."""
    return epath.Path(path)


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL of another file system than the local one (gs://, s3://, ...)."""
    scheme, separator, _ = os.fspath(path).partition("://")
    return bool(separator) and scheme != "file"


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute (the directory of the run, whatever the current one is);
    a URL as it is."""
    return as_path(path) if is_remote(path) else as_path(os.path.abspath(os.fspath(path)))


def _filesystem(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path within it) of a URL."""
    return fsspec.core.url_to_fs(os.fspath(path))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write a whole file so that a reader sees the old contents or the new, never part:
    locally a temporary file renamed over `path`, remotely one object upload (an object is
    visible only once complete). The parent directory is created if need be."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode())


def list_files(root: PathLike) -> list[os.PathLike]:
    """Every file under `root`, recursively, in no set order: pathlib's `rglob` locally
    (pathlib paths); remotely one listing of the objects under the prefix (pages of a
    thousand, not a request per file) as epath paths."""
    if not is_remote(root):
        return [path for path in pathlib.Path(root).rglob("*") if path.is_file()]
    filesystem, inner = _filesystem(root)
    scheme = os.fspath(root).partition("://")[0]
    return [as_path(f"{scheme}://{name}") for name in filesystem.find(inner)]


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
    """`np.savez` of `arrays` to `path` as one whole-file write (`write_bytes`); the name is
    kept as given (np.savez would add ".npz" to another suffix)."""
    encoded = io.BytesIO()
    np.savez(encoded, **arrays)
    write_bytes(path, encoded.getvalue())


def load_npz(path: PathLike) -> np.lib.npyio.NpzFile:
    """`np.load` of an .npz file, local or remote (read whole), never unpickling."""
    source = io.BytesIO(as_path(path).read_bytes()) if is_remote(path) else os.fspath(path)
    return np.load(source, allow_pickle=False)


def create_exclusive(path: PathLike, data: bytes) -> bool:
    """Create `path` holding `data`, unless it exists (then False). Atomic: of two callers,
    exactly one creates it. Locally `O_CREAT | O_EXCL`; on GCS an upload with the precondition
    ifGenerationMatch=0, which the store checks (gcsfs's mode="create"; a file system whose
    fsspec driver has no such precondition checks existence first, which is not atomic)."""
    if is_remote(path):
        filesystem, inner = _filesystem(path)
        try:
            filesystem.pipe_file(inner, data, mode="create")
        except FileExistsError:
            return False
        return True
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return True


def _access_error(path: PathLike, option: str, error: BaseException) -> StorageError:
    return StorageError(
        f"{option}={os.fspath(path)} cannot be used: {type(error).__name__}: {error}. Check "
        "the bucket's name and that this machine's credentials (application-default "
        "credentials: the VM's service account on a TPU VM, `gcloud auth application-default "
        "login` elsewhere) may read and write it."
    )


def check_access(path: PathLike, *, write: bool, option: str = "--workdir") -> None:
    """Before any compute: StorageError naming `path` (as the option `option`) if its bucket
    does not exist, or if it cannot be listed or (with `write`) written, where a test object
    is written and deleted. Local paths are left to the file functions' own errors."""
    if not is_remote(path):
        return
    filesystem, inner = _filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        filesystem.info(bucket)
    except FileNotFoundError:
        scheme = os.fspath(path).partition("://")[0]
        raise StorageError(
            f"{option}={os.fspath(path)}: the bucket {scheme}://{bucket} does not exist (or "
            "these credentials cannot see it). Create it, or give a bucket that exists."
        ) from None
    except Exception:  # noqa: BLE001  (an account may lack buckets.get yet read and write objects)
        pass
    try:
        filesystem.exists(inner)
        if write:
            probe = f"{inner.rstrip('/')}/.access_check.{socket.gethostname()}.{os.getpid()}"
            filesystem.pipe_file(probe, b"")
            filesystem.rm_file(probe)
    except Exception as error:  # noqa: BLE001  (whatever the store says, named with the path)
        raise _access_error(path, option, error) from error


class MirroredDirectory:
    """A directory for files written a little at a time, such as logs: for a remote `remote`,
    a local staging directory whose changed files a background thread uploads whole every
    `interval_s` seconds, and `close` once more; for a local `remote`, that directory itself,
    with no thread and nothing to upload.

    `pull`: names of files under `remote` copied into the staging directory first, so that a
    resumed run appends to them (metrics.jsonl, the log file)."""

    def __init__(
        self, remote: PathLike, *, pull: tuple[str, ...] = (), interval_s: float = SYNC_INTERVAL_S
    ):
        self.remote = as_path(remote)
        self.is_mirrored = is_remote(remote)
        self._thread = None
        if not self.is_mirrored:
            self.local = pathlib.Path(remote)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="diffusion_jax_staging_"))
        for name in pull:
            source = self.remote / name
            if source.exists():
                (self.local / name).parent.mkdir(parents=True, exist_ok=True)
                (self.local / name).write_bytes(source.read_bytes())
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime)
        self._sync_lock = threading.Lock()
        self._failing = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="storage-mirror", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        """Upload each staged file that changed since its last upload (whole: an object store
        has no append). Raises what the store raises."""
        if not self.is_mirrored:
            return
        with self._sync_lock:
            for file in sorted(self.local.rglob("*")):
                if not file.is_file():
                    continue
                stat = file.stat()
                version = (stat.st_size, stat.st_mtime_ns)
                relative = file.relative_to(self.local).as_posix()
                if self._uploaded.get(relative) != version:
                    (self.remote / relative).write_bytes(file.read_bytes())
                    self._uploaded[relative] = version

    def request_sync(self) -> None:
        """Have the background thread upload now rather than at its next interval (returns
        at once; e.g. after a checkpoint, so that the metrics up to it are uploaded soon)."""
        if self._thread is not None:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._sync_logging_failure()

    def _sync_logging_failure(self) -> bool:
        """`sync`, a failure logged as one warning per run of failures; whether it succeeded."""
        try:
            self.sync()
        except Exception as error:  # noqa: BLE001  (the network: tried again next time)
            if not self._failing:
                logging.warning(
                    "Could not upload %s to %s (%s: %s); trying again every %g s.",
                    self.local,
                    self.remote,
                    type(error).__name__,
                    error,
                    self._interval_s,
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        """Stop the thread and upload what changed; the staging directory is deleted once
        uploaded, else kept and named in a warning (nothing is lost)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._thread = None
        if self._sync_logging_failure():
            with contextlib.suppress(OSError):
                shutil.rmtree(self.local)
        else:
            logging.warning("Kept the files not uploaded to %s in %s.", self.remote, self.local)
