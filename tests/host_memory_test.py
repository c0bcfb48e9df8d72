"""host_memory.retain_freed_memory: freed blocks are reused; reallocating touches no new pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROGRAM = """
import resource, sys
import numpy as np
from diffusion_jax import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
np.ones(16_000_000, np.float32)  # 64 MB: served by mmap() under glibc's defaults
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(16_000_000, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_reallocation_touches_no_new_pages():
    default, retained = _page_faults("default"), _page_faults("retain")
    # 10 x 64 MB of fresh pages by default (4 KiB or 2 MiB pages); reused pages when retained.
    assert default >= 300
    assert retained < default / 10
