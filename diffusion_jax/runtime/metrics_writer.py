"""What a run records: TensorBoard events and a JSON-lines file of its scalars.

Only process 0 writes files. TensorBoard event files are written by
tensorboardX (no TensorFlow needed): `tensorboard --logdir WORKDIR`.
`WORKDIR/metrics.jsonl` holds one JSON object per logged step, e.g.
{"step": 100, "loss": 0.05, "img_per_s": 410.2}; a value that is not finite (the loss of a
window whose updates were all skipped) is written as null, so that the file stays strict
JSON. A run started from the checkpoint of step
S (or from scratch, S = 0) first drops what a stopped run logged after S (rows of
metrics.jsonl; TensorBoard's events through tensorboardX's `purge_step`), so each step is
recorded once.

In a workdir in an object store (gs://bucket/run), both files are written to a local staging
directory (metrics.jsonl first copied from the workdir) and uploaded by a background thread
every `storage.SYNC_INTERVAL_S` seconds and at `close` (`storage.MirroredDirectory`): an object
store has no append, and a write per logged step would put a network round trip on the train
loop. tensorboardX could write gs:// itself, but through the google-cloud-storage client and
only for GCS; staging serves every store and the log file alike.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from diffusion_jax.runtime import storage

METRICS_FILE = "metrics.jsonl"


def json_safe(value):
    """A value strict JSON readers accept: NaN and +-inf become null (a skipped update's loss
    is NaN; `json.dumps` would write a bare NaN, which is not JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **kwargs) -> str:
    """JSON of `value` with non-finite numbers as null; refuses anything else non-standard."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def drop_rows_after(path: pathlib.Path, step: int) -> None:
    """Rewrite a metrics.jsonl without its rows of steps after `step` (atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    partial = path.with_suffix(".jsonl.tmp")
    partial.write_text("".join(kept))
    partial.replace(path)


class MetricsWriter:
    """Scalars to TensorBoard and metrics.jsonl, images to TensorBoard."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool,
        start_step: int | None = None,
    ):
        """`enabled`: write files (process 0); `start_step`: the step a run starts from (its
        checkpoint's, or 0), whose later rows a stopped run may have logged."""
        self.workdir = storage.as_path(workdir)
        self.enabled = enabled
        self._summary = None
        self._jsonl = None
        self._mirror = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._mirror = storage.MirroredDirectory(workdir, pull=(METRICS_FILE,))
            local = self._mirror.local
            purge_step = None
            if start_step is not None:
                drop_rows_after(local / METRICS_FILE, start_step)
                purge_step = start_step + 1
            self._summary = SummaryWriter(str(local / "tensorboard"), purge_step=purge_step)
            self._jsonl = open(local / METRICS_FILE, "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._summary.add_scalar(name, value, step)
        self._jsonl.write(dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._summary.add_image(name, np.asarray(image), step, dataformats="HWC")

    def flush(self) -> None:
        """Start uploading what was written (a remote workdir; the caller does not wait)."""
        if self.enabled:
            self._summary.flush()
            self._mirror.request_sync()

    def close(self) -> None:
        if self.enabled:
            self._summary.close()
            self._jsonl.close()
            self._mirror.close()
