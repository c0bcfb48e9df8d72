"""Tests of diffusion_jax.training.orbax_workarounds: orbax's event loop lets its remaining
tasks finish before it is closed, and orbax's log records of a failed save lose their
tracebacks (checkpointing reports the failure in one message)."""

import asyncio
import concurrent.futures
import logging
import sys
import threading

import pytest
from orbax.checkpoint._src import asyncio_utils

from diffusion_jax.training import orbax_workarounds


def test_a_failed_gather_leaves_no_task_running_on_a_closed_loop():
    """As when one array read fails while the others still wait on TensorStore: orbax used
    to close the loop under them, and each then failed with 'Event loop is closed'."""
    orbax_workarounds.install()
    read = concurrent.futures.Future()  # completed from another thread, as TensorStore's are
    failed, finished = threading.Event(), []

    def finish_the_read():
        failed.wait()  # once restore() has failed: where orbax closed the loop
        read.set_result("other array")

    async def slow_read():
        finished.append(await asyncio.wrap_future(read))

    async def failing_read():
        raise OSError("Requested byte range is not valid for value of size 100")

    async def restore():
        try:
            await asyncio.gather(slow_read(), failing_read())
        finally:
            failed.set()

    threading.Thread(target=finish_the_read).start()
    with pytest.raises(OSError, match="size 100"):
        asyncio_utils.run_sync(restore())
    assert finished == ["other array"]  # it ran to its end before the loop closed


def test_orbax_records_of_a_failed_save_become_info_lines_without_a_traceback():
    quiet = orbax_workarounds.QuietSaveFailures()
    try:
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    except ValueError:
        record = logging.LogRecord(
            "absl", logging.ERROR, "/site-packages/orbax/checkpoint/_src/async_checkpointer.py",
            264, "[process=0] Failed to run 4 Handler Commit operations or the Commit callback "
            "in background save thread, directory: /w/checkpoints/4", (), sys.exc_info(),
        )  # fmt: skip
    other = logging.LogRecord("absl", logging.ERROR, "/x/orbax/y.py", 1, "another error", (), None)
    assert quiet.filter(record) and quiet.filter(other)
    assert (record.levelname, record.exc_info) == ("INFO", None)
    assert other.levelname == "ERROR"  # what we do not report ourselves stays an error
