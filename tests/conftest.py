"""Test configuration: every test process sees 8 fake CPU devices.

The flag must be set before JAX initialises its backends, so it is set here,
at import of the test package, rather than inside individual tests.
"""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates the small tests on CPU: share compiled programs between the test
# processes (xdist workers, and the subprocesses that end-to-end tests start).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_jax_cache")
)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A Google Cloud Storage emulator on 127.0.0.1 (tests/gcs_emulator.py), this process's
    gcsfs and TensorStore pointed at it for the session; `.environment()` for subprocesses."""
    import fsspec

    from tests.gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        saved = {name: os.environ.get(name) for name in emulator.environment()}
        os.environ.update(emulator.environment())
        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # read at import, so set here
        try:
            yield emulator
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
