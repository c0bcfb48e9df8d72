"""Keep freed host memory inside the process instead of handing it back to the OS.

XLA:CPU allocates a program's buffers with malloc on every execution and frees them at its
end. glibc serves large blocks with fresh mmap()s, and the arenas of threads other than the
first live in heaps that it unmaps once they are empty, so each execution touches its
working set as new pages: the DDPM CIFAR-10 train step at batch 16 took about 316,000 page
faults, 1.2 GB of zeroed pages and 1.0-1.2 s of kernel CPU time per step
(docs/benchmarks.md). `retain_freed_memory` makes the next step reuse the same pages:

- glibc keeps freed memory: no mmap()-served blocks, no trimming of the heap (the same as
  starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``);
- JAX runs CPU programs in the thread that calls them (``jax_cpu_enable_async_dispatch``
  off), whose arena is glibc's main one, which never unmaps: about 1,000 page faults a step.
  On the CPU the step then blocks its caller, which only waited for it anyway; programs over
  several CPU devices are dispatched asynchronously still.

A block of 64 MB or more that a thread other than the first allocates is still a fresh
mmap() each time: a thread's heap holds at most 64 MB. jaxlib 0.12 allocates some
executions' buffers on its worker threads (a 64 MB output faulted in half the executions or
more under the test suite's load); the CIFAR-10 train step at batch 16, whose buffers are
smaller, took 80-900 page faults a step with it (2026-12-02), as with jaxlib 0.10.

An earlier version limited malloc to one arena instead, for all threads: as few faults, but
XLA's compile threads then contended for that arena's lock and the train step compiled in
64-76 s instead of 58-62 s (fresh processes, the benchmark's measurement). The peak memory
is unchanged; the process just keeps its peak. Call `retain_freed_memory` before JAX
creates its CPU client (the first JAX computation).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

# mallopt(3) parameters of glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def retain_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory and JAX to run CPU programs in the calling
    thread (module docstring); False where the C library is not glibc (macOS, musl), which
    then keeps its own policy (and JAX its asynchronous dispatch)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
