"""Two workarounds for orbax-checkpoint (0.12), so that a failed save or restore reads as one
message instead of hundreds of tracebacks.

1. Orbax runs each of its coroutines on a fresh event loop (`asyncio_utils.run_sync`) and
   closes that loop as soon as the coroutine returns or raises. When one of many array reads
   or writes fails (a damaged checkpoint, a full disk), `asyncio.gather` raises at once and
   the others are still running: the loop is closed under them, and each one's TensorStore
   future then prints `RuntimeError: Event loop is closed` from its thread, and at exit
   `Exception ignored in: <coroutine ...>` (measured: 552 tracebacks when restoring a digits
   checkpoint with one truncated data file, 208 when a save ran out of disk space).
   `install()` makes the loop finish its remaining tasks (their errors collected) before it
   is closed, which is what `asyncio.run` does, minus the cancellation.
2. A failed background save is logged by orbax three times, each with its traceback (the
   save thread, the commit thread and `wait_until_finished`), before `checkpointing` reports
   it in one message (`CheckpointSaveError`, naming the directory and the cause). Those
   three records stay in the log as INFO lines without their tracebacks.

Both are applied once, by `checkpointing.make_checkpoint_manager`; with an orbax that lacks
the patched function the first is skipped (the noise comes back, nothing is lost).
"""

from __future__ import annotations

import asyncio
import logging

# Records that checkpointing reports itself, in one CheckpointSaveError.
SAVE_FAILURE_MESSAGES = (
    "Handler Commit operations or the Commit callback in background save thread",
    "_SignalingThread.run() raised an exception",
    "Save Finalize thread",
)
_installed = False


def _run_sync_via_new_loop(coro):
    """orbax's `_run_sync_via_new_loop`, but the loop's other tasks end before it closes."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            while pending := asyncio.all_tasks(loop):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class QuietSaveFailures(logging.Filter):
    """orbax's ERROR records of a failed save become INFO lines without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            message = record.getMessage()
            if any(text in message for text in SAVE_FAILURE_MESSAGES):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Apply both workarounds (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:  # another orbax layout: keep its behaviour
        asyncio_utils = None
    if asyncio_utils is not None and hasattr(asyncio_utils, "_run_sync_via_new_loop"):
        asyncio_utils._run_sync_via_new_loop = _run_sync_via_new_loop
    logging.getLogger("absl").addFilter(QuietSaveFailures())
