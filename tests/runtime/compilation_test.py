"""Ahead-of-time compilation with our XLA options, and processes that start a program together."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.runtime import compilation

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "tests" / "late_process_worker.py"
# Longer than gloo's 30 s wait for a peer, so that a plain jit would die.
LATE_BY_S = 35
YNNPACK_FUSION = "__ynn_fusion"  # how XLA:CPU marks a fusion it hands to YNNPACK
ONE_DEVICE = "--xla_force_host_platform_device_count=1"


def _conv_weight_gradient():
    def loss(w, x):
        layout = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=layout)
        return jnp.sum(y**2)

    return jax.jit(jax.grad(loss)), jnp.ones((3, 3, 64, 64)), jnp.ones((4, 32, 32, 64))


def test_cpu_options_send_convolutions_to_eigen():
    grad, w, x = _conv_weight_gradient()
    default = compilation.compile_ahead(grad, w, x, options={})
    if YNNPACK_FUSION not in default.as_text():
        pytest.skip("this jaxlib does not send convolutions to YNNPACK: nothing to route")
    ours = compilation.compile_ahead(grad, w, x)
    assert compilation.compiler_options() == compilation.CPU_COMPILER_OPTIONS
    assert YNNPACK_FUSION not in ours.as_text()
    np.testing.assert_allclose(ours(w, x), default(w, x), rtol=1e-5)


def test_cpu_options_keep_matrix_products_out_of_ynnpack():
    """Winograd's batched products (models.winograd) run in Eigen: no YNNPACK fusion."""
    product = jax.jit(lambda v, u: jnp.einsum("knc,kco->kno", v, u))
    v, u = jnp.ones((16, 64, 32)), jnp.ones((16, 32, 8))
    default = compilation.compile_ahead(product, v, u, options={})
    if YNNPACK_FUSION not in default.as_text():
        pytest.skip("this jaxlib does not send matrix products to YNNPACK: nothing to route")
    ours = compilation.compile_ahead(product, v, u)
    assert YNNPACK_FUSION not in ours.as_text()
    np.testing.assert_array_equal(ours(v, u), default(v, u))


def test_no_options_off_the_cpu():
    assert compilation.compiler_options("gpu") == {}
    assert compilation.compiler_options("tpu") == {}
    assert compilation.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_an_option_this_jaxlib_lacks_compiles_with_the_defaults():
    jitted = jax.jit(lambda x: 2 * x + 1)
    compiled = compilation.compile_ahead(jitted, jnp.ones(3), options={"xla_no_such_option": "1"})
    np.testing.assert_array_equal(compiled(jnp.arange(3.0)), [1.0, 3.0, 5.0])


def test_persistent_cache_goes_under_the_workdir_unless_jax_has_one(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation.use_persistent_cache("", str(tmp_path)) is None  # off
        assert jax.config.jax_compilation_cache_dir is None
        used = compilation.use_persistent_cache("cache", str(tmp_path))
        assert used == str(tmp_path / "cache") == jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", "/set/by/the/environment")
        assert compilation.use_persistent_cache("/elsewhere", str(tmp_path)) == (
            "/set/by/the/environment"
        )
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation.use_persistent_cache("gs://bucket/cache", "/w") == "gs://bucket/cache"
        jax.config.update("jax_compilation_cache_dir", None)  # a bucket workdir keeps it there
        assert compilation.use_persistent_cache("cache", "gs://b/run") == "gs://b/run/cache"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_compiled_together_equals_jit_and_compiles_once_per_signature():
    jitted = jax.jit(lambda x, y: x @ y + 1)
    together = compilation.CompiledTogether(jitted, "matmul")
    a, b = np.eye(3, dtype=np.float32), np.arange(9, dtype=np.float32).reshape(3, 3)
    for _ in range(3):
        np.testing.assert_array_equal(together(a, b), jitted(a, b))
    assert len(together.compiled) == 1
    together(np.ones((2, 3), np.float32), b)
    together(a.astype(np.float16), b.astype(np.float16))
    assert len(together.compiled) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_process_that_compiles_late_is_waited_for():
    """Process 1 reaches the program 35 s after process 0: both still sum 1 + 2."""
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), address, str(process_id), str(LATE_BY_S), "together"],
            cwd=REPO_ROOT,
            env={**os.environ, "XLA_FLAGS": ONE_DEVICE, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "total 3.0" in stdout
