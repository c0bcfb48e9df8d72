"""The benchmark's options (what `python -m diffusion_jax.bench` takes as flags)."""

from __future__ import annotations

import dataclasses

from diffusion_jax.runtime import compilation

SAMPLERS = ("ddim", "dpm_solver++")
COMPARE = ("none", "diffusers")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    batch_size: int = 16
    dtype: str = "float32"
    steps: tuple[int, ...] = (20, 50)
    samplers: tuple[str, ...] = SAMPLERS
    sample_batch_size: int = 16
    repeats: int = 5
    sample_repeats: int = 3
    warmup: int = 4  # train steps; XLA:CPU's and PyTorch's allocators settle over ~4 steps
    sample_warmup: int = 1
    compare: str = "none"
    peak_tflops: float = 0.0  # 0: from PEAK_TFLOPS for the detected device, if known
    ynn_convolutions: bool = False  # True: XLA:CPU's default library for convolutions
    torch_threads: int = 0  # 0: as many as JAX uses (every core this process may run on)
    torch_device: str = "auto"  # diffusers' side: "auto" (where ours runs), "cpu", "cuda"
    skip_with: str = "cond"  # how the train step skips a non-finite update (train_step.SKIP_FORMS)
    retain_freed_memory: bool = True  # host_memory.retain_freed_memory(), as training runs
    profile_steps: int = 0  # > 0: a profile of that many train steps, per XLA operation
    profile_dir: str = "/tmp/diffusion_jax_profile"  # where the profiler writes its trace
    seed: int = 0
    log_to: tuple[str, ...] = ()  # workdirs (local, gs://...) to time the logged step against


def compiler_options(options: BenchOptions) -> dict[str, str]:
    """The XLA options of our runs (`compilation.compiler_options`: on the CPU, convolutions
    and matrix products in Eigen), or XLA's defaults with `ynn_convolutions`."""
    return {} if options.ynn_convolutions else compilation.compiler_options()
