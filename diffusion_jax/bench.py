"""Benchmark: training throughput, sampling speed, compile times and memory, optionally
against diffusers (PyTorch) on the same machine in the same process.

    python -m diffusion_jax.bench --config configs/cifar10.py --batch_size 16 --dtype float32
    python -m diffusion_jax.bench --config configs/cifar10.py --compare diffusers \
        --out bench.json

Training: the compiled train step of `diffusion_jax.train` (loss, gradient, clipping, Adam,
EMA) on a synthetic batch; images/s from the median of timed repetitions after warm-up,
each blocking on the result. Model FLOPs per step come from XLA's cost analysis of the
step with direct convolutions; MFU = FLOPs / time / peak, with the peak from `--peak_tflops`
or the table `PEAK_TFLOPS` for the detected device. Sampling: DDIM and DPM-Solver++ at
each step count of `--steps`, one compiled program each; image-NFE/s = batch * NFE / time.
Timed callables (ours and theirs) are interleaved repetition by repetition, so that a
machine shared with other work slows both alike and the ratios stay meaningful. diffusers
runs on the device ours runs on (`--torch_device`), in the same compute dtype. See
docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import models as model_presets
from diffusion_jax import (
    compilation,
    host_memory,
    models,
    op_profile,
    parallel,
    samplers,
    sampling_run,
    train,
)

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
    skip_with: str = "cond"  # how the train step skips a non-finite update (train.SKIP_FORMS)
    retain_freed_memory: bool = True  # host_memory.retain_freed_memory(), as training runs
    profile_steps: int = 0  # > 0: a profile of that many train steps, per XLA operation
    profile_dir: str = "/tmp/diffusion_jax_profile"  # where the profiler writes its trace
    seed: int = 0


def compiler_options(options: BenchOptions) -> dict[str, str]:
    """The XLA options of our runs (`compilation.compiler_options`: on the CPU, convolutions
    and matrix products in Eigen), or XLA's defaults with `ynn_convolutions`."""
    return {} if options.ynn_convolutions else compilation.compiler_options()


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


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the tiny U-Net of `configs.models.tiny()` at its image size."""
    config = ml_collections.ConfigDict(config.to_dict())
    model = model_presets.tiny()
    model.image_size = config.model.image_size
    model.in_channels = model.out_channels = config.model.in_channels
    model.attn_resolutions = (config.model.image_size // 2,)
    model.learn_sigma = config.model.learn_sigma
    model.num_classes = config.model.num_classes
    config.model = model
    return config


def _model_config(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = dtype
    return config


def _synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape = (batch_size, *models.sample_shape(config.model))
    batch = {"x": rng.uniform(-1.0, 1.0, shape).astype(np.float32)}
    if config.model.num_classes > 0:
        batch["label"] = rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)
    return batch


def _train_step_parts(config: ml_collections.ConfigDict, options: BenchOptions):
    """(model, optimizer, train step function) of `train`, as training runs build them."""
    model = models.build_model(config.model)
    tx, lr_schedule = train.make_optimizer(config.optim, num_steps=config.training.num_steps)
    train_step = train.make_train_step(
        train.make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=tuple(config.training.ema_decays),
        skip_with=options.skip_with,
    )
    return model, tx, train_step


def model_flops_per_step(config, options: BenchOptions, strategy, state, batch, rng) -> float:
    """FLOPs of one whole train step as the network defines them: XLA's count of the lowered
    program (before it is split over the devices: a compiled program's count is one device's
    share), a U-Net's with direct convolutions. Winograd's convolutions (`models.winograd`)
    need fewer multiplications for the same work, which is speed, not fewer model FLOPs."""
    direct = ml_collections.ConfigDict(config.to_dict())
    if direct.model.name == "unet":
        direct.model.conv_algorithm = "direct"
    train_step = _train_step_parts(direct, options)[2]
    jitted = strategy.compile_train_step(train_step, jax.eval_shape(lambda: state))
    return cost_flops(jitted.lower(state, batch, rng))


def make_train_runner(config: ml_collections.ConfigDict, options: BenchOptions):
    """(run, info): `run()` takes one compiled train step of `train.make_train_step` and
    blocks on it; info holds the compile time, the FLOPs per step (the network's, and XLA's
    count of the compiled step) and the parameter count."""
    if config.parallel.strategy == "pmap":
        raise ValueError(
            "parallel.strategy='pmap': the benchmark times jit-compiled train steps; "
            "allowed: 'data', 'fsdp'"
        )
    model, tx, train_step = _train_step_parts(config, options)
    strategy = parallel.make_strategy(config.parallel)
    parallel.check_batch_size(options.batch_size, strategy.num_devices, option="--batch_size")
    create = train.make_create_fn(config, model, tx)
    rng = jax.random.PRNGKey(options.seed)
    state = strategy.init_state(create, rng)
    batch = strategy.device_batch(_synthetic_batch(config, options.batch_size, options.seed))
    jitted = strategy.compile_train_step(train_step, jax.eval_shape(lambda: state))
    compiled, compile_time = compile_timed(
        jitted, state, batch, rng, options=compiler_options(options)
    )
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return jax.block_until_ready((holder["state"], metrics))

    info = {
        "compile": compile_time,
        "flops_per_step": model_flops_per_step(config, options, strategy, state, batch, rng),
        "compiled_flops_per_step": cost_flops(compiled),  # per device, as compiled
        "params": models.count_params(state.params),
        "devices": strategy.num_devices,
    }
    return run, info


def _sampler_options(config: ml_collections.ConfigDict, name: str, prediction: str) -> dict:
    candidates = {
        "prediction": prediction,
        "variance_type": config.diffusion.variance_type,
        "clip_x0": config.sampling.clip_x0,
        "eta": 0.0,
    }
    allowed = samplers.sampler_options(name)
    return {key: value for key, value in candidates.items() if key in allowed}


def make_sample_runner(config, model, params, name: str, num_steps: int, options: BenchOptions):
    """(run, info): `run()` draws one batch of samples with the compiled sampler `name`."""
    if config.diffusion.loss_type not in sampling_run.DISCRETE_LOSSES:
        raise ValueError(
            f"diffusion.loss_type={config.diffusion.loss_type!r}: the sampling benchmark "
            f"needs a discrete process; allowed: {sampling_run.DISCRETE_LOSSES}"
        )
    schedule, prediction = sampling_run.sampling_schedule(config.diffusion)
    sample = samplers.make_sampler(
        name,
        schedule=schedule,
        num_steps=num_steps,
        **_sampler_options(config, name, prediction),
    )
    batch = options.sample_batch_size
    labels = sampling_run.sample_labels(config, batch)
    shape = (batch, *models.sample_shape(config.model))
    noise = jax.random.normal(jax.random.PRNGKey(options.seed), shape)  # [B, H, W, C]
    rng = jax.random.PRNGKey(options.seed + 1)

    def generate(params, noise, rng):  # the network function of sampling runs
        model_fn = sampling_run.model_fn_of(config, model, params, schedule)
        return sample(model_fn, noise, rng, labels)

    compiled, compile_time = compile_timed(
        jax.jit(generate), params, noise, rng, options=compiler_options(options)
    )
    info = {"compile": compile_time, "nfe": 0}

    def run():
        _, sample_info = jax.block_until_ready(compiled(params, noise, rng))
        info["nfe"] = int(sample_info["nfe"])

    return run, info


def _diffusers_side(config: ml_collections.ConfigDict, options: BenchOptions, our_params: int):
    """diffusers' U-Net of the same configuration, after checking the parameter counts, on
    the device `bench_torch.torch_device` picks (ours, where PyTorch sees it)."""
    import torch

    from diffusion_jax import bench_torch

    device = bench_torch.torch_device(options.torch_device, jax.default_backend())
    torch.set_num_threads(options.torch_threads or len(os.sched_getaffinity(0)))
    bench_torch.set_precision(device)
    unet = bench_torch.build_diffusers_unet(config.model, seed=options.seed, device=device)
    their_params = bench_torch.count_torch_params(unet)
    if their_params != our_params:
        raise ValueError(
            f"--compare diffusers: diffusers' UNet2DModel has {their_params} parameters, ours "
            f"{our_params}; the model config has no exact diffusers counterpart"
        )
    return unet, {**bench_torch.torch_info(device), "params": their_params}


def _summary(times: list[float], items: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "times_s": times, "items_per_s": items / median}


def bench_training(config, options: BenchOptions, runner, unet=None) -> dict:
    """Images/s, FLOPs, MFU and compile time of our train step (`runner`, from
    `make_train_runner`) and of diffusers' (`unet`, when given)."""
    run, info = runner
    fns = {"ours": run}
    if unet is not None:
        from diffusion_jax import bench_torch

        fns["diffusers"] = bench_torch.make_train_runner(
            unet,
            batch_size=options.batch_size,
            betas=bench_torch.betas_of(config.diffusion),
            learning_rate=config.optim.learning_rate,
            grad_clip_norm=config.optim.grad_clip_norm,
            ema_decay=config.training.ema_decays[0],
            dtype=options.dtype,
            seed=options.seed,
        )
    times = interleaved_times(fns, repeats=options.repeats, warmup=options.warmup)
    result = {name: _summary(t, options.batch_size) for name, t in times.items()}
    ours = result["ours"]
    ours.update(info)
    ours["tflops_per_s"] = info["flops_per_step"] / ours["median_s"] / 1e12  # all devices
    peak = peak_tflops(jax.devices()[0], options.dtype, options.peak_tflops)
    ours["peak_tflops"] = peak  # one device's
    ours["mfu"] = ours["tflops_per_s"] / (peak * info["devices"]) if peak else None
    if unet is not None:
        result["ratio"] = ours["items_per_s"] / result["diffusers"]["items_per_s"]
    return result


def bench_sampling(config, options: BenchOptions, unet=None) -> dict:
    """Image-NFE/s, wall time and compile time of each sampler at each step count."""
    model = models.build_model(config.model)
    params = models.init_params(model, config.model, jax.random.PRNGKey(options.seed))
    results = {}
    for name in options.samplers:
        for num_steps in options.steps:
            run, info = make_sample_runner(config, model, params, name, num_steps, options)
            fns = {"ours": run}
            if unet is not None and name == "ddim":
                from diffusion_jax import bench_torch

                fns["diffusers"] = bench_torch.make_ddim_runner(
                    unet,
                    batch_size=options.sample_batch_size,
                    num_steps=num_steps,
                    betas=bench_torch.betas_of(config.diffusion),
                    clip_sample=config.sampling.clip_x0,
                    dtype=options.dtype,
                    seed=options.seed,
                )
            times = interleaved_times(
                fns, repeats=options.sample_repeats, warmup=options.sample_warmup
            )
            nfe = {"ours": info["nfe"], "diffusers": num_steps}
            entry = {
                key: _summary(t, options.sample_batch_size * nfe[key]) for key, t in times.items()
            }
            entry["ours"].update(info)
            if "diffusers" in entry:
                entry["ratio"] = entry["ours"]["items_per_s"] / entry["diffusers"]["items_per_s"]
            results[f"{name}_{num_steps}"] = entry
    return results


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


def run_benchmark(config: ml_collections.ConfigDict, options: BenchOptions) -> dict:
    """Every measurement of the benchmark, as a JSON-ready dict."""
    if options.compare not in COMPARE:
        raise ValueError(f"--compare={options.compare!r}; allowed: {COMPARE}")
    unknown = [name for name in options.samplers if name not in SAMPLERS]
    if unknown:
        raise ValueError(f"--samplers={unknown}; allowed: {SAMPLERS}")
    config = _model_config(config, options.dtype)
    results = {"environment": environment(options)}
    if config.model.name == "unet":  # the 3x3 convolutions: "winograd" or "direct"
        results["environment"]["conv_algorithm"] = models.conv_algorithm(config.model)
    runner = make_train_runner(config, options)
    unet = None
    if options.compare == "diffusers":
        unet, results["diffusers"] = _diffusers_side(config, options, runner[1]["params"])
    results["train"] = bench_training(config, options, runner, unet)
    if options.profile_steps > 0:
        results["profile"] = profile_train_step(runner[0], options)
    results["sampling"] = bench_sampling(config, options, unet)
    compile_times = {key: entry["ours"]["compile"] for key, entry in results["sampling"].items()}
    results["compile"] = {"train_step": results["train"]["ours"]["compile"], **compile_times}
    results["memory"] = memory_stats(jax.devices()[0])
    if unet is not None:
        from diffusion_jax import bench_torch

        results["diffusers"]["peak_bytes"] = bench_torch.peak_memory_bytes(
            results["diffusers"]["device"]
        )
    return results


def profile_train_step(run: Callable[[], object], options: BenchOptions) -> dict:
    """Our train step's time per XLA operation (`op_profile`), or the error that stopped the
    profiler (a lent GPU's profiler may be unavailable: the timings above still count)."""
    try:
        trace, seconds = op_profile.capture(run, options.profile_steps, options.profile_dir)
        return op_profile.summarize(trace, options.profile_steps, wall_s=seconds)
    except Exception as error:  # reported in the results instead of losing them
        return {"error": f"{type(error).__name__}: {error}"}


def format_table(results: dict) -> str:
    """The console table: one row per measurement, ours / diffusers / ratio."""
    rows = [("measurement", "ours", "diffusers", "ours/theirs")]
    train = results["train"]
    ours = train["ours"]
    theirs = train.get("diffusers", {})
    rows.append(("train img/s", ours["items_per_s"], theirs.get("items_per_s"), train.get("ratio")))
    rows.append(("train step TFLOP (model)", ours["flops_per_step"] / 1e12, None, None))
    rows.append(("... as compiled (XLA)", ours["compiled_flops_per_step"] / 1e12, None, None))
    rows.append(("train TFLOP/s", ours["tflops_per_s"], None, None))
    rows.append(("train MFU", ours["mfu"], None, None))
    for key, entry in results["sampling"].items():
        their = entry.get("diffusers", {})
        ratio = entry.get("ratio")
        rows.append(
            (f"{key} image-NFE/s", entry["ours"]["items_per_s"], their.get("items_per_s"), ratio)
        )
        rows.append((f"{key} batch wall s", entry["ours"]["median_s"], their.get("median_s"), None))
    for key, seconds in results["compile"].items():
        rows.append((f"compile {key} s (wall)", seconds["wall_s"], None, None))
        rows.append((f"compile {key} s (CPU)", seconds["cpu_s"], None, None))
    memory = results["memory"]
    theirs_peak = results.get("diffusers", {}).get("peak_bytes")
    rows.append(
        (
            f"peak memory GiB ({memory['kind']})",
            memory["peak_bytes"] / 2**30,
            None if theirs_peak is None else theirs_peak / 2**30,
            None,
        )
    )
    if "diffusers" in results:
        rows.append(("diffusers device", None, results["diffusers"]["device"], None))
    cell = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.4g}")
    widths = [max(len(cell(row[i])) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell(v).ljust(w) if i == 0 else cell(v).rjust(w)
            for i, (v, w) in enumerate(zip(row, widths))
        )
        for row in rows
    )


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.")
flags.DEFINE_integer("batch_size", 16, "Training batch size (global).")
flags.DEFINE_enum("dtype", "float32", list(models.COMPUTE_DTYPES), "Compute dtype of the model.")
flags.DEFINE_enum("compare", "none", list(COMPARE), "Also run diffusers' UNet2DModel (PyTorch).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for the MFU (0: known table).")
flags.DEFINE_list("steps", ["20", "50"], "Sampler step counts.")
flags.DEFINE_list("samplers", list(SAMPLERS), "Samplers to time.")
flags.DEFINE_integer("sample_batch_size", 0, "Images per sampling batch (0: --batch_size).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of the train step (median reported).")
flags.DEFINE_integer("sample_repeats", 3, "Timed repetitions of each sampler.")
flags.DEFINE_integer("warmup", 4, "Untimed train steps before timing.")
flags.DEFINE_integer("sample_warmup", 1, "Untimed calls of each sampler before timing.")
flags.DEFINE_bool("ynn_convolutions", False, "XLA:CPU: keep YNNPACK convolutions (its default).")
flags.DEFINE_integer("torch_threads", 0, "PyTorch threads (0: the cores JAX uses).")
flags.DEFINE_enum(
    "torch_device", "auto", ["auto", "cpu", "cuda"], "diffusers' device (auto: where ours runs)."
)
flags.DEFINE_enum(
    "skip_with", "cond", list(train.SKIP_FORMS), "Train step: how a non-finite update is skipped."
)
flags.DEFINE_bool(
    "retain_freed_memory",
    True,
    "Keep freed host memory in the process, CPU programs in the calling thread (host_memory);"
    " --noretain_freed_memory: glibc's and JAX's defaults.",
)
flags.DEFINE_integer("profile_steps", 0, "Profile this many train steps per XLA op (0: none).")
flags.DEFINE_string("profile_dir", "/tmp/diffusion_jax_profile", "Where the profile trace goes.")
flags.DEFINE_bool("tiny", False, "Benchmark the tiny U-Net of configs/models.py instead.")
flags.DEFINE_string("out", "bench.json", "Where to write the JSON results.")
flags.mark_flags_as_required(["config"])


def options_from_flags() -> BenchOptions:
    return BenchOptions(
        batch_size=FLAGS.batch_size,
        dtype=FLAGS.dtype,
        steps=tuple(int(s) for s in FLAGS.steps),
        samplers=tuple(FLAGS.samplers),
        sample_batch_size=FLAGS.sample_batch_size or FLAGS.batch_size,
        repeats=FLAGS.repeats,
        sample_repeats=FLAGS.sample_repeats,
        warmup=FLAGS.warmup,
        sample_warmup=FLAGS.sample_warmup,
        compare=FLAGS.compare,
        peak_tflops=FLAGS.peak_tflops,
        ynn_convolutions=FLAGS.ynn_convolutions,
        torch_threads=FLAGS.torch_threads,
        torch_device=FLAGS.torch_device,
        skip_with=FLAGS.skip_with,
        retain_freed_memory=FLAGS.retain_freed_memory,
        profile_steps=FLAGS.profile_steps,
        profile_dir=FLAGS.profile_dir,
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = shrink_to_tiny(FLAGS.config) if FLAGS.tiny else FLAGS.config
    options = options_from_flags()
    if options.retain_freed_memory:  # before JAX starts its threads, as diffusion_jax.main
        host_memory.retain_freed_memory()
    if options.compare != "none":  # before JAX's GPU client exists: it would take 75% of the
        # GPU's memory up front, leaving PyTorch, in the same process, the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    results = run_benchmark(config, options)
    print(format_table(results))
    if "profile" in results:
        profile = results["profile"]
        print(profile.get("error") or op_profile.format_summary(profile))
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"Results written to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
