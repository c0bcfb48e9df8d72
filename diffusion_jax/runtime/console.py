"""What a person watching a run sees: our progress, our warnings, a closing summary, and
one line per error; everything else (JAX's, Orbax's and absl's INFO lines, tracebacks) goes
to the run's log file.

    routing = LogRouting(verbose=False)  # first thing: console quiet, records held
    routing.to_file(workdir / "logs" / "train.log")
    print_summary("training finished", [("checkpoint", path), ...])
    report_error(error, log_path)   # one line on stderr; the traceback is in the log file

`verbose` (the `--verbosity` flag given) leaves absl's console logging as it is.
A log file in an object store (WORKDIR gs://bucket/run) is written to a local staging file and
uploaded in the background (`storage.MirroredDirectory`), and once more by `close`.
A record's `extra={"console": False}` keeps it off the console.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pathlib
import sys

from absl import logging as absl_logging
from etils import epath

from diffusion_jax.runtime import storage

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


class _OurWarnings(logging.Filter):
    """Warnings and errors logged by this package's own modules; no third-party lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.pathname.startswith(_PACKAGE_DIR)
        shown = getattr(record, "console", True)
        return ours and shown and record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class LogRouting:
    """Log records at INFO and above held in memory from the start, then written to a file
    once its name is known (a multi-host run's process index comes after start-up)."""

    def __init__(self, *, verbose: bool):
        """On the console only this package's warnings and errors, unless `verbose`."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        self._buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=100)
        root.addHandler(self._buffer)
        logging.captureWarnings(True)  # Python warnings (deprecations, ...) as log records
        self.path: epath.Path | None = None
        self._mirror: storage.MirroredDirectory | None = None
        self._file_handler: logging.Handler | None = None
        if verbose:
            return
        absl_logging.set_verbosity(absl_logging.INFO)  # recorded in the file
        absl_handler = absl_logging.get_absl_handler()
        if absl_handler in root.handlers:
            root.removeHandler(absl_handler)
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(_OurWarnings())
        console.setFormatter(_ConsoleFormatter())
        root.addHandler(console)

    def to_file(self, path: str | os.PathLike) -> epath.Path:
        """Append what was held and everything after it to `path` (local or a URL)."""
        self.path = storage.as_path(path)
        self._mirror = storage.MirroredDirectory(self.path.parent, pull=(self.path.name,))
        file_handler = logging.FileHandler(self._mirror.local / self.path.name)
        self._file_handler = file_handler
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        file_handler.setLevel(logging.INFO)
        self._buffer.setTarget(file_handler)
        self._buffer.flush()
        root = logging.getLogger()
        root.removeHandler(self._buffer)
        root.addHandler(file_handler)
        self._buffer.close()
        return self.path

    def close(self) -> None:
        """Flush the log file (and upload it, where it is remote); logging goes on to the
        console only."""
        if self._file_handler is None:
            return
        logging.getLogger().removeHandler(self._file_handler)
        self._file_handler.close()
        self._file_handler = None
        self._mirror.close()


def print_summary(title: str, rows: list[tuple[str, object]], *, stream=None) -> None:
    """A closing block: the title, then one aligned "name  value" row each (None: left out)."""
    stream = stream or sys.stdout
    rows = [(name, value) for name, value in rows if value is not None]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def report_error(
    error: BaseException, log_path: str | os.PathLike | None, *, message: str | None = None
) -> None:
    """The error as one message on stderr (its own, or `message`), the traceback in the log."""
    absl_logging.error("The run stopped on an error", exc_info=error, extra={"console": False})
    where = f" (details in {log_path})" if log_path else ""
    message = message or str(error) or type(error).__name__
    sys.stderr.write(f"error: {message}{where}\n")
    sys.stderr.flush()
