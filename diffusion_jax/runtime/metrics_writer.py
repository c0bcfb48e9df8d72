"""What a run reports: TensorBoard events, a JSON-lines file, a console progress line.

Only process 0 writes files; every process prints its progress line (their losses agree:
they train one model on one global batch). TensorBoard event files are written by
tensorboardX (no TensorFlow needed): `tensorboard --logdir WORKDIR`.
`WORKDIR/metrics.jsonl` holds one JSON object per logged step, e.g.
{"step": 100, "loss": 0.05, "img_per_s": 410.2}. A run started from the checkpoint of step
S (or from scratch, S = 0) first drops what a stopped run logged after S (rows of
metrics.jsonl; TensorBoard's events through tensorboardX's `purge_step`), so each step is
recorded once.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours:d}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(
    step: int, num_steps: int, *, loss: float, img_per_s: float, eta_s: float, width: int = 20
) -> str:
    """'step 120/1000 [##----] loss 0.0312 | 410 img/s | ETA 0:03:12'."""
    done = int(width * step / max(num_steps, 1))
    bar = "#" * done + "-" * (width - done)
    return (
        f"step {step}/{num_steps} [{bar}] loss {loss:.4f} | {img_per_s:.0f} img/s | "
        f"ETA {format_duration(eta_s)}"
    )


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
    """Scalars to TensorBoard and metrics.jsonl, images to TensorBoard, progress to the console."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        enabled: bool,
        progress_bar: bool,
        start_step: int | None = None,
    ):
        """`enabled`: write files (process 0); the progress line follows `progress_bar`;
        `start_step`: the step a run starts from (its checkpoint's, or 0), whose later rows
        a stopped run may have logged."""
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self.progress_bar = progress_bar
        self._summary = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            purge_step = None
            if start_step is not None:
                drop_rows_after(self.workdir / METRICS_FILE, start_step)
                purge_step = start_step + 1
            self._summary = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge_step)
            self._jsonl = open(self.workdir / METRICS_FILE, "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._summary.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._summary.add_image(name, np.asarray(image), step, dataformats="HWC")

    def progress(
        self, step: int, num_steps: int, *, loss: float, img_per_s: float, steps_per_s: float
    ) -> None:
        """One console line; on a terminal it rewrites itself."""
        if not self.progress_bar:
            return
        eta = (num_steps - step) / steps_per_s if steps_per_s > 0 else 0.0
        line = progress_line(step, num_steps, loss=loss, img_per_s=img_per_s, eta_s=eta)
        end = "\r" if sys.stdout.isatty() and step < num_steps else "\n"
        print(line, end=end, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._summary.close()
            self._jsonl.close()
