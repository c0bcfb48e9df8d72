"""Stopping a run cleanly when its machine is taken away (preemption).

A single-process run records SIGTERM (`SigtermFlag`) and the loop saves a checkpoint at the
next step boundary; a multi-host run asks JAX's preemption sync point, so that all processes
stop at one common step.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging


class SigtermFlag:
    """Records SIGTERM (the usual notice of preemption) instead of dying at once.

    The training loop polls `requested`, saves a checkpoint and returns. Single-process runs
    only: multi-host runs use JAX's preemption sync point, so that all processes stop at the
    same step, and its service watches SIGTERM itself (`jax.distributed.initialize` installs
    its handler, which a Python handler would replace). Restores the previous handler on
    `close`.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        own_signal = jax.process_count() == 1
        if own_signal and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def preemption_requested(manager: ocp.CheckpointManager, flag: SigtermFlag, step: int) -> bool:
    """Whether to save and stop now: SIGTERM (one process) or the pod's sync point."""
    if jax.process_count() == 1:
        return flag.requested
    return bool(manager.reached_preemption(step))
