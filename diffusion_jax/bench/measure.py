"""Measurements: interleaved timings, compile time, FLOPs from XLA's cost analysis, device
peaks for MFU, memory, and the environment a figure needs to be reproduced."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import resource
import time
from collections.abc import Callable

import jax

from diffusion_jax.bench.options import BenchOptions, compiler_options
from diffusion_jax.runtime import compilation

# Dense peak TFLOP/s per JAX device, from the vendors' data sheets (H100/H200 SXM: 989
# bf16; REFERENCE.md measured ~798 bf16 on the lent H100). float32 is the rate of what JAX's
# default precision runs a float32 product or convolution as: TF32 on tensor cores on a GPU
# (H100/H200 SXM 495 dense, A100 156; 67 and 19.5 without them), one bfloat16 pass on a TPU.
# TPU v2/v3 expose one device per core, v4/v5p one per chip (megacore). Keys are matched
# in order as substrings of `device_kind` ("NVIDIA H100 PCIe", "TPU v5 lite" for v5e,
# "TPU v5" for v5p, "TPU v6 lite" for v6e): the more specific first.
PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100 NVL": {"bfloat16": 835.0, "float32": 418.0},
    "H100": {"bfloat16": 989.0, "float32": 495.0},
    "H200": {"bfloat16": 989.0, "float32": 495.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v3": {"bfloat16": 61.5, "float32": 61.5},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}


def interleaved_times(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call, the callables taking turns; each must block on its result."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def compile_timed(jitted, *args, options: dict[str, str]):
    """(compiled executable, {"wall_s": ..., "cpu_s": ...}) to trace, lower and compile it. The CPU
    time of this process is the steadier figure on a machine shared with other work."""
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = compilation.compile_ahead(jitted, *args, options=options)
    return compiled, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def cost_flops(compiled) -> float:
    """FLOPs of one call of a compiled (or lowered) program, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def peak_tflops(device, dtype: str, override: float = 0.0) -> float | None:
    """The peak of `device` for `dtype`: `override` if > 0, else from PEAK_TFLOPS."""
    if override > 0:
        return override
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peaks.get(dtype)
    return None


def memory_stats(device) -> dict:
    """Peak device memory where the backend reports it (GPU, TPU); else the peak resident
    memory of this process on the host (which includes PyTorch's, when compared)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"kind": "device", "peak_bytes": int(stats["peak_bytes_in_use"])}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "host_rss", "peak_bytes": int(peak_kib) * 1024}


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo on Linux) and its widest vector extension:
    CPU figures differ between, say, an AVX2 and an AVX-512 machine."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((ext for ext in ("avx512f", "avx2", "avx", "sse4_2") if ext in flags), "")
    return " ".join(filter(None, (fields.get("model name", platform.machine()), vector)))


def environment(options: BenchOptions) -> dict:
    """Versions, device and date: what a figure needs to be reproduced."""
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", ""),
        "compiler_options": compiler_options(options),
        "options": dataclasses.asdict(options),
    }
