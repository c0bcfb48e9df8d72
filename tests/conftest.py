"""Test configuration: every test process sees 8 fake CPU devices.

The flag must be set before JAX initialises its backends, so it is set here,
at import of the test package, rather than inside individual tests.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates the small tests on CPU: share compiled programs between the test
# processes (xdist workers, and the subprocesses that end-to-end tests start).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_jax_cache")
)
