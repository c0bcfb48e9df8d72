"""One progress bar per phase of a run (training, sampling, evaluation) on the console.

    bar = ProgressBar("sampling", total=50_000, unit="img")
    bar.update(640, loss=...)   # done so far, and any figures to show
    bar.close()

On a terminal the line rewrites itself; when the output is a file or a pipe (a cluster's log),
each update is a line of its own, and the caller updates every N steps (or asks for
`lines_off_terminal` evenly spaced lines). Only the process that `enabled` says writes
(process 0 of a multi-host run).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours:d}:{rest // 60:02d}:{rest % 60:02d}"


def _figure(name: str, value) -> str:
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


def progress_line(
    phase: str,
    done: int,
    total: int,
    *,
    rate: float,
    unit: str,
    eta_s: float,
    width: int = 20,
    **figures,
) -> str:
    """'training 120/1000 [##------] loss 0.0312 | 410 img/s | ETA 0:03:12'."""
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    shown = " | ".join(_figure(name, value) for name, value in figures.items() if value is not None)
    return (
        f"{phase} {done}/{total} [{bar}] "
        + (f"{shown} | " if shown else "")
        + f"{rate:.3g} {unit}/s | ETA {format_duration(eta_s)}"
    )


class ProgressBar:
    """Steps done of `total`, with the rate in `unit`s per second and the time to go."""

    def __init__(
        self,
        phase: str,
        total: int,
        *,
        unit: str = "it",
        items_per_step: int = 1,
        start: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        lines_off_terminal: int | None = None,
    ):
        """`lines_off_terminal`: when the output is not a terminal, show only this many
        evenly spaced updates (and the last), not every one."""
        self.lines_off_terminal = lines_off_terminal
        self._next_line = 0
        self.phase, self.total, self.unit = phase, total, unit
        self.items_per_step = items_per_step
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._start, self._start_time = start, time.monotonic()
        self._last, self._last_time = start, self._start_time
        self._open = False

    def update(self, done: int, **figures) -> str:
        """Show `done` steps of `total` and `figures` (name -> value; None: not shown)."""
        now = time.monotonic()
        rate_steps = (done - self._last) / max(now - self._last_time, 1e-9)
        overall = (done - self._start) / max(now - self._start_time, 1e-9)
        self._last, self._last_time = done, now
        eta = (self.total - done) / overall if overall > 0 else 0.0
        line = progress_line(
            self.phase,
            done,
            self.total,
            rate=rate_steps * self.items_per_step,
            unit=self.unit,
            eta_s=eta,
            **figures,
        )
        if self.enabled and self._shown(done):
            terminal = self.stream.isatty()
            end = "\r" if terminal and done < self.total else "\n"
            self.stream.write(("\x1b[2K" if terminal else "") + line + end)
            self.stream.flush()
            self._open = end == "\r"
        return line

    def _shown(self, done: int) -> bool:
        if self.lines_off_terminal is None or self.stream.isatty() or done >= self.total:
            return True
        if done < self._next_line:
            return False
        self._next_line = done + self.total / self.lines_off_terminal
        return True

    def close(self) -> None:
        """End a line left open on a terminal."""
        if self.enabled and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
