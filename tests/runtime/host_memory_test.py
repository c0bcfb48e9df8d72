"""host_memory.retain_freed_memory: freed blocks are reused; reallocating touches no new pages,
neither in Python's thread nor in the executions of a jitted JAX program."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

_PROGRAM = """
import resource, sys
import numpy as np
from diffusion_jax.runtime import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
np.ones(16_000_000, np.float32)  # 64 MB: served by mmap() under glibc's defaults
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(16_000_000, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# A jitted program whose output and temporaries (32 MB each: under the 64 MB of a glibc
# thread heap, see host_memory) are allocated per execution; the page faults of each of 10.
_JAX_PROGRAM = """
import resource, sys
from diffusion_jax.runtime import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 2.0) + 1.0)
x = jnp.ones(8_000_000, jnp.float32)
f(x).block_until_ready()
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str, program: str = _PROGRAM) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", program, mode], capture_output=True, text=True, check=True
    )
    return [int(line) for line in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_reallocation_touches_no_new_pages():
    (default,), (retained,) = _page_faults("default"), _page_faults("retain")
    # 10 x 64 MB of fresh pages by default (4 KiB or 2 MiB pages); reused pages when retained.
    assert default >= 300
    assert retained < default / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_jax_executions_touch_no_new_pages():
    # Medians over the executions: this machine's kernel reclaims idle pages now and then.
    default = np.median(_page_faults("default", _JAX_PROGRAM))
    retained = np.median(_page_faults("retain", _JAX_PROGRAM))
    assert default >= 15  # a 32 MB buffer of fresh pages (4 KiB or 2 MiB) per execution
    assert retained < default / 10
