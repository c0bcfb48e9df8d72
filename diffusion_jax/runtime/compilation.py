"""Compiling the programs of a run: XLA options per backend, ahead of time, all processes
together, and cached on disk between runs.

Training, sampling and evaluation wrap their jitted functions in `CompiledTogether`, which
compiles each new argument signature ahead of its first call (`lower(...).compile(...)`):

- with the XLA options of `compiler_options()`: on CPUs, convolutions and matrix products
  go to Eigen instead of YNNPACK, whose weight-gradient convolution is about 3x slower
  (docs/benchmarks.md: the CIFAR-10 train step runs 1.4x faster) and whose batched products
  (Winograd's convolutions, `models.winograd`) are 10-25% slower;
- with several processes, all of them then meet at a barrier of JAX's coordination service
  before the program first runs. Without it, processes reach a program's first collective
  far apart when one loads it from the persistent compilation cache while another compiles
  it (seen on CPU: process 0 hit the cache, process 1 compiled for 35 s), and the gloo CPU
  collectives give up after 30 s of waiting for a peer: the run dies.

`use_persistent_cache` points JAX's persistent compilation cache at the run's workdir, so a
resumed run (after a preemption, say) loads its programs instead of compiling them again:
the digits U-Net's run of two steps took 33 s the first time and 12.5 s the second on a
2-core CPU. JAX writes the cache from process 0 only. A workdir in an object store
(gs://bucket/run) keeps the cache there too: JAX reads and writes such a directory through
etils.epath, entry by entry when a program is compiled (never in the train step), and every
host of a TPU pod then loads what process 0 compiled.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from orbax.checkpoint import multihost as orbax_multihost

# No YNNPACK fusions: XLA:CPU (jaxlib 0.10) runs convolutions and matrix products in Eigen.
# Eigen's weight-gradient convolution is about 3x faster, and its batched products run
# Winograd's convolutions faster than YNNPACK's (CIFAR-10 U-Net forward at batch 4: 334
# against 364 ms; train step at batch 16: 5.12-5.20 against 5.32-5.33 s; docs/benchmarks.md).
# With direct convolutions the train step is the same either way (5.81 against 5.90 s).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# How long a process waits at a barrier for the others to finish compiling a program.
COMPILE_BARRIER_TIMEOUT_S = 3600
_BARRIER_COUNT = itertools.count()


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The XLA options our programs are compiled with on `backend` (default: JAX's)."""
    backend = jax.default_backend() if backend is None else backend
    return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else {}


def use_persistent_cache(cache_dir: str, workdir: str) -> str | None:
    """Points JAX's persistent compilation cache at ``cache_dir`` (relative paths are under
    ``workdir``; "" leaves JAX's setting alone) and returns the directory in use, if any.

    Call it before the first compilation: JAX reads the setting once. A directory that JAX
    was given already (``JAX_COMPILATION_CACHE_DIR``) wins."""
    current = jax.config.jax_compilation_cache_dir
    if current or not cache_dir:
        return current or None
    if not (os.path.isabs(cache_dir) or "://" in cache_dir):
        cache_dir = os.path.join(workdir, cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    logging.info("Persistent compilation cache: %s", cache_dir)
    return cache_dir


def compile_ahead(jitted: Callable, *args, options: dict[str, str] | None = None):
    """`jitted` (a jax.jit or jax.pmap function) compiled for `args` with `options`
    (default `compiler_options()`); a jaxlib that lacks an option compiles without them."""
    options = compiler_options() if options is None else options
    lowered = jitted.lower(*args)
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if not options or "No such compile option" not in str(error):
            raise
        logging.warning("This jaxlib lacks %s (%s); using XLA's defaults", options, error)
        return lowered.compile()


def signature(args) -> tuple:
    """Tree structure, shapes, dtypes and shardings of `args`: what a compiled program fixes."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves
    )


def wait_for_all_processes(name: str) -> None:
    """Return once every process has called this with the same `name` (in the same order).

    A barrier of JAX's coordination service (through orbax), not a collective on the
    devices: those are what gloo would time out on."""
    if jax.process_count() == 1:
        return
    barrier = orbax_multihost.get_barrier_sync_fn()
    barrier(
        key=f"diffusion_jax_{name}_{next(_BARRIER_COUNT)}",
        timeout_ms=COMPILE_BARRIER_TIMEOUT_S * 1000,
    )


class CompiledTogether:
    """`jitted(*args)` compiled ahead of its first call per argument signature, with our
    XLA options, and started by all processes together (see the module docstring).

    `dispatch_jitted`: call `jitted` itself after compiling ahead (which still fills the
    persistent cache and meets the barrier). A multi-process pmap needs it: compiled ahead,
    it expects every process's rows, while its callers pass their own."""

    def __init__(self, jitted: Callable, name: str, *, dispatch_jitted: bool = False):
        self.jitted, self.name = jitted, name
        self.dispatch_jitted = dispatch_jitted
        self.options = compiler_options()
        self.compiled: dict = {}

    def __call__(self, *args):
        key = signature(args)
        if key not in self.compiled:
            compiled = compile_ahead(self.jitted, *args, options=self.options)
            self.compiled[key] = self.jitted if self.dispatch_jitted else compiled
            wait_for_all_processes(f"compiled_{self.name}")
        return self.compiled[key](*args)

    def lower(self, *args):
        return self.jitted.lower(*args)
