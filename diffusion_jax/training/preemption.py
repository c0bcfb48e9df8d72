"""Stopping a run cleanly: preemption (SIGTERM) and Ctrl-C (SIGINT).

A single-process run records either signal (`StopFlag`) and the loop saves a checkpoint at the
next step boundary and returns, as if the run had been given fewer steps; a second Ctrl-C
stops at once (Python's KeyboardInterrupt). A multi-host run asks JAX's preemption sync point
instead, so that all processes stop at one common step.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging

SIGNAL_NAMES = {signal.SIGTERM: "preemption (SIGTERM)", signal.SIGINT: "Ctrl-C (SIGINT)"}


class StopFlag:
    """Records SIGTERM (the usual notice of preemption) or a first Ctrl-C instead of dying.

    The training loop polls `requested`, saves a checkpoint and returns. Single-process runs
    only: multi-host runs use JAX's preemption sync point, so that all processes stop at the
    same step, and its service watches SIGTERM itself (`jax.distributed.initialize` installs
    its handler, which a Python handler would replace). After a first Ctrl-C, the next one
    raises KeyboardInterrupt at once. Restores the previous handlers on `close`.
    """

    def __init__(self):
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous = {}
        own_signals = jax.process_count() == 1
        if own_signals and threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one stops now
            logging.warning(
                "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)."
            )
        else:
            logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.signal_name = SIGNAL_NAMES[signum]
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def preemption_requested(manager: ocp.CheckpointManager, flag: StopFlag, step: int) -> bool:
    """Whether to save and stop now: a signal (one process) or the pod's sync point."""
    if jax.process_count() == 1:
        return flag.requested
    if manager.reached_preemption(step):
        flag.signal_name = "preemption (JAX's sync point)"
        return True
    return False
