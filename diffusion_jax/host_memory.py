"""Keep freed host memory inside the process instead of handing it back to the OS.

XLA:CPU allocates a program's buffers with malloc on every execution and frees them at its
end. glibc serves large blocks with fresh mmap()s (and gives the per-thread arenas of XLA's
worker threads back with munmap()), so each execution touches its working set as new pages:
the DDPM CIFAR-10 train step at batch 16 took about 305,000 page faults, 1.2 GB of zeroed
pages and 0.6-1.1 s of kernel CPU time per step. With one arena, no mmap()-served blocks
and no trimming of the heap, the next step reuses the same pages: no page faults at all
(docs/benchmarks.md). The peak memory is unchanged; the process just keeps its peak.

The same as starting Python with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647``; call `retain_freed_memory` before JAX starts its
threads (the first JAX computation).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters of glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def retain_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (module docstring); False where the C
    library is not glibc (macOS, musl), which then keeps its own policy."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
